package main

import (
	"errors"
	"testing"
	"time"
)

// TestWatchdogDecision: the watchdog is pinged while the loops turn, a full
// disk included (§4: the process keeps running and enforcing rentals, and a
// restart would not free space); /healthz says 503 for a full disk too.
func TestWatchdogDecision(t *testing.T) {
	now := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	full := errors.New("no space left on device")
	tests := []struct {
		name        string
		h           health
		ping, ready bool
	}{
		{"all well", health{now: now, startedAt: now.Add(-time.Hour), lastTick: now.Add(-time.Second), serving: true}, true, true},
		{"store cannot write, loop turning", health{now: now, startedAt: now.Add(-time.Hour), lastTick: now.Add(-time.Second), store: full, serving: true}, true, false},
		{"rental loop stuck", health{now: now, startedAt: now.Add(-time.Hour), lastTick: now.Add(-stuckAfter - time.Second), serving: true}, false, false},
		{"rental loop stuck and store full", health{now: now, startedAt: now.Add(-time.Hour), lastTick: now.Add(-time.Minute), store: full, serving: true}, false, false},
		{"rental loop just started", health{now: now, startedAt: now.Add(-time.Second), serving: true}, true, true},
		{"rental loop never passed", health{now: now, startedAt: now.Add(-stuckAfter - time.Second), serving: true}, false, false},
		{"broker not serving", health{now: now, startedAt: now.Add(-time.Hour), lastTick: now, serving: false}, false, false},
		{"starting", health{now: now, starting: true}, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.h.alive(); (err == nil) != tt.ping {
				t.Errorf("alive() = %v, want ping %v", err, tt.ping)
			}
			if err := tt.h.ready(); (err == nil) != tt.ready {
				t.Errorf("ready() = %v, want healthy %v", err, tt.ready)
			}
		})
	}
}
