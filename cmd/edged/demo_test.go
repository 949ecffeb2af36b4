package main

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a strings.Builder safe for the demo's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestDemoRunsAStation runs the demo briefly: rentals start on simulated
// devices through the stand-in cloud, the uplink is cut and restored, a
// grant relayed by a chair during the outage starts it, and it stops
// cleanly.
func TestDemoRunsAStation(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a whole simulated station")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Second)
	defer cancel()
	var out, errs syncBuffer
	err := run(ctx, []string{"demo", "-http", "127.0.0.1:0", "-chairs", "4", "-chargers", "2",
		"-grant-every", "200ms", "-outage-every", "3s", "-outage-for", "1s", "-seed", "1"}, nil, &out, &errs)
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, errs.String())
	}
	got := out.String()
	for _, want := range []string{"status page", "rental.started", "uplink cut", "relayed", "while the cloud is cut: started", "uplink restored", "demo stopping"} {
		if !strings.Contains(got, want) {
			t.Errorf("demo output lacks %q:\n%s", want, got)
		}
	}
}
