package edged

import "time"

// SystemClock is the production Clock: time.Now, with Go's monotonic
// reading, and a synchronization test supplied by the platform.
type SystemClock struct {
	// AssumeSynced makes Synced always true (clock.assume_synced).
	AssumeSynced bool
	// Sync reports whether the kernel says the clock is synchronized; nil
	// means never.
	Sync func() bool
}

// Now returns the current time.
func (c SystemClock) Now() time.Time { return time.Now() }

// Synced reports whether wall time can be trusted (§4).
func (c SystemClock) Synced() bool {
	return c.AssumeSynced || (c.Sync != nil && c.Sync())
}
