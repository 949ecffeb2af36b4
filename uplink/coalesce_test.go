package uplink

import (
	"encoding/json"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// sameTickStates is an edged.StateSource whose changes all carry one
// UpdatedAt, as two changes within one millisecond do: only their Version
// tells them apart.
type sameTickStates struct {
	mu      sync.Mutex
	states  map[string]edged.DeviceState
	version uint64
	changed chan struct{}
}

var sameTick = time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)

func (f *sameTickStates) set(id string, status edged.Status, n float64) {
	f.mu.Lock()
	f.version++
	f.states[id] = edged.DeviceState{DeviceID: id, Kind: "chair", Transport: edged.TransportMQTT, Online: true,
		Status: status, Telemetry: map[string]any{"n": n}, UpdatedAt: sameTick, Version: f.version}
	f.mu.Unlock()
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

func (f *sameTickStates) DeviceStates() []edged.DeviceState {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]edged.DeviceState, 0, len(f.states))
	for _, s := range f.states {
		out = append(out, s.Clone())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].DeviceID < out[j].DeviceID })
	return out
}

func (f *sameTickStates) StatesChanged() <-chan struct{} { return f.changed }

func (f *sameTickStates) ChangedSince(v uint64) ([]edged.DeviceState, uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return changedSince(f.states, v), f.version
}

// TestCoalesceSameMillisecond: states that change twice within one
// millisecond (same UpdatedAt) still leave the cloud with the latest one,
// both when the second change comes after the first was published and
// when it replaces the first before it was (§3.4).
func TestCoalesceSameMillisecond(t *testing.T) {
	m := startMosquitto(t, "")
	c := newCloud(t, m.addr, deviceTopic+"#")
	s := newStation()
	states := &sameTickStates{states: map[string]edged.DeviceState{}, changed: make(chan struct{}, 1)}
	states.set("chair-1", edged.StatusIdle, 1)
	cfg := s.config(t, "tcp://"+m.addr)
	cfg.States = states
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)

	// last returns the status and n of the last message for id, and how
	// many messages id had.
	last := func(id string) (status string, n float64, count int) {
		for _, msg := range c.messages() {
			if msg.topic != deviceTopic+id {
				continue
			}
			var st struct {
				Status    string         `json:"status"`
				Telemetry map[string]any `json:"telemetry"`
				UpdatedAt time.Time      `json:"updated_at"`
			}
			if err := json.Unmarshal(msg.payload, &st); err != nil {
				t.Fatalf("state of %s: %v", id, err)
			}
			if !st.UpdatedAt.Equal(sameTick) {
				t.Fatalf("updated_at %v, want %v: the test's premise", st.UpdatedAt, sameTick)
			}
			status, n, count = st.Status, st.Telemetry["n"].(float64), count+1
		}
		return status, n, count
	}
	// settled waits until a state of a marker device, changed after
	// everything else, reached the cloud: the uplink publishes in order,
	// so whatever was due before it has been sent by then.
	marker := 0.0
	settled := func() {
		t.Helper()
		marker++
		states.set("marker", edged.StatusIdle, marker)
		waitFor(t, 10*time.Second, "the marker state", func() bool { _, n, _ := last("marker"); return n == marker })
	}

	waitFor(t, 10*time.Second, "the first state", func() bool { _, n, _ := last("chair-1"); return n == 1 })

	// A second change after the first was published.
	states.set("chair-1", edged.StatusInUse, 2)
	settled()
	if status, n, _ := last("chair-1"); status != "in_use" || n != 2 {
		t.Fatalf("cloud's last state of chair-1: %s n=%v, want in_use n=2", status, n)
	}

	// Two more, back to back: the second may replace the first before it
	// is published, never the other way round.
	_, _, before := last("chair-1")
	states.set("chair-1", edged.StatusFault, 3)
	states.set("chair-1", edged.StatusIdle, 4)
	settled()
	status, n, count := last("chair-1")
	if status != "idle" || n != 4 {
		t.Fatalf("cloud's last state of chair-1: %s n=%v, want idle n=4", status, n)
	}
	if got := count - before; got < 1 || got > 2 {
		t.Errorf("%d messages for two changes, want 1 or 2", got)
	}
}
