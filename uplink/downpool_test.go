package uplink

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// poolHandler is a CloudHandler that records how many calls it had in
// flight at once. Each call blocks until k calls were in flight together
// (or the test's bounded wait ran out), so concurrency shows as a count
// rather than as a time.
type poolHandler struct {
	mu          sync.Mutex
	inflight    int
	maxInflight int
	calls       []string // payloads, in the order the calls began
	stored      []string // payloads accepted, in the order they returned
	k           int
	gate        chan struct{} // closed once k calls were in flight at once
	gateOnce    sync.Once
	expired     chan struct{} // closed when the bounded wait runs out
	// fail, when set, decides whether a call fails: payload, and how many
	// times that payload was handed over, this call included.
	fail func(payload string, n int) error
}

func newPoolHandler(k int, wait time.Duration) *poolHandler {
	h := &poolHandler{k: k, gate: make(chan struct{}), expired: make(chan struct{})}
	time.AfterFunc(wait, func() { close(h.expired) })
	return h
}

func (h *poolHandler) handle(ctx context.Context, p []byte) error {
	h.mu.Lock()
	h.inflight++
	h.maxInflight = max(h.maxInflight, h.inflight)
	if h.inflight >= h.k {
		h.gateOnce.Do(func() { close(h.gate) })
	}
	h.calls = append(h.calls, string(p))
	n := 0
	for _, c := range h.calls {
		if c == string(p) {
			n++
		}
	}
	fail := h.fail
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		h.inflight--
		h.mu.Unlock()
	}()
	select {
	case <-h.gate:
	case <-h.expired:
	case <-ctx.Done():
		return ctx.Err()
	}
	if fail != nil {
		if err := fail(string(p), n); err != nil {
			return err
		}
	}
	h.mu.Lock()
	h.stored = append(h.stored, string(p))
	h.mu.Unlock()
	return nil
}

func (h *poolHandler) Rental(ctx context.Context, p []byte) error        { return h.handle(ctx, p) }
func (h *poolHandler) RenterCommand(ctx context.Context, p []byte) error { return h.handle(ctx, p) }

// count is how many times payload was handed over and how many times stored.
func (h *poolHandler) count(payload string) (calls, stored int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.calls {
		if c == payload {
			calls++
		}
	}
	for _, c := range h.stored {
		if c == payload {
			stored++
		}
	}
	return calls, stored
}

// TestDownConcurrentDevices: grants for different devices reach the station
// together (so they can share one commit), one device's messages reach it
// in the order they were published, and PUBACKs go in arrival order: when
// one message fails while later ones for other devices were already
// stored, the broker redelivers the failed one and every later one, and
// nothing before it.
func TestDownConcurrentDevices(t *testing.T) {
	m := startMosquitto(t, "")
	p := newProxy(t, m.addr)
	c := newCloud(t, m.addr, "nothing/here")
	s := newStation()
	const k = 4
	h := newPoolHandler(k, 20*time.Second)
	cfg := s.config(t, "tcp://"+p.Addr())
	cfg.Handler = h
	cfg.KeepAlive = 3 * time.Second // the handler blocks; a loaded machine must not drop the link
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })

	// One device per worker, so the test does not depend on the hash.
	var devices []string
	seen := map[int]bool{}
	for i := 0; len(devices) < downWorkers && i < 10000; i++ {
		d := fmt.Sprintf("dev-%d", i)
		w := downWorker([]byte(`{"device_id":"` + d + `"}`))
		if !seen[w] {
			seen[w] = true
			devices = append(devices, d)
		}
	}
	if len(devices) != downWorkers {
		t.Fatalf("found devices for %d workers, want %d", len(devices), downWorkers)
	}
	grant := func(phase string, dev string, n int) string {
		return fmt.Sprintf(`{"op":"grant","rental_id":"%s-%s-%d","device_id":"%s"}`, phase, dev, n, dev)
	}

	// Phase 1: three messages per device, interleaved across devices.
	const per = 3
	var phase1 []string
	for n := range per {
		for _, d := range devices {
			msg := grant("a", d, n)
			phase1 = append(phase1, msg)
			c.publish(rentalsTopic, msg)
		}
	}
	waitFor(t, 40*time.Second, "every grant stored", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		return len(h.stored) == len(phase1)
	})
	h.mu.Lock()
	maxIn, stored := h.maxInflight, slices.Clone(h.stored)
	h.mu.Unlock()
	if maxIn < 2 {
		t.Errorf("at most %d grant in flight at once, want several (grants for different devices decided concurrently)", maxIn)
	}
	t.Logf("%d grants in flight at once at most", maxIn)
	for _, d := range devices {
		var got []string
		for _, msg := range stored {
			var v struct {
				DeviceID string `json:"device_id"`
			}
			if json.Unmarshal([]byte(msg), &v) == nil && v.DeviceID == d {
				got = append(got, msg)
			}
		}
		want := []string{grant("a", d, 0), grant("a", d, 1), grant("a", d, 2)}
		if !slices.Equal(got, want) {
			t.Errorf("device %s: stored %v, want %v (its order)", d, got, want)
		}
	}
	time.Sleep(200 * time.Millisecond) // let the PUBACKs reach the broker

	// Phase 2: one message per device; the fourth fails once, and only
	// after every later one was stored. Acked in arrival order, the later
	// ones stay unacknowledged and come back with it.
	var phase2 []string
	for _, d := range devices {
		phase2 = append(phase2, grant("b", d, 0))
	}
	const bad = 3
	h.mu.Lock()
	h.fail = func(payload string, n int) error {
		if payload != phase2[bad] || n != 1 {
			return nil
		}
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			later := 0
			for _, msg := range phase2[bad+1:] {
				if _, st := h.count(msg); st > 0 {
					later++
				}
			}
			if later == len(phase2)-bad-1 {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		return edged.Errorf(edged.EINTERNAL, "store broke")
	}
	h.mu.Unlock()
	for _, msg := range phase2 {
		c.publish(rentalsTopic, msg)
	}
	waitFor(t, 40*time.Second, "the failed grant and every later one redelivered and stored", func() bool {
		for i, msg := range phase2[bad:] {
			calls, st := h.count(msg)
			if st == 0 || (i > 0 && calls < 2) {
				return false
			}
		}
		return true
	})
	time.Sleep(500 * time.Millisecond) // any further redelivery would show by now
	for i, msg := range phase2 {
		calls, _ := h.count(msg)
		switch {
		case i < bad && calls != 1:
			t.Errorf("message %d (before the failure): handed over %d times, want once (acknowledged)", i, calls)
		case i > bad && calls != 2:
			t.Errorf("message %d (after the failure, stored before it): handed over %d times, want twice (left unacknowledged, redelivered)", i, calls)
		}
	}
	for _, msg := range phase1 {
		if calls, _ := h.count(msg); calls != 1 {
			t.Errorf("%s handed over %d times, want once (acknowledged before the reconnect)", msg, calls)
		}
	}
	if st := u.Status(); st.Reconnects < 1 {
		t.Errorf("reconnects %d after a failed message, want at least 1", st.Reconnects)
	}
}
