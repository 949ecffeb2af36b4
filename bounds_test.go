package edged_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
)

// fields returns a flat JSON object of n fields named prefix0.. with value v.
func fields(prefix string, n int, v any) map[string]any {
	m := make(map[string]any, n)
	for i := 0; i < n; i++ {
		m[fmt.Sprintf("%s%d", prefix, i)] = v
	}
	return m
}

func payload(t *testing.T, m map[string]any) []byte {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestStateBoundsParse: a state or telemetry report that breaks a bound of
// §2 is refused whole as invalid; one at the bounds is taken.
func TestStateBoundsParse(t *testing.T) {
	name64 := strings.Repeat("k", 64)
	tests := []struct {
		name string
		m    map[string]any
		ok   bool
	}{
		{"64 fields", fields("f", 64, 1), true},
		{"65 fields", fields("f", 65, 1), false},
		{"name of 64 bytes", map[string]any{name64: 1}, true},
		{"name of 65 bytes", map[string]any{name64 + "k": 1}, false},
		{"empty name", map[string]any{"": 1}, false},
		{"name with slash", map[string]any{"a/b": 1}, false},
		{"name with plus", map[string]any{"a+b": 1}, false},
		{"name with hash", map[string]any{"a#b": 1}, false},
		{"name with a control character", map[string]any{"a\x01b": 1}, false},
		{"name of 64 bytes that JSON escapes to more", map[string]any{strings.Repeat("<", 64): 1}, false},
		{"string of 256 bytes", map[string]any{"s": strings.Repeat("a", 256)}, true},
		{"string of 256 bytes in 128 characters", map[string]any{"s": strings.Repeat("é", 128)}, true},
		{"string of 257 bytes", map[string]any{"s": strings.Repeat("a", 257)}, false},
		{"string of 60,000 bytes", map[string]any{"s": strings.Repeat("a", 60000)}, false},
		{"string of 100 bytes that JSON escapes to 600", map[string]any{"s": strings.Repeat("<", 100)}, false},
		{"string of 100 control characters", map[string]any{"s": strings.Repeat("\x01", 100)}, false},
		{"string escaped to exactly 256 bytes", map[string]any{"s": strings.Repeat("<", 42) + "abcd"}, true},
		{"one bad field among good ones", func() map[string]any {
			m := fields("f", 10, 1)
			m["s"] = strings.Repeat("a", 300)
			return m
		}(), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := edged.ParseTelemetry(payload(t, tt.m))
			if (err == nil) != tt.ok {
				t.Errorf("telemetry: err = %v, want ok %v", err, tt.ok)
			}
			if err != nil && edged.ErrorCode(err) != edged.EINVALID {
				t.Errorf("telemetry: code %q, want %q", edged.ErrorCode(err), edged.EINVALID)
			}
			// The same fields as the extras of a state report.
			st := map[string]any{"status": "idle", "ts": "2026-11-27T10:00:00Z"}
			for k, v := range tt.m {
				st[k] = v
			}
			r, err := edged.ParseState(payload(t, st))
			if (err == nil) != tt.ok {
				t.Errorf("state: err = %v, want ok %v", err, tt.ok)
			}
			if err == nil && len(r.Extra) != len(tt.m) {
				t.Errorf("state: %d extra fields kept, want %d", len(r.Extra), len(tt.m))
			}
		})
	}
}

// TestTelemetryMergeBound: a report that would take a device's telemetry
// over 64 fields is refused as invalid and changes nothing, neither the
// device's telemetry nor its status nor when it was last seen; the next
// report within the bounds is taken, and other devices are unaffected.
func TestTelemetryMergeBound(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.online("chair-2", edged.StatusIdle)
	if err := h.st.DeviceTelemetry(ctx, "chair-1", fields("a", 60, 1.0)); err != nil {
		t.Fatal(err)
	}
	before, _ := h.st.Device("chair-1")
	before = before.Clone()
	h.clock.Advance(time.Second)

	err := h.st.DeviceTelemetry(ctx, "chair-1", fields("b", 5, 2.0))
	if edged.ErrorCode(err) != edged.EINVALID {
		t.Fatalf("telemetry to 65 fields: err = %v, want invalid", err)
	}
	err = h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusFault, Fault: "e1", Extra: fields("c", 5, "x")})
	if edged.ErrorCode(err) != edged.EINVALID {
		t.Fatalf("state to 65 fields: err = %v, want invalid", err)
	}
	after, _ := h.st.Device("chair-1")
	if diff := cmp.Diff(before, after); diff != "" || after.Version != before.Version {
		t.Fatalf("a refused report changed the device (-before +after):\n%s", diff)
	}

	// Updating the 60 fields and adding 4 reaches the bound exactly.
	m := fields("a", 60, 3.0)
	for k, v := range fields("b", 4, 4.0) {
		m[k] = v
	}
	if err := h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusIdle, Extra: m}); err != nil {
		t.Fatalf("state to 64 fields: %v", err)
	}
	after, _ = h.st.Device("chair-1")
	if len(after.Telemetry) != 64 || after.Telemetry["a0"] != 3.0 || after.Telemetry["b3"] != 4.0 {
		t.Fatalf("telemetry = %v, want 64 fields with the update", after.Telemetry)
	}

	if err := h.st.DeviceTelemetry(ctx, "chair-2", fields("z", 64, true)); err != nil {
		t.Fatalf("another device's telemetry: %v", err)
	}
}

// TestLargestDeviceState: nothing a device sends makes its state, as JSON,
// more than about 20 KiB (§2). The largest state is built from what the
// bounds let through: 64 fields with the longest names and strings, in
// plain and in escaped characters, the longest fault code, a rental with
// the longest ids, and a location.
func TestLargestDeviceState(t *testing.T) {
	const limit = 24 << 10
	largest := 0
	for _, filler := range []string{"a", "<", "\x01", "é", "\u2028", "\"", "\\"} {
		// fill repeats filler as far as a bound of n bytes allows.
		fill := func(filler string, n int) string {
			s := ""
			for len(s+filler) <= n && jsonLen(s+filler) <= n {
				s += filler
			}
			return s
		}
		nameFiller := filler
		if _, err := edged.ParseTelemetry(payload(t, map[string]any{"k" + filler: 1})); err != nil {
			nameFiller = "k" // not allowed in names: fill them with plain text
		}
		state := map[string]any{"status": "idle", "fault": strings.Repeat(filler, 128/len(filler)), "ts": "2026-11-27T10:00:00.123456789Z"}
		for i := 0; i < edged.MaxTelemetryKeys; i++ {
			state[fmt.Sprintf("%02d", i)+fill(nameFiller, 62)] = fill(filler, 256)
		}
		r, err := edged.ParseState(payload(t, state))
		if err != nil {
			t.Fatalf("filler %q: %v", filler, err)
		}

		h := newHarness(t)
		h.online("chair-1", edged.StatusIdle)
		h.rental(grant(strings.Repeat("<", 128), "chair-1", strings.Repeat("&", 128), 600))
		h.ack("chair-1", "start", true)
		if err := h.st.DeviceState(ctx, "chair-1", r); err != nil {
			t.Fatalf("filler %q: %v", filler, err)
		}
		acc := -1e-300
		if err := h.st.DeviceLocation(ctx, "chair-1", edged.Location{Lat: -89.123456789012345, Lon: -179.12345678901234, AccuracyM: &acc, TS: "2026-11-27T10:00:00.123456789Z"}); err != nil {
			t.Fatal(err)
		}
		st, _ := h.st.Device("chair-1")
		if len(st.Telemetry) != edged.MaxTelemetryKeys || st.Rental == nil {
			t.Fatalf("filler %q: state holds %d fields, rental %v: not the largest", filler, len(st.Telemetry), st.Rental)
		}
		// A fault ends the rental, so a state holds one or the other;
		// count both.
		st.Fault = r.Fault
		out, err := json.Marshal(st)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("filler %q: state of %d bytes", filler, len(out))
		largest = max(largest, len(out))
		if len(out) >= limit {
			t.Errorf("filler %q: device state of %d bytes, want under %d", filler, len(out), limit)
		}
	}
	if largest < 20<<10 {
		t.Errorf("largest state %d bytes: the test did not reach the bounds", largest)
	}
}

// jsonLen is the length of s as json.Marshal writes it, quotes excluded.
func jsonLen(s string) int {
	b, _ := json.Marshal(s)
	return len(b) - 2
}

// TestBoundTelemetry: telemetry restored from a store written before the
// bounds is cut back to them.
func TestBoundTelemetry(t *testing.T) {
	m := fields("f", 70, 1.0)
	m["big"] = strings.Repeat("a", 60000)
	m["a/b"] = 1.0
	m["nested"] = map[string]any{"x": 1}
	if got, want := edged.BoundTelemetry(m), 3+(70-64); got != want { // 3 bad ones, then 6 over the count
		t.Errorf("removed %d fields, want %d", got, want)
	}
	if len(m) != edged.MaxTelemetryKeys || m["big"] != nil {
		t.Errorf("kept %d fields (big kept: %v), want %d", len(m), m["big"] != nil, edged.MaxTelemetryKeys)
	}
}

// TestRestoredTelemetryIsBounded: a state saved unbounded (by an older
// edged) comes back within the bounds, so it cannot reach the cloud.
func TestRestoredTelemetryIsBounded(t *testing.T) {
	h := newHarness(t)
	tel := fields("f", 10, 1.0)
	tel["big"] = strings.Repeat("a", 60000)
	h.store.SaveDeviceState(edged.DeviceState{DeviceID: "chair-1", Status: edged.StatusIdle, Telemetry: tel})
	h.restart()
	st, _ := h.st.Device("chair-1")
	if len(st.Telemetry) != 10 || st.Telemetry["big"] != nil {
		t.Errorf("restored telemetry has %d fields (big kept: %v), want the 10 small ones", len(st.Telemetry), st.Telemetry["big"] != nil)
	}
}

// TestDeviceEventSizeAsSent: a device event is bounded by its size as it
// goes upstream, where json.Marshal escapes '<', '>' and '&' as six bytes,
// so no event message can be several times the 64 KiB payload limit.
func TestDeviceEventSizeAsSent(t *testing.T) {
	tests := []struct {
		name  string
		fill  string
		bytes int
		ok    bool
	}{
		{"60 KiB of plain text", "a", 60 << 10, true},
		{"12 KiB of '<', 72 KiB escaped", "<", 12 << 10, false},
		{"10 KiB of '&', 60 KiB escaped", "&", 10 << 10, true},
		{"8 KiB of U+2028, 16 KiB escaped", "\u2028", 8 << 10, true},
		{"30 KiB of U+2028, 60 KiB escaped", "\u2028", 30 << 10, true},
		{"36 KiB of U+2029, 72 KiB escaped", "\u2029", 36 << 10, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Raw characters, as a device may send them (json.Marshal
			// would send them escaped).
			b := []byte(`{"type":"note","text":"` + strings.Repeat(tt.fill, tt.bytes/len(tt.fill)) + `"}`)
			raw, err := edged.ParseDeviceEvent(b)
			if (err == nil) != tt.ok {
				t.Fatalf("err = %v, want ok %v", err, tt.ok)
			}
			if err != nil {
				return
			}
			// The event as the uplink sends it.
			env, _ := json.Marshal(edged.DeviceEventData{DeviceID: "chair-1", Event: raw})
			if len(env) > edged.MaxPayload+256 {
				t.Errorf("event data of %d bytes, over the payload limit", len(env))
			}
		})
	}
}
