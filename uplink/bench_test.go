package uplink

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/store"
)

// BenchmarkDrain measures how fast a backlog leaves the station: events
// queued while offline, drained to mosquitto on loopback, each released
// from the outbox after its PUBACK. ns/op is per event.
func BenchmarkDrain(b *testing.B) {
	for _, window := range []int{1, 16, 64, 256} {
		b.Run(fmt.Sprintf("fake/window=%d", window), func(b *testing.B) {
			s := newStation()
			s.outbox.Append(b.N, 20)
			benchDrain(b, s, s.outbox, window, func() bool { return s.outbox.Len() == 0 })
		})
	}
	for _, window := range []int{64, 256} {
		b.Run(fmt.Sprintf("bbolt/window=%d", window), func(b *testing.B) { benchBolt(b, window) })
	}
}

// benchBolt drains a backlog from the real bbolt store.
func benchBolt(b *testing.B, window int) {
	{
		db, err := store.Open(filepath.Join(b.TempDir(), "edged.db"), store.Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer db.Close()
		data := json.RawMessage(`{"device_id":"dev-01","event":{"type":"tick"}}`)
		for i := 0; i < b.N; i += 500 {
			evs := make([]edged.Event, 0, 500)
			for j := i; j < min(i+500, b.N); j++ {
				evs = append(evs, edged.Event{Type: edged.EventDeviceEvent, TS: time.Now(), Data: data})
			}
			if _, err := db.Commit(context.Background(), edged.Change{Events: evs}); err != nil {
				b.Fatal(err)
			}
		}
		benchDrain(b, newStation(), db, window, func() bool { return db.OutboxStats(time.Now()).Events == 0 })
	}
}

func benchDrain(b *testing.B, s *station, outbox edged.Outbox, window int, drained func() bool) {
	m := startMosquitto(b, "")
	cfg := s.config(b, "tcp://"+m.addr)
	cfg.Outbox, cfg.Window, cfg.Logger = outbox, window, nil
	u, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	b.ResetTimer()
	start := time.Now()
	go func() { done <- u.Run(ctx) }()
	waitFor(b, 5*time.Minute, "the drain", drained)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
	cancel()
	<-done
}
