package local

import (
	"fmt"
	"testing"
	"time"
)

// A device over local.max_publish_rate is slowed, not dropped: every
// message arrives, the device stays connected, the throttle counter rises,
// and another device is not held back.
func TestPublishRateLimit(t *testing.T) {
	const rate, n = 50.0, 200
	e := start(t, func(c *Config) { c.MaxPublishRate = rate })
	flood := connectV3(t, e.addr, "dev-a", secretA)
	calm := connectV3(t, e.addr, "dev-b", secretB)

	begin := time.Now()
	done := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			if err := flood.publish(t, "devices/dev-a/events", 1, []byte(fmt.Sprintf(`{"type":"tick","n":%d}`, i))); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	// The calm device's messages get through while dev-a is throttled.
	for i := 0; i < 5; i++ {
		if err := calm.publish(t, "devices/dev-b/telemetry", 1, []byte(`{"t":1}`)); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("throttled device never finished")
	}
	elapsed := time.Since(begin)
	events := 0
	for _, c := range e.rep.dataCalls() {
		if c.Method == "event" {
			events++
		}
	}
	if events != n {
		t.Fatalf("%d of %d events reached the station: throttling lost messages", events, n)
	}
	st := e.b.Stats()
	if st.Throttled == 0 {
		t.Fatal("throttle counter did not rise")
	}
	// The burst (2 x rate) passes at once, the rest at the rate: a lower
	// bound only, so a slow machine cannot fail it.
	if min := time.Duration((n - 2*rate) / rate * 0.9 * 1e9); elapsed < min {
		t.Fatalf("%d publishes took %v, want at least %v at %v/s", n, elapsed, min, rate)
	}
	if flood.connects.Load() != 1 {
		t.Fatalf("throttled device connected %d times", flood.connects.Load())
	}
	t.Logf("%d publishes at %v/s took %v; %d throttled", n, rate, elapsed.Round(time.Millisecond), st.Throttled)
}
