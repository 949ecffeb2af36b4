package uplink

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/store"
)

// TestQuota: with the real store and a tiny quota flooded while the link is
// down, the cloud gets every rental and command event, and outbox.dropped
// events that account exactly for what is missing.
func TestQuota(t *testing.T) {
	const flood = 3000
	m := startMosquitto(t, "")
	p := newProxy(t, m.addr)
	c := newCloud(t, m.addr, eventsTopic)

	db, err := store.Open(filepath.Join(t.TempDir(), "edged.db"), store.Options{OutboxMaxBytes: 128 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	s := newStation()
	cfg := s.config(t, "tcp://"+p.Addr())
	cfg.Outbox = db
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p.Cut() // offline from the start
	runUplink(t, u)

	// Flood: every 20th event must survive, the rest may be dropped.
	ctx := context.Background()
	committed := map[uint64]edged.Event{}
	for i := 0; i < flood; i += 50 {
		var evs []edged.Event
		for j := i; j < i+50; j++ {
			e := edged.Event{Station: "st-1", TS: time.Now(), Type: edged.EventDeviceEvent,
				Data: json.RawMessage(fmt.Sprintf(`{"device_id":"dev-01","event":{"type":"tick","pad":%q}}`, strings.Repeat("x", 200)))}
			if j%20 == 0 {
				e.Type = edged.EventRentalResult
				e.Data = json.RawMessage(fmt.Sprintf(`{"rental_id":"r%d","device_id":"dev-01","ok":true}`, j))
			}
			evs = append(evs, e)
		}
		stored, err := db.Commit(ctx, edged.Change{Events: evs})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range stored {
			committed[e.Seq] = e
		}
	}
	stats := db.OutboxStats(time.Now())
	if stats.Dropped == 0 {
		t.Fatalf("nothing dropped (outbox %d bytes); the quota is not tested", stats.Bytes)
	}
	last := stats.LastSeq

	p.Restore()
	waitFor(t, 60*time.Second, "the outbox drained", func() bool {
		seqs, _ := c.events(eventsTopic)
		return len(seqs) > 0 && seqs[len(seqs)-1] == last && db.OutboxStats(time.Now()).Events == 0
	})

	seqs, payloads := c.events(eventsTopic)
	got := map[uint64]edged.Event{}
	var prev uint64
	for _, s := range seqs {
		if _, seen := got[s]; seen {
			continue
		}
		if s <= prev {
			t.Fatalf("seq %d after %d", s, prev)
		}
		prev = s
		var e edged.Event
		json.Unmarshal([]byte(payloads[s]), &e)
		got[s] = e
	}
	var dropped uint64
	var ranges []edged.OutboxDroppedData
	for _, e := range got {
		if e.Type == edged.EventOutboxDropped {
			var d edged.OutboxDroppedData
			json.Unmarshal(e.Data, &d)
			dropped += d.Count
			ranges = append(ranges, d)
		}
	}
	missing := 0
	for seq, e := range committed {
		g, ok := got[seq]
		if ok {
			if g.Type != e.Type || string(g.Data) != string(e.Data) {
				t.Errorf("seq %d: got %s %s, want %s %s", seq, g.Type, g.Data, e.Type, e.Data)
			}
			continue
		}
		missing++
		if !e.Type.Droppable() {
			t.Errorf("seq %d (%s) was dropped", seq, e.Type)
		}
		inRange := false
		for _, r := range ranges {
			inRange = inRange || (seq >= r.FirstSeq && seq <= r.LastSeq)
		}
		if !inRange {
			t.Errorf("seq %d is missing but no outbox.dropped covers it", seq)
		}
	}
	if uint64(missing) != dropped {
		t.Errorf("missing %d events, outbox.dropped counts %d", missing, dropped)
	}
	t.Logf("%d events committed under a 128 KiB quota: %d delivered, %d dropped in %d outbox.dropped events",
		len(committed), len(got)-len(ranges), missing, len(ranges))
}
