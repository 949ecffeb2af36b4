package main

import "testing"

// The GC runs lean while edged idles, at Go's default while it is busy,
// and keeps its mode in between, so a rate near one bound does not flap.
func TestGCLeanFollowsTheAllocationRate(t *testing.T) {
	const mb = 1 << 20
	steps := []struct {
		rate float64
		want bool
	}{
		{0.5 * mb, true},  // 5,000 idle devices
		{4 * mb, true},    // between the bounds: stays lean
		{20 * mb, false},  // ingest
		{4 * mb, false},   // between the bounds: stays busy
		{2.5 * mb, false}, // still above the lean bound
		{1.5 * mb, true},  // idle again
		{8.5 * mb, false}, // just above the busy bound
	}
	lean := false
	for i, s := range steps {
		lean = gcLean(lean, s.rate)
		if lean != s.want {
			t.Fatalf("step %d, %.1f MB/s: lean %v, want %v", i, s.rate/mb, lean, s.want)
		}
	}
}
