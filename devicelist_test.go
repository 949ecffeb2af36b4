package edged_test

import (
	"crypto/ed25519"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

func TestDiffDevices(t *testing.T) {
	h1, h2 := "$2a$10$"+strings.Repeat("a", 53), "$2a$10$"+strings.Repeat("b", 53)
	old := []edged.Device{
		{ID: "a", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: h1},
		{ID: "b", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: h1},
		{ID: "c", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: h1},
		{ID: "d", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: h1},
	}
	next := []edged.Device{
		{ID: "e", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: h2},
		{ID: "a", Kind: "chair", Transport: edged.TransportMQTT, SecretHashes: []string{h1}},     // same secret, other spelling
		{ID: "b", Kind: "chair", Transport: edged.TransportMQTT, SecretHashes: []string{h1, h2}}, // rolling
		{ID: "c", Kind: "sofa", Transport: edged.TransportMQTT, SecretHash: h1},                  // kind only
	}
	d := edged.DiffDevices(old, next)
	ids := func(ds []edged.Device) string {
		var s []string
		for _, x := range ds {
			s = append(s, x.ID)
		}
		return strings.Join(s, ",")
	}
	if got := ids(d.Added); got != "e" {
		t.Errorf("added %q, want e", got)
	}
	if got := ids(d.Removed); got != "d" {
		t.Errorf("removed %q, want d", got)
	}
	if got := ids(d.Changed); got != "b,c" {
		t.Errorf("changed %q, want b,c", got)
	}
	if got := strings.Join(d.SecretChanged, ","); got != "b" {
		t.Errorf("secret changed %q, want b", got)
	}
	if got := strings.Join(d.Unchanged, ","); got != "a" {
		t.Errorf("unchanged %q, want a", got)
	}
	if e := edged.DiffDevices(next, next); !e.Empty() || len(e.Unchanged) != 4 {
		t.Errorf("a list against itself: %+v", e)
	}
}

// A removed device with a rental keeps it to its end, with its stop, and
// takes no new grant; then it goes. An added device rents at once.
func TestApplyDevicesKeepsRentals(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.online("chair-2", edged.StatusIdle)
	h.rental(grant("r1", "chair-1", "alice", 60))
	h.ack("chair-1", "start", true)
	notify := h.st.RetiredNotify()

	next := []edged.Device{
		{ID: "chair-2", Kind: "chair", Transport: edged.TransportMQTT},
		{ID: "chair-3", Kind: "chair", Transport: edged.TransportMQTT},
		{ID: "chair-9", Kind: "chair", Transport: edged.TransportMQTT},
	}
	d, err := h.st.ApplyDevices(ctx, next)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Added) != 1 || len(d.Removed) != 1 || strings.Join(d.Retiring, ",") != "chair-1" || len(d.Gone()) != 0 {
		t.Fatalf("diff %+v, want chair-9 added, chair-1 removed and retiring", d)
	}
	// No new grant on the removed device, even once its rental is over.
	seq := h.lastSeq()
	h.rental(grant("r2", "chair-1", "bob", 60))
	if got := results(h.since(seq)); strings.Join(got, " ") != "unknown_device" {
		t.Fatalf("grant on a removed device = %v, want unknown_device", got)
	}
	// The added one rents at once.
	h.online("chair-9", edged.StatusIdle)
	seq = h.lastSeq()
	h.rental(grant("r3", "chair-9", "carol", 300))
	h.ack("chair-9", "start", true)
	if got := results(h.since(seq)); strings.Join(got, " ") != "ok" {
		t.Fatalf("grant on an added device = %v, want ok", got)
	}
	// r1 runs to its end: not a second earlier.
	h.tick(59 * time.Second)
	if got := len(h.st.ActiveRentals()); got != 2 {
		t.Fatalf("%d rentals running 59 s in, want 2 (r1 and r3 ended early?)", got)
	}
	for _, s := range h.dev.take() {
		if s.Device == "chair-1" && s.Cmd.Action == edged.ActionStop {
			t.Fatalf("chair-1 stopped before its end")
		}
	}
	h.tick(time.Second)
	var ended string
	for _, e := range h.since(seq) {
		if e.Type == edged.EventRentalEnded && e.Data["rental_id"] == "r1" {
			ended = e.Data["reason"].(string)
		}
	}
	if ended != "expired" {
		t.Fatalf("r1 ended %q, want expired", ended)
	}
	stop := h.stopsTo("chair-1")
	if len(stop) != 1 {
		t.Fatalf("stops to chair-1 at its end: %+v", stop)
	}
	if !h.st.Retiring("chair-1") {
		t.Fatal("chair-1 gone before its stop was delivered")
	}
	h.rental(grant("r4", "chair-1", "dan", 60))
	if err := h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: stop[0].CmdID, OK: true}); err != nil {
		t.Fatal(err)
	}
	h.tick(time.Second)
	select {
	case <-notify:
	default:
		t.Fatal("no notice of the retired device")
	}
	gone := h.st.Retired()
	if len(gone) != 1 || gone[0].ID != "chair-1" || h.st.Retiring("chair-1") {
		t.Fatalf("retired %+v, want chair-1", gone)
	}
	if _, err := h.st.Device("chair-1"); edged.ErrorCode(err) != edged.ENOTFOUND {
		t.Fatalf("chair-1 still known: %v", err)
	}
	for _, e := range h.since(0) {
		if e.Type == edged.EventRentalStarted && e.Data["rental_id"] == "r4" {
			t.Fatal("r4 started on a removed device")
		}
	}
	// Listed again later: a new device like any other.
	if _, err := h.st.ApplyDevices(ctx, append(next, edged.Device{ID: "chair-1", Kind: "chair", Transport: edged.TransportMQTT})); err != nil {
		t.Fatal(err)
	}
	h.online("chair-1", edged.StatusIdle)
	seq = h.lastSeq()
	h.rental(grant("r5", "chair-1", "erin", 60))
	h.ack("chair-1", "start", true)
	if got := results(h.since(seq)); strings.Join(got, " ") != "ok" {
		t.Fatalf("grant on a device listed again = %v, want ok", got)
	}
}

func TestApplyDevicesRefusesDuplicates(t *testing.T) {
	h := newHarness(t)
	_, err := h.st.ApplyDevices(ctx, []edged.Device{{ID: "x", Kind: "k", Transport: edged.TransportMQTT}, {ID: "x", Kind: "k", Transport: edged.TransportMQTT}})
	if edged.ErrorCode(err) != edged.EINVALID {
		t.Fatalf("err %v, want EINVALID", err)
	}
	if got := len(h.st.Devices()); got != 3 {
		t.Fatalf("%d devices after a refused list, want 3", got)
	}
}

func TestRegistrySignature(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	m := edged.RegistryMessage{Version: 7, Devices: `[{"id":"a"}]`}
	m.Sig = edged.SignRegistry(priv, "st-1", m)
	if err := edged.VerifyRegistry(pub, "st-1", m); err != nil {
		t.Fatal(err)
	}
	for name, bad := range map[string]edged.RegistryMessage{
		"other station": m,
		"tampered":      {Version: 7, Devices: `[{"id":"b"}]`, Sig: m.Sig},
		"other version": {Version: 8, Devices: m.Devices, Sig: m.Sig},
		"unsigned":      {Version: 7, Devices: m.Devices},
	} {
		st := "st-1"
		if name == "other station" {
			st = "st-2"
		}
		if err := edged.VerifyRegistry(pub, st, bad); edged.ErrorReason(err) != edged.ReasonBadSignature {
			t.Errorf("%s: %v, want bad_signature", name, err)
		}
	}
}

// Device reports keep arriving while lists change (run with -race).
func TestApplyDevicesWhileDevicesReport(t *testing.T) {
	h := newHarness(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 500 {
			id := fmt.Sprintf("chair-%d", 1+i%4)
			_ = h.st.DeviceEvent(ctx, id, []byte(`{"type":"x"}`))
			_ = h.st.DeviceTelemetry(ctx, id, map[string]any{"n": i})
			_ = h.st.DeviceStates()
		}
	}()
	lists := [][]edged.Device{
		{{ID: "chair-1", Kind: "chair", Transport: edged.TransportMQTT}, {ID: "chair-4", Kind: "chair", Transport: edged.TransportMQTT}},
		{{ID: "chair-2", Kind: "chair", Transport: edged.TransportMQTT}, {ID: "chair-3", Kind: "chair", Transport: edged.TransportMQTT}},
	}
	for i := range 200 {
		if _, err := h.st.ApplyDevices(ctx, lists[i%2]); err != nil {
			t.Fatal(err)
		}
	}
	<-done
	if got := len(h.st.Devices()); got != 2 {
		t.Fatalf("%d devices, want 2", got)
	}
}
