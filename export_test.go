package edged

import "time"

// Queued returns how many decisions wait for the committer, for tests
// that must know a decision was taken before they let a commit finish.
func (s *Station) Queued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue)
}

// SetLinger makes the committer's next look back find a commit that
// ended ago and took took, and lets a device's ack wait up to max.
func (s *Station) SetLinger(max, ago, took time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lingerFor = max
	s.lastCommit.Store(time.Now().Add(-ago).UnixNano())
	s.lastCommitTook.Store(int64(took))
}
