package local

import (
	"sync"
	"time"
)

// rateLimit is a device's token bucket for local.max_publish_rate. A
// device over its rate is slowed, not dropped: its next publish is held on
// its own connection's goroutine, so TCP pushes back on the device, other
// devices are not affected, and nothing it sent is lost.
type rateLimit struct {
	mu     sync.Mutex
	rate   float64 // tokens per second
	burst  float64
	tokens float64
	last   time.Time
}

func newRateLimit(rate float64) *rateLimit {
	if rate <= 0 {
		return nil
	}
	return &rateLimit{rate: rate, burst: max(2*rate, 10)}
}

// reserve takes a token and returns how long the publish must wait for
// it. While a device waits its connection reads nothing more, so the wait
// never exceeds one token's time.
func (r *rateLimit) reserve(now time.Time) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.last.IsZero() {
		r.tokens = r.burst
	} else {
		r.tokens = min(r.burst, r.tokens+now.Sub(r.last).Seconds()*r.rate)
	}
	r.last = now
	r.tokens--
	if r.tokens >= 0 {
		return 0
	}
	return time.Duration(-r.tokens / r.rate * float64(time.Second))
}
