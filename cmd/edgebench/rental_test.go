package main

import (
	"math"
	"testing"
	"time"
)

// p99 of 100 grants is the second slowest, not the slowest; p50 of an
// even count is the lower middle; one sample is every percentile.
func TestNearestRank(t *testing.T) {
	seq := func(n int) []time.Duration {
		ds := make([]time.Duration, n)
		for i := range ds {
			ds[i] = time.Duration(i + 1)
		}
		return ds
	}
	for _, c := range []struct {
		n, pct int
		want   time.Duration
	}{
		{100, 99, 99}, {100, 50, 50}, {1000, 99, 990}, {3000, 99, 2970}, {300, 99, 297}, {30, 99, 30}, {1, 99, 1}, {1, 50, 1}, {3, 50, 2},
	} {
		if got := nearestRank(seq(c.n), c.pct); got != c.want {
			t.Errorf("p%d of 1..%d = %d, want %d", c.pct, c.n, got, c.want)
		}
	}
}

// The write-time cell reads percentiles and the slow tail off the
// histogram's cumulative buckets.
func TestWriteTimeCell(t *testing.T) {
	d := storeCounters{writeLE: map[float64]float64{0.0005: 10, 0.001: 90, 0.002: 98, 0.005: 99, 0.01: 99, 0.02: 100, math.Inf(1): 100}}
	want := "100 write tx: p50 0.5–1 ms, p99 2–5 ms; 1 over 5 ms (1.0 %), the slowest 10–20 ms"
	if got := writeTimeCell(d, 5*time.Millisecond); got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
	d = storeCounters{writeLE: map[float64]float64{0.00025: 3, 0.005: 3, math.Inf(1): 4}}
	want = "4 write tx: p50 ≤ 0.25 ms, p99 > 5 ms; 1 over 5 ms (25.0 %), the slowest > 5 ms"
	if got := writeTimeCell(d, 5*time.Millisecond); got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}
