package edged_test

import (
	"crypto/ed25519"
	"encoding/json"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// relayHarness is a harness whose station verifies signatures with a key
// the test signs with.
type relayHarness struct {
	*harness
	priv ed25519.PrivateKey
}

func newRelayHarness(t *testing.T, withKey bool) *relayHarness {
	pub, priv, _ := ed25519.GenerateKey(nil)
	h := newHarness(t, func(o *edged.StationOptions) {
		if withKey {
			o.VerifyKey = pub
		}
	})
	return &relayHarness{harness: h, priv: priv}
}

// sign adds sig to m, signed for station.
func (h *relayHarness) sign(station string, m map[string]any) map[string]any {
	rm := edged.RentalMessage{Op: m["op"].(string), RentalID: m["rental_id"].(string),
		DeviceID: m["device_id"].(string), RenterID: m["renter_id"].(string)}
	if d, ok := m["duration_s"].(int); ok {
		rm.DurationS = int64(d)
	}
	if na, ok := m["not_after"].(string); ok {
		rm.NotAfter = na
	}
	m["sig"] = edged.SignRental(h.priv, station, rm)
	return m
}

// relay has device dev relay msg.
func (h *relayHarness) relay(dev string, msg map[string]any) {
	h.t.Helper()
	b, _ := json.Marshal(msg)
	if err := h.st.RelayRental(ctx, dev, b); err != nil {
		h.t.Fatal(err)
	}
}

// answers takes the commands sent so far and returns the rental_result
// answers among them, by device, and the other commands' actions.
func (h *relayHarness) answers() (map[string][]edged.RentalResultArgs, []string) {
	h.t.Helper()
	got := map[string][]edged.RentalResultArgs{}
	var other []string
	for _, s := range h.dev.take() {
		if s.Cmd.Action != edged.ActionRentalResult {
			other = append(other, s.Device+":"+s.Cmd.Action)
			continue
		}
		if !edged.ValidToken(s.Cmd.CmdID) {
			h.t.Errorf("rental_result without a valid cmd_id: %+v", s.Cmd)
		}
		var a edged.RentalResultArgs
		if err := json.Unmarshal(s.Cmd.Args, &a); err != nil {
			h.t.Fatalf("rental_result args %s: %v", s.Cmd.Args, err)
		}
		got[s.Device] = append(got[s.Device], a)
	}
	return got, other
}

// Each refusal of a relayed message is answered to the relaying device with
// the reason, recorded as a rental.result via device, and starts nothing.
func TestRelayRefusals(t *testing.T) {
	past := "2026-11-27T09:00:00Z" // the harness clock is at 10:00, synchronized
	cases := []struct {
		name   string
		noKey  bool
		msg    func(h *relayHarness) map[string]any
		reason edged.Reason
		device string // in the answer: the message's device_id
	}{
		{name: "no verify key", noKey: true, msg: func(h *relayHarness) map[string]any {
			return h.sign("mall-1", grant("r", "chair-1", "alice", 60))
		}, reason: edged.ReasonBadSignature},
		{name: "another device", msg: func(h *relayHarness) map[string]any {
			return h.sign("mall-1", grant("r", "chair-2", "alice", 60))
		}, reason: edged.ReasonInvalid, device: "chair-2"},
		{name: "another station's signature", msg: func(h *relayHarness) map[string]any {
			return h.sign("mall-2", grant("r", "chair-1", "alice", 60))
		}, reason: edged.ReasonBadSignature},
		{name: "tampered", msg: func(h *relayHarness) map[string]any {
			m := h.sign("mall-1", grant("r", "chair-1", "alice", 60))
			m["duration_s"] = 6000
			return m
		}, reason: edged.ReasonBadSignature},
		{name: "unsigned", msg: func(h *relayHarness) map[string]any { return grant("r", "chair-1", "alice", 60) },
			reason: edged.ReasonBadSignature},
		{name: "expired not_after", msg: func(h *relayHarness) map[string]any {
			m := grant("r", "chair-1", "alice", 60)
			m["not_after"] = past
			return h.sign("mall-1", m)
		}, reason: edged.ReasonExpired},
		{name: "not a rental message", msg: func(h *relayHarness) map[string]any {
			return map[string]any{"op": "grant", "rental_id": "r", "device_id": "chair-1", "renter_id": "alice"}
		}, reason: edged.ReasonInvalid},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newRelayHarness(t, !tc.noKey)
			h.online("chair-1", edged.StatusIdle)
			h.online("chair-2", edged.StatusIdle)
			h.dev.take()
			seq := h.lastSeq()
			h.relay("chair-1", tc.msg(h))
			got, other := h.answers()
			want := tc.device
			if want == "" {
				want = "chair-1"
			}
			if len(other) != 0 {
				t.Errorf("a refused relay sent %v", other)
			}
			a := got["chair-1"]
			if len(got) != 1 || len(a) != 1 || a[0].OK || a[0].Reason != tc.reason || a[0].RentalID != "r" || a[0].Op != "grant" || a[0].DeviceID != want {
				t.Fatalf("answers = %+v, want chair-1 told grant r refused %s (device %s)", got, tc.reason, want)
			}
			evs := h.since(seq)
			if len(evs) != 1 || evs[0].Type != edged.EventRentalResult || evs[0].Data["via"] != "device" ||
				evs[0].Data["reason"] != string(tc.reason) || evs[0].Data["ok"] != false {
				t.Fatalf("events = %+v, want one rental.result via device, %s", evs, tc.reason)
			}
			if st, _ := h.st.Device("chair-1"); st.Rental != nil {
				t.Fatalf("chair-1 has a rental: %+v", st.Rental)
			}
		})
	}
}

// A good relayed grant starts the device and is answered ok once the start
// is acknowledged; the rental runs its time; a replay of the ended rental,
// by the device or by the cloud, gets the same result and starts nothing.
func TestRelayedGrant(t *testing.T) {
	h := newRelayHarness(t, true)
	h.online("chair-1", edged.StatusIdle)
	h.dev.take()
	seq := h.lastSeq()
	g := h.sign("mall-1", grant("r1", "chair-1", "alice", 60))
	h.relay("chair-1", g)

	start := h.ack("chair-1", "start", true)
	if start.DurationS != 60 || start.RentalID != "r1" || start.RenterID != "alice" {
		t.Fatalf("start = %+v", start)
	}
	// ack consumed the commands sent before it; the answer follows the ack.
	got, other := h.answers()
	if a := got["chair-1"]; len(a) != 1 || !a[0].OK || a[0].RentalID != "r1" || a[0].Op != "grant" || a[0].DeviceID != "chair-1" || a[0].Reason != "" {
		t.Fatalf("answers = %+v (others %v), want grant r1 ok on chair-1", got, other)
	}
	if rs := h.st.ActiveRentals(); len(rs) != 1 || rs[0].Via != edged.ViaDevice {
		t.Fatalf("active rentals = %+v, want r1 via device", rs)
	}
	evs := h.since(seq)
	if len(evs) != 2 || evs[0].Type != edged.EventRentalResult || evs[0].Data["via"] != "device" || evs[0].Data["ok"] != true ||
		evs[1].Type != edged.EventRentalStarted {
		t.Fatalf("events = %+v, want rental.result ok via device, rental.started", evs)
	}

	h.tick(60 * time.Second)
	if _, other := h.answers(); len(other) != 1 || other[0] != "chair-1:stop" {
		t.Fatalf("at the end sent %v, want a stop", other)
	}
	if st, _ := h.st.Device("chair-1"); st.Rental != nil {
		t.Fatalf("rental still bound: %+v", st.Rental)
	}
	if err := h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusIdle}); err != nil {
		t.Fatal(err)
	}
	h.dev.take()

	// Replays: the same result, nothing started, no rental bound.
	seq = h.lastSeq()
	h.relay("chair-1", g)
	got, other = h.answers()
	if a := got["chair-1"]; len(a) != 1 || !a[0].OK || len(other) != 0 {
		t.Fatalf("replay by the device: answers %+v, other commands %v; want the same ok, nothing else", got, other)
	}
	b, _ := json.Marshal(g)
	if err := h.st.Rental(ctx, b); err != nil {
		t.Fatal(err)
	}
	got, other = h.answers()
	if len(got) != 0 || len(other) != 0 {
		t.Fatalf("the cloud's copy sent %+v %v, want nothing", got, other)
	}
	evs = h.since(seq)
	if types(evs)[0] != "rental.result" || len(evs) != 2 || results(evs)[0] != "ok" || results(evs)[1] != "ok" {
		t.Fatalf("replays logged %+v, want two rental.result ok", evs)
	}
	if evs[0].Data["via"] != "device" || evs[1].Data["via"] != nil {
		t.Fatalf("via = %v then %v, want device then none (the cloud's copy)", evs[0].Data["via"], evs[1].Data["via"])
	}
	if st, _ := h.st.Device("chair-1"); st.Rental != nil {
		t.Fatalf("a replay bound a rental: %+v", st.Rental)
	}
	if n := h.st.Stats().Started; n != 1 {
		t.Fatalf("%d rentals started, want 1", n)
	}
}

// A relayed grant whose start is never acknowledged is answered timeout.
func TestRelayedGrantStartTimeout(t *testing.T) {
	h := newRelayHarness(t, true)
	h.online("chair-1", edged.StatusIdle)
	h.dev.take()
	h.relay("chair-1", h.sign("mall-1", grant("r1", "chair-1", "alice", 60)))
	h.tick(5 * time.Second)
	got, _ := h.answers()
	if a := got["chair-1"]; len(a) != 1 || a[0].OK || a[0].Reason != edged.ReasonTimeout {
		t.Fatalf("answers = %+v, want timeout", got)
	}
}

// While the store cannot write, a relayed grant is answered unavailable at
// once and taken (no error: the device has its answer); its record is
// written once the store recovers.
func TestRelayWhileStoreCannotWrite(t *testing.T) {
	h := newRelayHarness(t, true)
	h.online("chair-1", edged.StatusIdle)
	h.dev.take()
	seq := h.lastSeq()
	h.store.setFail(errDiskFull)
	b, _ := json.Marshal(h.sign("mall-1", grant("r1", "chair-1", "alice", 60)))
	if err := h.st.RelayRental(ctx, "chair-1", b); err != nil {
		t.Fatalf("relay on a full disk: %v, want it taken and answered", err)
	}
	got, other := h.answers()
	if a := got["chair-1"]; len(a) != 1 || a[0].OK || a[0].Reason != edged.ReasonUnavailable || len(other) != 0 {
		t.Fatalf("answers = %+v, other commands %v; want unavailable and nothing started", got, other)
	}
	h.store.setFail(nil)
	h.tick(10 * time.Second)
	evs := h.since(seq)
	if len(evs) != 1 || evs[0].Data["reason"] != "unavailable" || evs[0].Data["via"] != "device" {
		t.Fatalf("written after recovery: %+v, want the refusal via device", evs)
	}
}
