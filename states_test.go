package edged_test

import (
	"context"
	"testing"

	"github.com/stationedge/edged"
)

// TestChangedSince: a reader with a cursor gets only the devices that
// changed after it, each once with its newest state, and a telemetry
// report does not modify a state a reader already holds.
func TestChangedSince(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	h.online("chair-1", edged.StatusIdle)
	h.online("chair-2", edged.StatusIdle)
	all := h.st.DeviceStates()
	var cursor uint64
	for _, s := range all {
		cursor = max(cursor, s.Version)
	}
	held, _ := h.st.Device("chair-1")
	if got, v := h.st.ChangedSince(cursor); len(got) != 0 || v != cursor {
		t.Fatalf("nothing changed: got %d states, version %d, want 0 and %d", len(got), v, cursor)
	}
	if err := h.st.DeviceTelemetry(ctx, "chair-1", map[string]any{"temp": 40.0}); err != nil {
		t.Fatal(err)
	}
	if err := h.st.DeviceTelemetry(ctx, "chair-3", map[string]any{"temp": 41.0}); err != nil {
		t.Fatal(err)
	}
	if err := h.st.DeviceTelemetry(ctx, "chair-1", map[string]any{"temp": 42.0}); err != nil {
		t.Fatal(err)
	}
	got, v := h.st.ChangedSince(cursor)
	if len(got) != 2 || got[0].DeviceID != "chair-3" || got[1].DeviceID != "chair-1" {
		t.Fatalf("changed since %d: got %+v, want chair-3 then chair-1", cursor, got)
	}
	if got[1].Telemetry["temp"] != 42.0 || got[1].Version != v {
		t.Errorf("chair-1: got temp %v version %d, want 42 and %d", got[1].Telemetry["temp"], got[1].Version, v)
	}
	if _, ok := held.Telemetry["temp"]; ok {
		t.Errorf("a state a reader held was modified: %v", held.Telemetry)
	}
	if again, _ := h.st.ChangedSince(v); len(again) != 0 {
		t.Errorf("nothing changed since %d: got %d states", v, len(again))
	}
}
