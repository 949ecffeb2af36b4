package edged

// Queued returns how many decisions wait for the committer, for tests
// that must know a decision was taken before they let a commit finish.
func (s *Station) Queued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue)
}
