package edged_test

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

var ctx = context.Background()

// harness is a station on a fake store, clock and device link, with three
// MQTT devices: chair-1, chair-2 and chair-3.
type harness struct {
	t     *testing.T
	st    *edged.Station
	store *memStore
	clock *fakeClock
	dev   *fakeDevices
	key   ed25519.PrivateKey
	opts  edged.StationOptions
}

func newHarness(t *testing.T, mod ...func(*edged.StationOptions)) *harness {
	t.Helper()
	h := &harness{t: t, store: newMemStore(), dev: &fakeDevices{},
		clock: &fakeClock{now: time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC), synced: true}}
	h.opts = edged.StationOptions{
		ID: "mall-1", Store: h.store, Commander: h.dev, Clock: h.clock, StartTimeout: 5 * time.Second,
		Devices: []edged.Device{
			{ID: "chair-1", Kind: "chair", Transport: edged.TransportMQTT},
			{ID: "chair-2", Kind: "chair", Transport: edged.TransportMQTT},
			{ID: "chair-3", Kind: "chair", Transport: edged.TransportMQTT},
		},
	}
	for _, m := range mod {
		m(&h.opts)
	}
	h.restart()
	return h
}

// restart builds a new Station on the same store, as after a crash.
func (h *harness) restart() {
	h.t.Helper()
	st, err := edged.NewStation(h.opts)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := st.Open(ctx); err != nil {
		h.t.Fatal(err)
	}
	h.st = st
}

func (h *harness) online(id string, status edged.Status) {
	h.t.Helper()
	if err := h.st.DeviceOnline(ctx, id, true); err != nil {
		h.t.Fatal(err)
	}
	if err := h.st.DeviceState(ctx, id, edged.StateReport{Status: status}); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) rental(msg map[string]any) {
	h.t.Helper()
	b, _ := json.Marshal(msg)
	if err := h.st.Rental(ctx, b); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) command(msg map[string]any) {
	h.t.Helper()
	b, _ := json.Marshal(msg)
	if err := h.st.RenterCommand(ctx, b); err != nil {
		h.t.Fatal(err)
	}
}

func grant(id, dev, renter string, dur int) map[string]any {
	return map[string]any{"op": "grant", "rental_id": id, "device_id": dev, "renter_id": renter, "duration_s": dur}
}

// ack answers the last command of the given action sent to dev.
func (h *harness) ack(dev, action string, ok bool) edged.DeviceCommand {
	h.t.Helper()
	c := h.sent(dev, action)
	if err := h.st.DeviceAck(ctx, dev, edged.CommandAck{CmdID: c.CmdID, OK: ok}); err != nil {
		h.t.Fatal(err)
	}
	return c
}

// sent takes the commands sent so far and returns the one of the given
// action sent to dev.
func (h *harness) sent(dev, action string) edged.DeviceCommand {
	h.t.Helper()
	for _, s := range h.dev.take() {
		if s.Device == dev && s.Cmd.Action == action {
			return s.Cmd
		}
	}
	h.t.Fatalf("no %s sent to %s", action, dev)
	return edged.DeviceCommand{}
}

// since returns the events logged after seq.
func (h *harness) since(seq uint64) []decoded {
	evs, _ := h.store.Events(ctx, seq, 0)
	return decode(h.t, evs)
}

func (h *harness) lastSeq() uint64 {
	evs := h.store.all()
	if len(evs) == 0 {
		return 0
	}
	return evs[len(evs)-1].Seq
}

func (h *harness) tick(d time.Duration) {
	h.clock.Advance(d)
	h.st.Tick(ctx)
}

// results returns the rental.result and command.result reasons among evs,
// "ok" for a success.
func results(evs []decoded) []string {
	var out []string
	for _, e := range evs {
		if e.Type != edged.EventRentalResult && e.Type != edged.EventCommandResult {
			continue
		}
		if e.Data["ok"] == true {
			out = append(out, "ok")
		} else {
			out = append(out, fmt.Sprint(e.Data["reason"]))
		}
	}
	return out
}

func types(evs []decoded) []string {
	var out []string
	for _, e := range evs {
		out = append(out, string(e.Type))
	}
	return out
}

func TestWholeOfflineRental(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	start := h.lastSeq()

	h.rental(grant("r1", "chair-1", "alice", 600))
	cmd := h.ack("chair-1", "start", true)
	if cmd.DurationS != 600 || cmd.RentalID != "r1" || cmd.RenterID != "alice" {
		t.Fatalf("start = %+v, want duration 600 for r1/alice", cmd)
	}
	st, _ := h.st.Device("chair-1")
	if st.Rental == nil || st.Rental.RenterID != "alice" {
		t.Fatalf("device rental = %+v, want alice's", st.Rental)
	}

	h.command(map[string]any{"cmd_id": "c1", "device_id": "chair-1", "renter_id": "alice", "action": "massage", "args": map[string]any{"level": 3}})
	fwd := h.dev.take()
	if len(fwd) != 1 || fwd[0].Cmd.Action != "massage" || string(fwd[0].Cmd.Args) != `{"level":3}` {
		t.Fatalf("forwarded = %+v, want massage with args", fwd)
	}
	if err := h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: "c1", OK: true}); err != nil {
		t.Fatal(err)
	}
	h.command(map[string]any{"cmd_id": "c2", "device_id": "chair-1", "renter_id": "mallory", "action": "massage"})
	if got := h.dev.take(); len(got) != 0 {
		t.Fatalf("another renter's command reached the device: %+v", got)
	}

	h.tick(599 * time.Second)
	if got := h.dev.take(); len(got) != 0 {
		t.Fatalf("sent before the end: %+v", got)
	}
	h.tick(time.Second)
	stops := h.dev.take()
	if len(stops) != 1 || stops[0].Cmd.Action != "stop" {
		t.Fatalf("at the end sent %+v, want one stop", stops)
	}

	evs := h.since(start)
	want := []string{"rental.result", "rental.started", "command.result", "command.result", "rental.ended"}
	if got := types(evs); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("events = %v, want %v", got, want)
	}
	if got := results(evs); strings.Join(got, " ") != "ok ok not_renter" {
		t.Fatalf("results = %v", got)
	}
	end := evs[len(evs)-1].Data
	if end["reason"] != "expired" || end["used_s"] != 600.0 {
		t.Fatalf("rental.ended = %v, want expired after 600 s", end)
	}
	stats := h.st.Stats()
	if stats.Started != 1 || stats.Ended[edged.ReasonExpired] != 1 || stats.Results["ok"] != 1 || stats.Commands["not_renter"] != 1 {
		t.Fatalf("stats = %+v", stats)
	}
	for i, e := range h.since(0) {
		if e.Seq != uint64(i+1) {
			t.Fatalf("event %d has seq %d", i, e.Seq)
		}
	}
}

func TestRefusals(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	signed := func(station string, m map[string]any) map[string]any {
		rm := edged.RentalMessage{Op: m["op"].(string), RentalID: m["rental_id"].(string),
			DeviceID: m["device_id"].(string), RenterID: m["renter_id"].(string)}
		if d, ok := m["duration_s"].(int); ok {
			rm.DurationS = int64(d)
		}
		if na, ok := m["not_after"].(string); ok {
			rm.NotAfter = na
		}
		m["sig"] = edged.SignRental(priv, station, rm)
		return m
	}
	past := "2026-11-27T09:00:00Z"
	cases := []struct {
		name   string
		key    bool
		setup  func(h *harness)
		msg    func() map[string]any
		want   string
		unsync bool
	}{
		{name: "unknown device", msg: func() map[string]any { return grant("r", "nope", "a", 60) }, want: "unknown_device"},
		{name: "offline", msg: func() map[string]any { return grant("r", "chair-2", "a", 60) }, want: "device_offline"},
		{name: "busy with a rental", setup: func(h *harness) {
			h.rental(grant("r0", "chair-1", "a", 60))
		}, msg: func() map[string]any { return grant("r", "chair-1", "b", 60) }, want: "device_busy"},
		{name: "busy in use", setup: func(h *harness) { h.online("chair-3", edged.StatusInUse) },
			msg: func() map[string]any { return grant("r", "chair-3", "a", 60) }, want: "device_busy"},
		{name: "fault", setup: func(h *harness) { h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusFault}) },
			msg: func() map[string]any { return grant("r", "chair-1", "a", 60) }, want: "device_fault"},
		{name: "maintenance", setup: func(h *harness) { h.st.SetMaintenance(ctx, "chair-1", true) },
			msg: func() map[string]any { return grant("r", "chair-1", "a", 60) }, want: "maintenance"},
		{name: "zero duration", msg: func() map[string]any { return grant("r", "chair-1", "a", 0) }, want: "invalid"},
		{name: "slash in renter", msg: func() map[string]any { return grant("r", "chair-1", "a/b", 60) }, want: "invalid"},
		{name: "plus in rental", msg: func() map[string]any { return grant("r+1", "chair-1", "a", 60) }, want: "invalid"},
		{name: "hash in rental", msg: func() map[string]any { return grant("r#", "chair-1", "a", 60) }, want: "invalid"},
		{name: "control char", msg: func() map[string]any { return grant("r\x01", "chair-1", "a", 60) }, want: "invalid"},
		{name: "bad op", msg: func() map[string]any { m := grant("r", "chair-1", "a", 60); m["op"] = "steal"; return m }, want: "invalid"},
		{name: "duration as string", msg: func() map[string]any { m := grant("r", "chair-1", "a", 60); m["duration_s"] = "60"; return m }, want: "invalid"},
		{name: "fractional duration", msg: func() map[string]any { m := grant("r", "chair-1", "a", 60); m["duration_s"] = 1.5; return m }, want: "invalid"},
		{name: "missing signature", key: true, msg: func() map[string]any { return grant("r", "chair-1", "a", 60) }, want: "bad_signature"},
		{name: "wrong signature", key: true, msg: func() map[string]any {
			m := signed("mall-1", grant("r", "chair-1", "a", 60))
			m["duration_s"] = 6000
			return m
		}, want: "bad_signature"},
		{name: "signed for another station", key: true, msg: func() map[string]any { return signed("mall-2", grant("r", "chair-1", "a", 60)) }, want: "bad_signature"},
		{name: "signed ok", key: true, msg: func() map[string]any { return signed("mall-1", grant("r", "chair-1", "a", 60)) }, want: ""},
		{name: "expired", msg: func() map[string]any { m := grant("r", "chair-1", "a", 60); m["not_after"] = past; return m }, want: "expired"},
		{name: "expired not judged unsynced", unsync: true, msg: func() map[string]any {
			m := grant("r", "chair-1", "a", 60)
			m["not_after"] = past
			return m
		}, want: ""},
		{name: "extend unknown", msg: func() map[string]any {
			return map[string]any{"op": "extend", "rental_id": "zz", "device_id": "chair-1", "renter_id": "a", "duration_s": 60}
		}, want: "no_rental"},
		{name: "cancel by another renter", setup: func(h *harness) {
			h.rental(grant("r0", "chair-1", "a", 60))
			h.ack("chair-1", "start", true)
		}, msg: func() map[string]any {
			return map[string]any{"op": "cancel", "rental_id": "r0", "device_id": "chair-1", "renter_id": "b"}
		}, want: "not_renter"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(o *edged.StationOptions) {
				if tc.key {
					o.VerifyKey = pub
				}
			})
			h.clock.synced = !tc.unsync
			h.online("chair-1", edged.StatusIdle)
			if tc.setup != nil {
				tc.setup(h)
			}
			seq := h.lastSeq()
			h.rental(tc.msg())
			got := results(h.since(seq))
			if tc.want == "" {
				if len(got) != 0 {
					t.Fatalf("results = %v, want none before the ack", got)
				}
				h.ack("chair-1", "start", true)
				got = results(h.since(seq))
				if len(got) != 1 || got[0] != "ok" {
					t.Fatalf("results = %v, want ok", got)
				}
				return
			}
			if len(got) != 1 || got[0] != tc.want {
				t.Fatalf("results = %v, want [%s]", got, tc.want)
			}
		})
	}
}

func TestStartTimeoutAndDeviceError(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.online("chair-2", edged.StatusIdle)
	seq := h.lastSeq()

	h.rental(grant("r1", "chair-1", "a", 60))
	h.dev.take()
	h.tick(4 * time.Second)
	if got := results(h.since(seq)); len(got) != 0 {
		t.Fatalf("results before the timeout: %v", got)
	}
	h.tick(time.Second)
	if got := results(h.since(seq)); strings.Join(got, " ") != "timeout" {
		t.Fatalf("results = %v, want timeout", got)
	}
	sent := h.dev.take()
	if len(sent) != 1 || sent[0].Cmd.Action != "stop" {
		t.Fatalf("after timeout sent %+v, want stop", sent)
	}
	// Until the device acknowledges that stop, it takes no new rental.
	seq = h.lastSeq()
	h.rental(grant("r0", "chair-1", "a", 60))
	if got := results(h.since(seq)); strings.Join(got, " ") != "device_busy" {
		t.Fatalf("grant with a stop outstanding: results = %v, want device_busy", got)
	}
	if err := h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: sent[0].Cmd.CmdID, OK: true}); err != nil {
		t.Fatal(err)
	}

	seq = h.lastSeq()
	h.rental(grant("r2", "chair-2", "a", 60))
	h.ack("chair-2", "start", false)
	if got := results(h.since(seq)); strings.Join(got, " ") != "device_error" {
		t.Fatalf("results = %v, want device_error", got)
	}

	// The device is free again for a new rental.
	seq = h.lastSeq()
	h.rental(grant("r3", "chair-1", "a", 60))
	h.ack("chair-1", "start", true)
	if got := results(h.since(seq)); strings.Join(got, " ") != "ok" {
		t.Fatalf("results = %v, want ok", got)
	}
}

func TestRenterCommands(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.online("chair-2", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 600))
	h.ack("chair-1", "start", true)

	cmd := func(id, dev, renter, action string) map[string]any {
		return map[string]any{"cmd_id": id, "device_id": dev, "renter_id": renter, "action": action}
	}
	cases := []struct {
		name string
		msg  map[string]any
		want string
	}{
		{"no rental", cmd("c1", "chair-2", "alice", "massage"), "no_rental"},
		{"not renter", cmd("c2", "chair-1", "bob", "massage"), "not_renter"},
		{"unknown device", cmd("c3", "ghost", "alice", "massage"), "unknown_device"},
		{"start is the gateway's", cmd("c4", "chair-1", "alice", "start"), "unsupported"},
		{"bad cmd id", cmd("c/5", "chair-1", "alice", "massage"), "invalid"},
		{"not json", nil, "invalid"},
	}
	for _, tc := range cases {
		seq := h.lastSeq()
		if tc.msg == nil {
			if err := h.st.RenterCommand(ctx, []byte("{nope")); err != nil {
				t.Fatal(err)
			}
		} else {
			h.command(tc.msg)
		}
		if got := results(h.since(seq)); strings.Join(got, " ") != tc.want {
			t.Errorf("%s: results = %v, want %s", tc.name, got, tc.want)
		}
		if sent := h.dev.take(); len(sent) != 0 {
			t.Errorf("%s: sent %+v to a device", tc.name, sent)
		}
	}

	// A forwarded command the device never answers times out; one it
	// refuses is a device_error.
	seq := h.lastSeq()
	h.command(cmd("c6", "chair-1", "alice", "massage"))
	h.dev.take()
	h.tick(5 * time.Second)
	h.command(cmd("c7", "chair-1", "alice", "heat"))
	h.ack("chair-1", "heat", false)
	if got := results(h.since(seq)); strings.Join(got, " ") != "timeout device_error" {
		t.Fatalf("results = %v, want timeout device_error", got)
	}

	// A redelivered command reports its result again without reaching the
	// device twice.
	seq = h.lastSeq()
	h.command(cmd("c7", "chair-1", "alice", "heat"))
	if got := results(h.since(seq)); strings.Join(got, " ") != "device_error" {
		t.Fatalf("redelivery results = %v", got)
	}
	if sent := h.dev.take(); len(sent) != 0 {
		t.Fatalf("redelivery reached the device: %+v", sent)
	}

	// "end" ends the rental early.
	seq = h.lastSeq()
	h.tick(10 * time.Second)
	h.command(cmd("c8", "chair-1", "alice", "end"))
	evs := h.since(seq)
	if got := types(evs); strings.Join(got, " ") != "command.result rental.ended" {
		t.Fatalf("events = %v", got)
	}
	if evs[1].Data["reason"] != "renter_ended" {
		t.Fatalf("ended = %v, want renter_ended", evs[1].Data)
	}
	if sent := h.dev.take(); len(sent) != 1 || sent[0].Cmd.Action != "stop" {
		t.Fatalf("after end sent %+v, want stop", sent)
	}
}

func TestIdempotentRentalOps(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	g := grant("r1", "chair-1", "alice", 600)
	h.rental(g)
	h.rental(g) // redelivered while starting: nothing new
	if sent := h.dev.take(); len(sent) != 1 {
		t.Fatalf("starts sent = %d, want 1", len(sent))
	} else if err := h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: sent[0].Cmd.CmdID, OK: true}); err != nil {
		t.Fatal(err)
	}
	seq := h.lastSeq()
	h.rental(g) // redelivered after the start
	if got := types(h.since(seq)); strings.Join(got, " ") != "rental.result" {
		t.Fatalf("redelivered grant events = %v, want one rental.result", got)
	}
	if sent := h.dev.take(); len(sent) != 0 {
		t.Fatalf("redelivered grant restarted the device: %+v", sent)
	}

	h.tick(100 * time.Second)
	ext := map[string]any{"op": "extend", "rental_id": "r1", "device_id": "chair-1", "renter_id": "alice", "duration_s": 900}
	seq = h.lastSeq()
	h.rental(ext)
	h.rental(ext)
	evs := h.since(seq)
	if got := types(evs); strings.Join(got, " ") != "rental.result rental.extended rental.result" {
		t.Fatalf("extend twice events = %v", got)
	}
	if resync := h.dev.take(); len(resync) != 1 || resync[0].Cmd.Action != "start" || resync[0].Cmd.DurationS != 800 {
		t.Fatalf("after extend sent %+v, want start with 800 s left", resync)
	}

	cancel := map[string]any{"op": "cancel", "rental_id": "r1", "device_id": "chair-1", "renter_id": "alice"}
	seq = h.lastSeq()
	h.rental(cancel)
	h.rental(cancel)
	evs = h.since(seq)
	if got := types(evs); strings.Join(got, " ") != "rental.result rental.ended rental.result" {
		t.Fatalf("cancel twice events = %v", got)
	}
	if evs[1].Data["reason"] != "cancelled" || evs[1].Data["used_s"] != 100.0 {
		t.Fatalf("ended = %v", evs[1].Data)
	}
	if got := results(evs); strings.Join(got, " ") != "ok ok" {
		t.Fatalf("cancel results = %v", got)
	}
	// A rejected grant re-reports its rejection, even once the reason is gone.
	h.st.SetMaintenance(ctx, "chair-2", true)
	g2 := grant("r2", "chair-2", "bob", 60)
	h.rental(g2)
	h.st.SetMaintenance(ctx, "chair-2", false)
	h.online("chair-2", edged.StatusIdle)
	seq = h.lastSeq()
	h.rental(g2)
	if got := results(h.since(seq)); strings.Join(got, " ") != "maintenance" {
		t.Fatalf("redelivered rejected grant = %v", got)
	}
}

func TestResumeAfterRestart(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 60))
	h.ack("chair-1", "start", true)
	for i := 0; i < 7; i++ {
		h.tick(time.Second) // checkpoints at 3 s and 6 s
	}
	// Crash at 7 s; down for 10 s with a synchronized clock.
	h.clock.Advance(10 * time.Second)
	h.restart()
	rs := h.st.ActiveRentals()
	if len(rs) != 1 {
		t.Fatalf("active after restart = %d", len(rs))
	}
	left := rs[0].Remaining(rs[0].Used)
	// The downtime is measured from the last checkpoint (6 s) with the
	// wall clock: 11 s, so the rental has 60 - 6 - 11 = 43 s left.
	if left != 43*time.Second {
		t.Fatalf("remaining after restart = %v, want 43 s", left)
	}
	// The device comes back and is told the time left.
	h.online("chair-1", edged.StatusInUse)
	if sent := h.dev.take(); len(sent) != 1 || sent[0].Cmd.Action != "start" || sent[0].Cmd.DurationS != 43 {
		t.Fatalf("on return sent %+v, want start with 43 s", sent)
	}
	seq := h.lastSeq()
	h.tick(42 * time.Second)
	if got := types(h.since(seq)); len(got) != 0 {
		t.Fatalf("ended early: %v", got)
	}
	h.tick(time.Second)
	if got := types(h.since(seq)); strings.Join(got, " ") != "rental.ended" {
		t.Fatalf("events = %v", got)
	}

	// Unsynchronized clock: downtime cannot be measured and is not charged.
	h2 := newHarness(t)
	h2.online("chair-1", edged.StatusIdle)
	h2.rental(grant("r1", "chair-1", "alice", 60))
	h2.ack("chair-1", "start", true)
	h2.clock.synced = false
	h2.tick(3 * time.Second)
	h2.clock.Advance(time.Hour)
	h2.restart()
	rs = h2.st.ActiveRentals()
	if left := rs[0].Remaining(rs[0].Used); left != 57*time.Second {
		t.Fatalf("remaining = %v, want 57 s", left)
	}
}

func TestPendingStartAtRestartTimesOut(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 60))
	seq := h.lastSeq()
	h.restart()
	if got := results(h.since(seq)); strings.Join(got, " ") != "timeout" {
		t.Fatalf("results = %v, want timeout", got)
	}
	h.dev.take()
	h.online("chair-1", edged.StatusIdle)
	if sent := h.dev.take(); len(sent) != 1 || sent[0].Cmd.Action != "stop" {
		t.Fatalf("on return sent %+v, want stop", sent)
	}
}

func TestOfflineDeviceKeepsRental(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 60))
	h.ack("chair-1", "start", true)
	h.st.DeviceOnline(ctx, "chair-1", false)
	h.tick(30 * time.Second)
	if len(h.st.ActiveRentals()) != 1 {
		t.Fatal("rental ended when its device went offline")
	}
	h.tick(30 * time.Second)
	if len(h.st.ActiveRentals()) != 0 {
		t.Fatal("rental did not end on time while its device was offline")
	}
	if sent := h.dev.take(); len(sent) != 0 {
		t.Fatalf("sent to an offline device: %+v", sent)
	}
	h.online("chair-1", edged.StatusInUse)
	sent := h.dev.take()
	if len(sent) == 0 || sent[0].Cmd.Action != "stop" {
		t.Fatalf("on return sent %+v, want stop", sent)
	}
}

func TestUnrentedUseAndFault(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	seq := h.lastSeq()
	h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusInUse})
	h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusInUse})
	if got := types(h.since(seq)); strings.Join(got, " ") != "device.unrented_use" {
		t.Fatalf("events = %v, want one device.unrented_use", got)
	}
	if sent := h.dev.take(); len(sent) != 1 || sent[0].Cmd.Action != "stop" {
		t.Fatalf("sent %+v, want stop", sent)
	}

	h.online("chair-2", edged.StatusIdle)
	h.rental(grant("r1", "chair-2", "alice", 60))
	h.ack("chair-2", "start", true)
	h.st.DeviceState(ctx, "chair-2", edged.StateReport{Status: edged.StatusInUse})
	seq = h.lastSeq()
	h.st.DeviceState(ctx, "chair-2", edged.StateReport{Status: edged.StatusFault, Fault: "motor"})
	evs := h.since(seq)
	if len(evs) != 1 || evs[0].Type != edged.EventRentalEnded || evs[0].Data["reason"] != "device_fault" {
		t.Fatalf("events = %+v, want rental.ended device_fault", evs)
	}
	// Still reporting in_use just after its stop is not unrented use.
	h.dev.take()
	seq = h.lastSeq()
	h.st.DeviceState(ctx, "chair-2", edged.StateReport{Status: edged.StatusInUse})
	if got := types(h.since(seq)); len(got) != 0 {
		t.Fatalf("events in the grace period = %v", got)
	}
}

func TestOperatorEnd(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 60))
	h.ack("chair-1", "start", true)
	seq := h.lastSeq()
	if err := h.st.EndRental(ctx, "r1", edged.ReasonOperator); err != nil {
		t.Fatal(err)
	}
	evs := h.since(seq)
	if len(evs) != 1 || evs[0].Data["reason"] != "operator" {
		t.Fatalf("events = %+v", evs)
	}
	if err := h.st.EndRental(ctx, "r1", edged.ReasonOperator); edged.ErrorCode(err) != edged.ENOTFOUND {
		t.Fatalf("second end: %v, want not found", err)
	}
}

func TestStoreFailureIsNotAcknowledged(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.store.setFail(edged.Errorf(edged.EUNAVAILABLE, "disk full"))
	b, _ := json.Marshal(grant("r1", "chair-1", "a", 60))
	if err := h.st.Rental(ctx, b); err == nil {
		t.Fatal("grant reported durable while the store refused it")
	}
	if sent := h.dev.take(); len(sent) != 0 {
		t.Fatalf("device started without a durable grant: %+v", sent)
	}
	// Refused unavailable: the answer is written once the store recovers,
	// and a redelivery gets the same answer; a new grant starts.
	h.store.setFail(nil)
	seq := h.lastSeq()
	h.rental(grant("r1", "chair-1", "a", 60))
	if got := results(h.since(seq)); strings.Join(got, " ") != "unavailable unavailable" {
		t.Fatalf("after recovery: results %v, want the deferred unavailable and its re-report", got)
	}
	h.rental(grant("r2", "chair-1", "a", 60))
	h.ack("chair-1", "start", true)
}

// The uplink retries a message the store could not take (it holds it
// unacknowledged): a retry while its answer waits in memory adds no second
// one, so three retries during the outage leave one answer each; the retry
// after the store recovered is acknowledged with the answer re-reported,
// as any redelivery. A message answered before the outage (its re-report
// waiting) is treated the same.
func TestRetriesWhileStoreCannotWriteAnswerOnce(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.rental(grant("r0", "chair-1", "a", 60))
	h.ack("chair-1", "start", true)
	seq := h.lastSeq()
	h.store.setFail(edged.Errorf(edged.EUNAVAILABLE, "disk full"))
	try := func(op string, b []byte) {
		t.Helper()
		var err error
		if op == "command" {
			err = h.st.RenterCommand(ctx, b)
		} else {
			err = h.st.Rental(ctx, b)
		}
		if edged.ErrorCode(err) != edged.EUNAVAILABLE {
			t.Fatalf("%s while the store cannot write: %v, want EUNAVAILABLE", op, err)
		}
	}
	g1, _ := json.Marshal(grant("r1", "chair-1", "b", 60))
	again, _ := json.Marshal(grant("r0", "chair-1", "a", 60)) // answered before the outage
	cmd, _ := json.Marshal(map[string]any{"cmd_id": "c1", "device_id": "chair-1", "renter_id": "a", "action": "end"})
	garbled := []byte(`{"op":"grant","rental_id":"r9"`)
	garbledCmd := []byte(`{"cmd_id":"c9"`)
	for range 3 {
		try("grant", g1)
		try("grant", again)
		try("command", cmd)
		try("grant", garbled)
		try("command", garbledCmd)
		h.tick(time.Second) // the station retries its queue meanwhile
	}
	h.store.setFail(nil)
	for _, m := range []struct {
		op string
		b  []byte
	}{{"grant", g1}, {"grant", again}, {"command", cmd}, {"grant", garbled}, {"command", garbledCmd}} {
		var err error
		if m.op == "command" {
			err = h.st.RenterCommand(ctx, m.b)
		} else {
			err = h.st.Rental(ctx, m.b)
		}
		if err != nil {
			t.Fatalf("%s retried after the store recovered: %v", m.op, err)
		}
	}
	var got []string
	for _, e := range h.since(seq) {
		if e.Type == edged.EventRentalResult || e.Type == edged.EventCommandResult {
			id, reason := e.Data["rental_id"], e.Data["reason"]
			if id == nil {
				id = e.Data["cmd_id"]
			}
			if reason == nil {
				reason = "ok"
			}
			got = append(got, fmt.Sprintf("%v:%v", id, reason))
		}
	}
	if want := "r1:device_busy r0:ok c1:unavailable :invalid :invalid r1:device_busy r0:ok c1:unavailable :invalid :invalid"; strings.Join(got, " ") != want {
		t.Fatalf("results %v, want %s: one answer per message during the outage, re-reported once on the acknowledged retry", got, want)
	}
}

func TestFullStoreStillStopsAtTheEnd(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 10))
	h.ack("chair-1", "start", true)
	seq := h.lastSeq()

	h.store.fail = edged.Errorf(edged.EUNAVAILABLE, "disk full")
	h.tick(10 * time.Second)
	if sent := h.dev.take(); len(sent) != 1 || sent[0].Cmd.Action != "stop" {
		t.Fatalf("at the end with a full disk sent %+v, want stop", sent)
	}
	if len(h.st.ActiveRentals()) != 0 {
		t.Fatal("the rental still runs")
	}
	if next := h.st.Tick(ctx); !next.After(h.clock.Now()) {
		t.Fatalf("Tick wants to run again at once (%v): it would spin", next)
	}

	h.store.fail = nil
	h.tick(2 * time.Second)
	evs := h.since(seq)
	if got := types(evs); strings.Join(got, " ") != "rental.ended" {
		t.Fatalf("after the disk recovers: events %v, want the deferred rental.ended", got)
	}
	if evs[0].Data["reason"] != "expired" || evs[0].Data["used_s"] != 10.0 {
		t.Fatalf("rental.ended = %v", evs[0].Data)
	}
	if r, _ := h.store.Rental(ctx, "r1"); r.State != edged.RentalEnded {
		t.Fatalf("stored rental state = %s", r.State)
	}
}

// A cloud connection that drops while its grant is being handled cancels
// the handler's context; the grant is still carried out whole.
func TestCancelledCallerStillCompletesDecision(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	b, _ := json.Marshal(grant("r1", "chair-1", "alice", 60))
	if err := h.st.Rental(cctx, b); err != nil {
		t.Fatalf("grant with a cancelled caller: %v", err)
	}
	sent := h.dev.take()
	if len(sent) != 1 || sent[0].Cmd.Action != "start" {
		t.Fatalf("sent %+v, want start", sent)
	}
	if err := h.st.DeviceAck(cctx, "chair-1", edged.CommandAck{CmdID: sent[0].Cmd.CmdID, OK: true}); err != nil {
		t.Fatal(err)
	}
	if got := results(h.since(0)); strings.Join(got, " ") != "ok" {
		t.Fatalf("results = %v", got)
	}
}

// Run reports its passes for the watchdog.
func TestRunBeats(t *testing.T) {
	h := newHarness(t)
	if !h.st.LastTick().IsZero() {
		t.Fatal("LastTick set before Run")
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- h.st.Run(rctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for h.st.LastTick().IsZero() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if h.st.LastTick().IsZero() {
		t.Fatal("Run never reported a pass")
	}
}

// stopsTo returns the stops among the commands sent so far, forgetting
// every command sent.
func (h *harness) stopsTo(dev string) []edged.DeviceCommand {
	var out []edged.DeviceCommand
	for _, s := range h.dev.take() {
		if s.Device == dev && s.Cmd.Action == edged.ActionStop {
			out = append(out, s.Cmd)
		}
	}
	return out
}

// A stop is resent until the device acknowledges it, backing off from
// start_timeout to 60 s, while the device is online, and across restarts.
func TestStopDelivered(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 10))
	h.ack("chair-1", "start", true)
	h.tick(10 * time.Second)
	first := h.stopsTo("chair-1")
	if len(first) != 1 || first[0].RentalID != "r1" {
		t.Fatalf("at the end sent stops %+v, want one for r1", first)
	}
	// The device swallows it: resent after start_timeout, then after 10,
	// 20, 40 and 60 s, never longer.
	var gaps []time.Duration
	last := h.clock.Now()
	for i := 0; i < 2000 && len(gaps) < 8; i++ {
		h.tick(500 * time.Millisecond)
		if n := len(h.stopsTo("chair-1")); n > 0 {
			if n != 1 {
				t.Fatalf("%d stops at once", n)
			}
			gaps = append(gaps, h.clock.Now().Sub(last))
			last = h.clock.Now()
		}
	}
	want := []time.Duration{5, 10, 20, 40, 60, 60, 60, 60}
	for i := range want {
		want[i] *= time.Second
	}
	if fmt.Sprint(gaps) != fmt.Sprint(want) {
		t.Fatalf("stop resent after %v, want %v", gaps, want)
	}
	// Busy while outstanding.
	seq := h.lastSeq()
	h.rental(grant("r2", "chair-1", "bob", 60))
	if got := results(h.since(seq)); strings.Join(got, " ") != "device_busy" {
		t.Fatalf("grant with a stop outstanding = %v, want device_busy", got)
	}
	// Offline: nothing is sent; back online: sent at once.
	h.st.DeviceOnline(ctx, "chair-1", false)
	h.tick(5 * time.Minute)
	if got := h.stopsTo("chair-1"); len(got) != 0 {
		t.Fatalf("sent to an offline device: %+v", got)
	}
	// Kept across a restart.
	h.restart()
	h.online("chair-1", edged.StatusInUse)
	back := h.stopsTo("chair-1")
	if len(back) != 1 || back[0].RentalID != "r1" {
		t.Fatalf("on return after a restart sent %+v, want the stop of r1", back)
	}
	// A refusal keeps it outstanding; ok:true ends it.
	if err := h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: back[0].CmdID, OK: false, Error: "busy"}); err != nil {
		t.Fatal(err)
	}
	h.tick(5 * time.Second)
	again := h.stopsTo("chair-1")
	if len(again) != 1 {
		t.Fatalf("after ok:false sent %+v, want the stop again", again)
	}
	// A late ack of an earlier send counts.
	if err := h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: back[0].CmdID, OK: true}); err != nil {
		t.Fatal(err)
	}
	h.tick(10 * time.Minute)
	if got := h.stopsTo("chair-1"); len(got) != 0 {
		t.Fatalf("sent after the ack: %+v", got)
	}
	h.restart()
	h.online("chair-1", edged.StatusIdle)
	if got := h.stopsTo("chair-1"); len(got) != 0 {
		t.Fatalf("a delivered stop came back after a restart: %+v", got)
	}
	seq = h.lastSeq()
	h.rental(grant("r3", "chair-1", "bob", 60))
	h.ack("chair-1", "start", true)
	if got := results(h.since(seq)); strings.Join(got, " ") != "ok" {
		t.Fatalf("grant after the stop landed = %v, want ok", got)
	}
}

// Whatever ends a rental, its stop is delivered; a report of idle ends it
// as an ack does. Unrented use is stopped the same way.
func TestStopAfterEveryEnd(t *testing.T) {
	ends := map[string]func(h *harness){
		"cancel": func(h *harness) {
			h.rental(map[string]any{"op": "cancel", "rental_id": "r1", "device_id": "chair-1", "renter_id": "alice"})
		},
		"renter": func(h *harness) {
			h.command(map[string]any{"cmd_id": "c1", "device_id": "chair-1", "renter_id": "alice", "action": "end"})
		},
		"operator": func(h *harness) { h.st.EndRental(ctx, "r1", edged.ReasonOperator) },
		"expiry":   func(h *harness) { h.tick(time.Minute) },
		"fault":    func(h *harness) { h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusFault}) },
	}
	for name, end := range ends {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t)
			h.online("chair-1", edged.StatusIdle)
			h.rental(grant("r1", "chair-1", "alice", 60))
			h.ack("chair-1", "start", true)
			h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusInUse})
			end(h)
			if got := h.stopsTo("chair-1"); len(got) != 1 {
				t.Fatalf("at the end sent stops %+v, want one", got)
			}
			h.tick(5 * time.Second)
			if got := h.stopsTo("chair-1"); len(got) != 1 {
				t.Fatalf("unacknowledged stop resent %d times, want 1", len(got))
			}
			h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusIdle})
			h.tick(5 * time.Minute)
			if got := h.stopsTo("chair-1"); len(got) != 0 {
				t.Fatalf("stop resent after the device reported idle: %+v", got)
			}
		})
	}
	t.Run("unrented use", func(t *testing.T) {
		h := newHarness(t)
		h.online("chair-1", edged.StatusInUse)
		if got := h.stopsTo("chair-1"); len(got) != 1 {
			t.Fatalf("unrented use: stops %+v, want one", got)
		}
		h.tick(5 * time.Second)
		again := h.stopsTo("chair-1")
		if len(again) != 1 {
			t.Fatalf("unacknowledged stop of unrented use resent %d times, want 1", len(again))
		}
		h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: again[0].CmdID, OK: true})
		h.tick(5 * time.Minute)
		if got := h.stopsTo("chair-1"); len(got) != 0 {
			t.Fatalf("stop resent after its ack: %+v", got)
		}
	})
}

// Every rental message is answered once, and a redelivery of it the same
// way whenever it comes: after the rental ended, past its not_after, after
// a restart (§3.1).
func TestRedeliveriesAnsweredAlike(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	notAfter := h.clock.Now().Add(time.Minute).Format(time.RFC3339)
	msg := func(op string, dur int, renter string) map[string]any {
		m := map[string]any{"op": op, "rental_id": "r1", "device_id": "chair-1", "renter_id": renter, "not_after": notAfter}
		if dur > 0 {
			m["duration_s"] = dur
		}
		return m
	}
	msgs := []map[string]any{
		msg("grant", 600, "alice"),
		msg("extend", 900, "alice"),
		msg("extend", 1200, "bob"), // not_renter
		msg("cancel", 0, "alice"),
		msg("extend", 1500, "alice"), // after the end: no_rental
	}
	want := []string{"ok", "ok", "not_renter", "ok", "no_rental"}
	var first []string
	for i, m := range msgs {
		seq := h.lastSeq()
		h.rental(m)
		if i == 0 {
			h.ack("chair-1", "start", true)
		}
		got := results(h.since(seq))
		if len(got) != 1 {
			t.Fatalf("message %d: results %v, want exactly one", i, got)
		}
		first = append(first, got[0])
	}
	if fmt.Sprint(first) != fmt.Sprint(want) {
		t.Fatalf("first answers = %v, want %v", first, want)
	}
	redeliver := func(when string) {
		t.Helper()
		for i, m := range msgs {
			seq := h.lastSeq()
			h.rental(m)
			evs := h.since(seq)
			if got := results(evs); len(got) != 1 || got[0] != want[i] || len(evs) != 1 {
				t.Fatalf("%s: message %d (%v) answered %v (events %v), want only %s", when, i, m["op"], got, types(evs), want[i])
			}
		}
		if sent := h.dev.take(); len(sent) != 0 {
			t.Fatalf("%s: redeliveries reached the device: %+v", when, sent)
		}
	}
	h.dev.take()
	h.st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusIdle})
	redeliver("after the end")
	h.tick(2 * time.Minute)
	redeliver("past not_after")
	h.restart()
	h.online("chair-1", edged.StatusIdle)
	redeliver("after a restart")

	// A message first seen past its not_after is expired, and stays so.
	h.clock.Advance(time.Hour)
	late := map[string]any{"op": "grant", "rental_id": "r2", "device_id": "chair-1", "renter_id": "alice", "duration_s": 60, "not_after": notAfter}
	for i := 0; i < 2; i++ {
		seq := h.lastSeq()
		h.rental(late)
		if got := results(h.since(seq)); strings.Join(got, " ") != "expired" {
			t.Fatalf("late grant, delivery %d: %v, want expired", i, got)
		}
	}
	// An extend answered no_rental because its rental was unknown is not
	// judged again when the rental appears later: a new attempt needs a
	// new message.
	ext := map[string]any{"op": "extend", "rental_id": "r3", "device_id": "chair-1", "renter_id": "alice", "duration_s": 300}
	h.rental(ext)
	h.rental(grant("r3", "chair-1", "alice", 60))
	h.ack("chair-1", "start", true)
	seq := h.lastSeq()
	h.rental(ext)
	if got := results(h.since(seq)); strings.Join(got, " ") != "no_rental" {
		t.Fatalf("redelivered extend = %v, want its first answer no_rental", got)
	}
}

// A cancel before the device acknowledged start: the grant's result is
// cancelled, the cancel's ok, stop is sent, and the rental never started.
func TestCancelBeforeStartAck(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	seq := h.lastSeq()
	g := grant("r1", "chair-1", "alice", 600)
	cancel := map[string]any{"op": "cancel", "rental_id": "r1", "device_id": "chair-1", "renter_id": "alice"}
	h.rental(g)
	h.rental(g) // redelivered while starting: answered with the ack
	start := h.dev.take()
	if len(start) != 1 || start[0].Cmd.Action != "start" {
		t.Fatalf("sent %+v, want one start", start)
	}
	h.rental(cancel)
	evs := h.since(seq)
	if got := types(evs); strings.Join(got, " ") != "rental.result rental.result" {
		t.Fatalf("events = %v, want two results and nothing else", got)
	}
	if evs[0].Data["op"] != "grant" || evs[0].Data["ok"] != false || evs[0].Data["reason"] != "cancelled" {
		t.Fatalf("grant's result = %v, want ok false cancelled", evs[0].Data)
	}
	if evs[1].Data["op"] != "cancel" || evs[1].Data["ok"] != true {
		t.Fatalf("cancel's result = %v, want ok", evs[1].Data)
	}
	stops := h.stopsTo("chair-1")
	if len(stops) != 1 || stops[0].RentalID != "r1" {
		t.Fatalf("sent %+v, want the stop of r1", stops)
	}
	// The start's late ack changes nothing.
	seq = h.lastSeq()
	if err := h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: start[0].Cmd.CmdID, OK: true}); err != nil {
		t.Fatal(err)
	}
	h.tick(time.Second)
	if got := types(h.since(seq)); len(got) != 0 {
		t.Fatalf("after the late start ack: events %v", got)
	}
	if len(h.st.ActiveRentals()) != 0 {
		t.Fatal("a cancelled rental runs")
	}
	for _, m := range []map[string]any{g, cancel} {
		seq := h.lastSeq()
		h.rental(m)
		want := map[string]string{"grant": "cancelled", "cancel": "ok"}[m["op"].(string)]
		if got := results(h.since(seq)); strings.Join(got, " ") != want {
			t.Fatalf("redelivered %s = %v, want %s", m["op"], got, want)
		}
	}
	h.tick(5 * time.Second)
	if got := h.stopsTo("chair-1"); len(got) != 1 {
		t.Fatalf("unacknowledged stop resent %d times, want 1", len(got))
	}
}

// A device never seen shows when edged first loaded it, not the zero time.
func TestNeverSeenDeviceUpdatedAt(t *testing.T) {
	h := newHarness(t)
	st, _ := h.st.Device("chair-2")
	if !st.UpdatedAt.Equal(h.clock.Now()) {
		t.Fatalf("updated_at of a device never seen = %v, want %v", st.UpdatedAt, h.clock.Now())
	}
	h.online("chair-1", edged.StatusIdle)
	seen, _ := h.st.Device("chair-1")
	h.clock.Advance(time.Hour)
	h.st.Tick(ctx) // the state is buffered in the store, as a flush would
	h.restart()
	st, _ = h.st.Device("chair-1")
	if !st.UpdatedAt.Equal(seen.UpdatedAt) {
		t.Fatalf("after a restart updated_at = %v, want the stored %v", st.UpdatedAt, seen.UpdatedAt)
	}
}

var errDiskFull = edged.Errorf(edged.EUNAVAILABLE, "write edged.db: no space left on device")

// When the store cannot write, the station keeps enforcing what it holds,
// refuses what it cannot record, and writes every waiting record in
// decision order, with no gap, once the store recovers (§4).
func TestStoreCannotWrite(t *testing.T) {
	h := newHarness(t)
	for _, d := range []string{"chair-1", "chair-2", "chair-3"} {
		h.online(d, edged.StatusIdle)
	}
	h.rental(grant("r1", "chair-1", "alice", 10))
	h.ack("chair-1", "start", true)
	seq := h.lastSeq()
	h.store.setFail(errDiskFull)

	send := func(what string, f func([]byte) error, msg map[string]any) {
		t.Helper()
		b, _ := json.Marshal(msg)
		if err := f(b); edged.ErrorCode(err) != edged.EUNAVAILABLE {
			t.Fatalf("%s while the store cannot write: %v, want unavailable (left unacknowledged)", what, err)
		}
	}
	send("grant", func(b []byte) error { return h.st.Rental(ctx, b) }, grant("r2", "chair-2", "bob", 60))
	send("renter command", func(b []byte) error { return h.st.RenterCommand(ctx, b) },
		map[string]any{"cmd_id": "c1", "device_id": "chair-1", "renter_id": "alice", "action": "massage"})
	if sent := h.dev.take(); len(sent) != 0 {
		t.Fatalf("refused messages reached devices: %+v", sent)
	}
	if err := h.st.DeviceEvent(ctx, "chair-2", []byte(`{"type":"door"}`)); edged.ErrorCode(err) != edged.EUNAVAILABLE {
		t.Fatalf("device event while the store cannot write: %v, want an error (no PUBACK)", err)
	}
	// Unrented use is still stopped; the report itself is taken.
	if err := h.st.DeviceState(ctx, "chair-3", edged.StateReport{Status: edged.StatusInUse}); err != nil {
		t.Fatalf("state report: %v", err)
	}
	if got := h.stopsTo("chair-3"); len(got) != 1 {
		t.Fatalf("unrented use with a full disk: stops %+v, want one", got)
	}
	// An extend is carried out, left unacknowledged, and answered alike.
	ext := map[string]any{"op": "extend", "rental_id": "r1", "device_id": "chair-1", "renter_id": "alice", "duration_s": 20}
	send("extend", func(b []byte) error { return h.st.Rental(ctx, b) }, ext)
	if sent := h.dev.take(); len(sent) != 1 || sent[0].Cmd.Action != "start" || sent[0].Cmd.DurationS != 20 {
		t.Fatalf("after the extend sent %+v, want start with 20 s", sent)
	}
	send("retried extend", func(b []byte) error { return h.st.Rental(ctx, b) }, ext)
	// Presence still counts: the stop waits for the device to return.
	if err := h.st.DeviceOnline(ctx, "chair-1", false); err != nil {
		t.Fatal(err)
	}
	h.tick(20 * time.Second)
	if len(h.st.ActiveRentals()) != 0 {
		t.Fatal("the rental outlived its time on a full disk")
	}
	if err := h.st.DeviceOnline(ctx, "chair-1", true); err != nil {
		t.Fatal(err)
	}
	if got := h.stopsTo("chair-1"); len(got) != 1 || got[0].RentalID != "r1" {
		t.Fatalf("on return sent %+v, want the stop of r1", got)
	}
	// Maintenance cannot be saved: refused and not applied.
	if err := h.st.SetMaintenance(ctx, "chair-2", true); edged.ErrorCode(err) != edged.EUNAVAILABLE {
		t.Fatalf("maintenance on a full disk: %v, want unavailable", err)
	}
	if st, _ := h.st.Device("chair-2"); st.Maintenance {
		t.Fatal("maintenance applied though it could not be saved")
	}
	if got := h.since(seq); len(got) != 0 {
		t.Fatalf("written while the store failed: %v", types(got))
	}
	if h.st.Unrecorded() == 0 {
		t.Fatal("Unrecorded() = 0 with records waiting")
	}

	h.store.setFail(nil)
	h.tick(5 * time.Second)
	if n := h.st.Unrecorded(); n != 0 {
		t.Fatalf("Unrecorded() = %d after the store recovered", n)
	}
	evs := h.since(seq)
	want := "rental.result command.result device.unrented_use rental.result rental.extended " +
		"device.offline rental.ended device.online"
	if got := strings.Join(types(evs), " "); got != want {
		t.Fatalf("written after recovery:\n%s\nwant, in decision order:\n%s", got, want)
	}
	// The grant, the renter command and the extend: the extend's retry
	// while its answer waited added none.
	if got := results(evs); strings.Join(got, " ") != "unavailable unavailable ok" {
		t.Fatalf("results = %v", got)
	}
	for i, e := range h.since(0) {
		if e.Seq != uint64(i+1) {
			t.Fatalf("event %d has seq %d: a gap", i, e.Seq)
		}
	}
	if err := h.st.DeviceEvent(ctx, "chair-2", []byte(`{"type":"door"}`)); err != nil {
		t.Fatalf("device event after recovery: %v", err)
	}
	if err := h.st.SetMaintenance(ctx, "chair-2", true); err != nil {
		t.Fatal(err)
	}
	if !h.store.durable["chair-2"].Maintenance {
		t.Fatal("maintenance answered before it was durable")
	}
}

// A restart while the disk is full comes up and enforces the rentals it
// has: an active one ends on time with its stop, a starting one times out
// and its device is stopped; the records are written once the disk
// recovers.
func TestRestartWithFullStore(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.online("chair-2", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 60))
	h.ack("chair-1", "start", true)
	h.rental(grant("r2", "chair-2", "bob", 60))
	h.dev.take()
	h.tick(3 * time.Second) // checkpoint
	seq := h.lastSeq()
	h.store.setFail(errDiskFull)
	h.restart()
	if h.st.Unrecorded() == 0 {
		t.Fatal("the resume's records are not waiting")
	}
	h.online("chair-1", edged.StatusInUse)
	h.online("chair-2", edged.StatusIdle)
	sent := h.dev.take()
	if len(sent) != 2 || sent[0].Cmd.Action != "start" || sent[0].Cmd.DurationS != 57 || sent[1].Cmd.Action != "stop" || sent[1].Cmd.RentalID != "r2" {
		t.Fatalf("on return sent %+v, want start of r1 with 57 s and the stop of r2", sent)
	}
	h.tick(56 * time.Second)
	if len(h.st.ActiveRentals()) != 1 {
		t.Fatal("r1 ended early")
	}
	h.tick(time.Second)
	if got := h.stopsTo("chair-1"); len(got) != 1 || got[0].RentalID != "r1" {
		t.Fatalf("at the end sent %+v, want the stop of r1", got)
	}
	h.store.setFail(nil)
	h.tick(5 * time.Second)
	evs := h.since(seq)
	if got := strings.Join(types(evs), " "); got != "rental.result device.online device.online rental.ended" {
		t.Fatalf("written after recovery: %s", got)
	}
	if r, _ := h.store.Rental(ctx, "r2"); r.State != edged.RentalRejected || r.Reason != edged.ReasonTimeout {
		t.Fatalf("r2 stored as %s/%s, want rejected/timeout", r.State, r.Reason)
	}
	for i, e := range h.since(0) {
		if e.Seq != uint64(i+1) {
			t.Fatalf("event %d has seq %d: a gap", i, e.Seq)
		}
	}
}

// A stop whose send fails (a serial write error, a link down) is retried
// at the next resend, like a lost one.
func TestStopSendFailureRetried(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 10))
	h.ack("chair-1", "start", true)
	h.dev.mu.Lock()
	h.dev.fail = map[string]error{"chair-1": &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonDeviceError, Message: "modbus write: timeout"}}
	h.dev.mu.Unlock()
	h.tick(10 * time.Second)
	if len(h.st.ActiveRentals()) != 0 {
		t.Fatal("the rental did not end")
	}
	h.dev.mu.Lock()
	h.dev.fail = nil
	h.dev.mu.Unlock()
	h.tick(4 * time.Second)
	if got := h.stopsTo("chair-1"); len(got) != 0 {
		t.Fatalf("resent before start_timeout: %+v", got)
	}
	h.tick(time.Second)
	got := h.stopsTo("chair-1")
	if len(got) != 1 || got[0].RentalID != "r1" {
		t.Fatalf("after start_timeout sent %+v, want the stop of r1 again", got)
	}
}

// TestOnlineCounts checks the counts the daemon's status line shows.
func TestOnlineCounts(t *testing.T) {
	h := newHarness(t)
	if on, all := h.st.Online(); on != 0 || all != 3 {
		t.Fatalf("fresh station: %d/%d online, want 0/3", on, all)
	}
	h.online("chair-1", edged.StatusIdle)
	h.online("chair-3", edged.StatusIdle)
	if err := h.st.DeviceOnline(context.Background(), "chair-3", false); err != nil {
		t.Fatal(err)
	}
	if on, all := h.st.Online(); on != 1 || all != 3 {
		t.Fatalf("one device up, one gone: %d/%d online, want 1/3", on, all)
	}
}
