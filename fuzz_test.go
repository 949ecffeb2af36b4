package edged_test

// Fuzz targets of every parser that faces the outside in the root package:
// device payloads (the LAN, anyone in the mall), cloud rental and renter
// command messages and their signatures (the cloud broker account). `go
// test` runs the seeds below and testdata/fuzz/; scripts/fuzz.sh runs each
// target for a set time.

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"math"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// deviceSeeds are device payloads, good and bad, for every device topic.
var deviceSeeds = []string{
	`{"status":"idle"}`,
	`{"status":"in_use","ts":"2026-11-27T10:00:00.5Z","power_w":120,"door":"closed","ok":true}`,
	`{"status":"fault","fault":"E42"}`,
	`{"status":"sleeping"}`,
	`{"status":"idle","nested":{"a":1}}`,
	`{"status":"idle","x":1e999}`,
	`{"lat":48.1,"lon":11.5,"accuracy_m":3.5,"ts":"2026-11-27T10:00:00Z"}`,
	`{"lat":91,"lon":0}`,
	`{"lat":0,"lon":0,"accuracy_m":-1}`,
	`{"type":"door_opened","by":"renter"}`,
	`{"type":""}`,
	`{"cmd_id":"c-1","ok":true}`,
	`{"cmd_id":"c/1","ok":"yes"}`,
	`{"cmd_id":"c-1","ok":false,"error":"jammed"}`,
	`{}`, `[]`, `null`, `"x"`, `{"a":1}{"b":2}`, `{"a":1} x`, "\xff\xfe", ``,
	`{"status":"idle","status":"in_use"}`,
}

func addSeeds(f *testing.F, seeds []string) {
	for _, s := range seeds {
		f.Add([]byte(s))
	}
}

// FuzzParseState: never panics; a parsed state has a contract status and
// telemetry within the limits.
func FuzzParseState(f *testing.F) {
	addSeeds(f, deviceSeeds)
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := edged.ParseState(b)
		if err != nil {
			return
		}
		switch r.Status {
		case edged.StatusIdle, edged.StatusInUse, edged.StatusFault:
		default:
			t.Fatalf("ParseState(%q) status = %q", b, r.Status)
		}
		if len(r.Fault) > 128 {
			t.Fatalf("fault code of %d bytes accepted", len(r.Fault))
		}
		checkFlat(t, b, r.Extra)
	})
}

// FuzzParseTelemetry: never panics; telemetry is flat, bounded and finite.
func FuzzParseTelemetry(f *testing.F) {
	addSeeds(f, deviceSeeds)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := edged.ParseTelemetry(b)
		if err != nil {
			return
		}
		checkFlat(t, b, m)
	})
}

func checkFlat(t *testing.T, b []byte, m map[string]any) {
	t.Helper()
	if len(m) > edged.MaxTelemetryKeys {
		t.Fatalf("%q: %d telemetry fields accepted", b, len(m))
	}
	for k, v := range m {
		if enc, _ := json.Marshal(k); k == "" || len(k) > 64 || len(enc)-2 > 64 || !edged.ValidToken(k) {
			t.Fatalf("%q: telemetry key %q accepted", b, k)
		}
		switch x := v.(type) {
		case float64:
			if math.IsNaN(x) || math.IsInf(x, 0) {
				t.Fatalf("%q: telemetry %q = %v", b, k, x)
			}
		case string:
			if enc, _ := json.Marshal(x); len(x) > edged.MaxTelemetryString || len(enc)-2 > edged.MaxTelemetryString {
				t.Fatalf("%q: telemetry %q of %d bytes (%d in JSON) accepted", b, k, len(x), len(enc)-2)
			}
		case bool:
		default:
			t.Fatalf("%q: telemetry %q has type %T", b, k, v)
		}
	}
	// What is kept must encode again: it goes into events and device state.
	if _, err := json.Marshal(m); err != nil {
		t.Fatalf("%q: telemetry does not encode: %v", b, err)
	}
}

// FuzzParseLocation: never panics; a parsed location is on the globe.
func FuzzParseLocation(f *testing.F) {
	addSeeds(f, deviceSeeds)
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := edged.ParseLocation(b)
		if err != nil {
			return
		}
		if !l.Valid() || math.IsInf(l.Lat, 0) || math.IsInf(l.Lon, 0) {
			t.Fatalf("ParseLocation(%q) = %+v, not on the globe", b, l)
		}
		if _, err := json.Marshal(l); err != nil {
			t.Fatalf("location does not encode: %v", err)
		}
	})
}

// FuzzParseDeviceEvent: never panics; an accepted event is one compact JSON
// object with a string type, kept as the device sent it.
func FuzzParseDeviceEvent(f *testing.F) {
	addSeeds(f, deviceSeeds)
	f.Fuzz(func(t *testing.T, b []byte) {
		raw, err := edged.ParseDeviceEvent(b)
		if err != nil {
			return
		}
		if !json.Valid(raw) || len(raw) > len(b) {
			t.Fatalf("ParseDeviceEvent(%q) = %q", b, raw)
		}
		var m map[string]any
		if err := json.Unmarshal(raw, &m); err != nil || m == nil {
			t.Fatalf("event %q is not an object: %v", raw, err)
		}
		if s, ok := m["type"].(string); !ok || s == "" {
			t.Fatalf("event %q has no type", raw)
		}
		var c bytes.Buffer
		if err := json.Compact(&c, raw); err != nil || !bytes.Equal(c.Bytes(), raw) {
			t.Fatalf("event %q is not compact", raw)
		}
		// As it goes upstream, it stays within the payload limit.
		var esc bytes.Buffer
		json.HTMLEscape(&esc, raw)
		if esc.Len() > edged.MaxPayload {
			t.Fatalf("event of %d bytes, %d once escaped, accepted", len(raw), esc.Len())
		}
	})
}

// FuzzParseAck: never panics; an ack names a valid cmd_id and a bounded
// error text.
func FuzzParseAck(f *testing.F) {
	addSeeds(f, deviceSeeds)
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := edged.ParseAck(b)
		if err != nil {
			return
		}
		if !edged.ValidToken(a.CmdID) || len(a.Error) > 256 {
			t.Fatalf("ParseAck(%q) = %+v", b, a)
		}
	})
}

// rentalSeeds are cloud rental messages, good and bad.
var rentalSeeds = []string{
	`{"op":"grant","rental_id":"r-1","device_id":"chair-1","renter_id":"alice","duration_s":600}`,
	`{"op":"grant","rental_id":"r-2","device_id":"chair-1","renter_id":"alice","duration_s":60.0,"not_after":"2026-11-27T10:05:00Z"}`,
	`{"op":"grant","rental_id":"r-3","device_id":"chair-1","renter_id":"alice","duration_s":600,"not_after":"2020-01-01T00:00:00Z"}`,
	`{"op":"grant","rental_id":"r-4","device_id":"chair-9","renter_id":"alice","duration_s":600}`,
	`{"op":"grant","rental_id":"r-5","device_id":"chair-2","renter_id":"bob","duration_s":600}`,
	`{"op":"grant","rental_id":"r-active","device_id":"chair-2","renter_id":"alice","duration_s":3600}`,
	`{"op":"extend","rental_id":"r-active","device_id":"chair-2","renter_id":"alice","duration_s":7200}`,
	`{"op":"extend","rental_id":"r-active","device_id":"chair-2","renter_id":"bob","duration_s":7200}`,
	`{"op":"extend","rental_id":"r-active","device_id":"chair-2","renter_id":"alice","duration_s":1}`,
	`{"op":"cancel","rental_id":"r-active","device_id":"chair-2","renter_id":"alice"}`,
	`{"op":"cancel","rental_id":"r-active","device_id":"chair-1","renter_id":"alice"}`,
	`{"op":"cancel","rental_id":"nope","device_id":"chair-1","renter_id":"alice"}`,
	`{"op":"grant","rental_id":"r-6","device_id":"chair-1","renter_id":"alice","duration_s":604801}`,
	`{"op":"grant","rental_id":"r-7","device_id":"chair-1","renter_id":"alice","duration_s":-5}`,
	`{"op":"grant","rental_id":"r-8","device_id":"chair-1","renter_id":"alice","duration_s":1e300}`,
	`{"op":"grant","rental_id":"r/8","device_id":"chair-1","renter_id":"alice","duration_s":5}`,
	`{"op":"grant","rental_id":"r-9","device_id":"chair-1","renter_id":"a\nb","duration_s":5}`,
	`{"op":"grant","rental_id":"r-10","device_id":"chair-1","renter_id":"alice","duration_s":5,"sig":"AAAA"}`,
	`{"op":"launch","rental_id":"r-11","device_id":"chair-1","renter_id":"alice"}`,
	`{"op":["grant"]}`, `{}`, `[]`, `null`, ``, "\xff",
	`{"cmd_id":"c-1","device_id":"chair-2","renter_id":"alice","action":"massage","args":{"level":3}}`,
	`{"cmd_id":"c-2","device_id":"chair-2","renter_id":"bob","action":"massage"}`,
	`{"cmd_id":"c-3","device_id":"chair-2","renter_id":"alice","action":"end"}`,
	`{"cmd_id":"c-4","device_id":"chair-2","renter_id":"alice","action":"start"}`,
	`{"cmd_id":"c-5","device_id":"chair-1","renter_id":"alice","action":"massage"}`,
	`{"cmd_id":"c-6","device_id":"chair-3","renter_id":"alice","action":"massage"}`,
	`{"cmd_id":"c-7","device_id":"chair-2","renter_id":"alice","action":"massage","args":[1]}`,
	`{"cmd_id":"","device_id":"chair-2","renter_id":"alice","action":"massage"}`,
}

// FuzzParseRentalMessage: never panics; an accepted message has valid ids,
// a known op and a duration in range, and signs to an unambiguous text.
func FuzzParseRentalMessage(f *testing.F) {
	addSeeds(f, rentalSeeds)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := edged.ParseRentalMessage(b)
		if err != nil {
			return
		}
		if !edged.ValidToken(m.RentalID) || !edged.ValidDeviceID(m.DeviceID) || !edged.ValidToken(m.RenterID) {
			t.Fatalf("ParseRentalMessage(%q) accepted bad ids: %+v", b, m)
		}
		switch m.Op {
		case edged.OpGrant, edged.OpExtend:
			if m.DurationS < 1 || time.Duration(m.DurationS)*time.Second > edged.MaxDuration {
				t.Fatalf("%q: duration %d accepted", b, m.DurationS)
			}
		case edged.OpCancel:
			if m.DurationS != 0 {
				t.Fatalf("%q: cancel with duration %d", b, m.DurationS)
			}
		default:
			t.Fatalf("%q: op %q accepted", b, m.Op)
		}
		// The signed text has one field per line: no accepted field may
		// hold a newline, or two messages could share a signature.
		if n := bytes.Count(edged.SignedText("mall-1", m), []byte("\n")); n != 7 {
			t.Fatalf("%q: signed text has %d newlines, want 7", b, n)
		}
	})
}

// FuzzParseRenterCommand: never panics; an accepted command has valid ids
// and args that are an object.
func FuzzParseRenterCommand(f *testing.F) {
	addSeeds(f, rentalSeeds)
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := edged.ParseRenterCommand(b)
		if err != nil {
			return
		}
		if !edged.ValidToken(c.CmdID) || !edged.ValidDeviceID(c.DeviceID) || !edged.ValidToken(c.RenterID) || !edged.ValidToken(c.Action) {
			t.Fatalf("ParseRenterCommand(%q) accepted bad ids: %+v", b, c)
		}
		if len(c.Args) > 0 && !bytes.Equal(c.Args, []byte("null")) {
			var m map[string]any
			if err := json.Unmarshal(c.Args, &m); err != nil {
				t.Fatalf("%q: args %q are not an object: %v", b, c.Args, err)
			}
		}
	})
}

var fuzzKey = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize))

// FuzzVerifyRental: a fuzzed message never verifies with a fuzzed sig (no
// forgery without the private key); a message signed for one station
// verifies there and nowhere else, and not after any field changes.
func FuzzVerifyRental(f *testing.F) {
	for _, s := range rentalSeeds {
		f.Add([]byte(s), "", "mall-2")
	}
	f.Add([]byte(rentalSeeds[0]), edged.SignRental(fuzzKey, "mall-1", edged.RentalMessage{Op: "grant"}), "mall-1x")
	f.Fuzz(func(t *testing.T, b []byte, sig, other string) {
		pub := fuzzKey.Public().(ed25519.PublicKey)
		m, err := edged.ParseRentalMessage(b)
		if err != nil {
			return
		}
		if m.Sig != "" && edged.VerifyRental(pub, "mall-1", m) == nil {
			t.Fatalf("fuzzed sig %q verified for %+v", m.Sig, m)
		}
		m.Sig = sig
		if sig != "" && edged.VerifyRental(pub, "mall-1", m) == nil {
			t.Fatalf("fuzzed sig %q verified for %+v", sig, m)
		}
		m.Sig = edged.SignRental(fuzzKey, "mall-1", m)
		if err := edged.VerifyRental(pub, "mall-1", m); err != nil {
			t.Fatalf("own signature refused: %v", err)
		}
		if other != "mall-1" {
			if err := edged.VerifyRental(pub, other, m); edged.ErrorReason(err) != edged.ReasonBadSignature {
				t.Fatalf("signature for mall-1 accepted at station %q: %v", other, err)
			}
		}
		// Round trip through JSON, as the cloud sends it: still valid.
		j, _ := json.Marshal(m)
		m2, err := edged.ParseRentalMessage(j)
		if err != nil {
			t.Fatalf("re-encoded message %s refused: %v", j, err)
		}
		if err := edged.VerifyRental(pub, "mall-1", m2); err != nil {
			t.Fatalf("re-encoded message %s: %v", j, err)
		}
		changed := m
		changed.DurationS++
		if m.Op == edged.OpCancel {
			changed = m
			changed.RenterID += "x"
		}
		if edged.VerifyRental(pub, "mall-1", changed) == nil {
			t.Fatalf("signature survived a change of the message: %+v", changed)
		}
	})
}

// fuzzHarness is a station with chair-1 online and idle, chair-2 online in
// an active rental r-active of alice (an hour), and chair-3 offline.
func fuzzHarness(t *testing.T, key ed25519.PrivateKey) (*harness, uint64) {
	h := newHarness(t, func(o *edged.StationOptions) {
		if key != nil {
			o.VerifyKey = key.Public().(ed25519.PublicKey)
		}
	})
	h.online("chair-1", edged.StatusIdle)
	h.online("chair-2", edged.StatusIdle)
	g := edged.RentalMessage{Op: "grant", RentalID: "r-active", DeviceID: "chair-2", RenterID: "alice", DurationS: 3600}
	if key != nil {
		g.Sig = edged.SignRental(key, "mall-1", g)
	}
	b, _ := json.Marshal(g)
	if err := h.st.Rental(ctx, b); err != nil {
		t.Fatal(err)
	}
	h.ack("chair-2", "start", true)
	h.dev.take()
	return h, h.lastSeq()
}

// settle answers every command sent to devices (ok when answer is true)
// or lets them time out, then returns the events logged after seq.
func (h *harness) settle(seq uint64, answer bool) []decoded {
	if answer {
		for _, s := range h.dev.take() {
			if err := h.st.DeviceAck(ctx, s.Device, edged.CommandAck{CmdID: s.Cmd.CmdID, OK: true}); err != nil {
				h.t.Fatal(err)
			}
		}
	}
	h.tick(6 * time.Second)
	h.tick(time.Second)
	return h.since(seq)
}

func count(evs []decoded, typ edged.EventType) int {
	n := 0
	for _, e := range evs {
		if e.Type == typ {
			n++
		}
	}
	return n
}

// FuzzStationRental: a cloud rental message, whatever it holds, never
// panics the station and gets exactly one rental.result, now or once the
// device answers or times out; refusals are durable before Rental returns.
func FuzzStationRental(f *testing.F) {
	for _, s := range rentalSeeds {
		f.Add([]byte(s), false, false)
	}
	f.Add([]byte(rentalSeeds[0]), true, true)
	f.Add([]byte(rentalSeeds[6]), true, false)
	f.Fuzz(func(t *testing.T, b []byte, signed, answer bool) {
		var key ed25519.PrivateKey
		if signed {
			key = fuzzKey
			// Sign what parses, so the fuzzer gets past the signature.
			if m, err := edged.ParseRentalMessage(b); err == nil {
				var obj map[string]any
				if json.Unmarshal(b, &obj) == nil {
					obj["sig"] = edged.SignRental(key, "mall-1", m)
					b, _ = json.Marshal(obj)
				}
			}
		}
		h, seq := fuzzHarness(t, key)
		if err := h.st.Rental(ctx, b); err != nil {
			t.Fatalf("Rental(%q) on a working store: %v", b, err)
		}
		evs := h.settle(seq, answer)
		if n := count(evs, edged.EventRentalResult); n != 1 {
			t.Fatalf("Rental(%q): %d rental.result events, want 1: %+v", b, n, evs)
		}
		if n := count(evs, edged.EventCommandResult); n != 0 {
			t.Fatalf("Rental(%q) produced a command.result", b)
		}
		checkSeqs(t, h)
	})
}

// FuzzStationRenterCommand: a renter command, whatever it holds, never
// panics the station and gets exactly one command.result; only alice's
// commands for chair-2 reach a device.
func FuzzStationRenterCommand(f *testing.F) {
	for _, s := range rentalSeeds {
		f.Add([]byte(s), false)
	}
	f.Add([]byte(rentalSeeds[len(rentalSeeds)-9]), true)
	f.Fuzz(func(t *testing.T, b []byte, answer bool) {
		h, seq := fuzzHarness(t, nil)
		if err := h.st.RenterCommand(ctx, b); err != nil {
			t.Fatalf("RenterCommand(%q) on a working store: %v", b, err)
		}
		h.dev.mu.Lock()
		for _, s := range h.dev.sent {
			if s.Device != "chair-2" || s.Cmd.RenterID != "alice" && s.Cmd.Action != edged.ActionStop {
				t.Fatalf("RenterCommand(%q) sent %+v to %s: the binding leaked", b, s.Cmd, s.Device)
			}
		}
		h.dev.mu.Unlock()
		evs := h.settle(seq, answer)
		if n := count(evs, edged.EventCommandResult); n != 1 {
			t.Fatalf("RenterCommand(%q): %d command.result events, want 1: %+v", b, n, evs)
		}
		if n := count(evs, edged.EventRentalResult); n != 0 {
			t.Fatalf("RenterCommand(%q) produced a rental.result", b)
		}
		checkSeqs(t, h)
	})
}

// FuzzStationDeviceReports: whatever a device publishes on its topics, the
// station neither panics nor loses the event: a device.event is logged for
// every accepted events payload.
func FuzzStationDeviceReports(f *testing.F) {
	addSeeds(f, deviceSeeds)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, seq := fuzzHarness(t, nil)
		if r, err := edged.ParseState(b); err == nil {
			if err := h.st.DeviceState(ctx, "chair-1", r); err != nil {
				t.Fatal(err)
			}
			if err := h.st.DeviceState(ctx, "chair-2", r); err != nil {
				t.Fatal(err)
			}
		}
		if m, err := edged.ParseTelemetry(b); err == nil {
			if err := h.st.DeviceTelemetry(ctx, "chair-1", m); err != nil {
				t.Fatal(err)
			}
		}
		if l, err := edged.ParseLocation(b); err == nil {
			if err := h.st.DeviceLocation(ctx, "chair-1", l); err != nil {
				t.Fatal(err)
			}
		}
		if a, err := edged.ParseAck(b); err == nil {
			if err := h.st.DeviceAck(ctx, "chair-2", a); err != nil {
				t.Fatal(err)
			}
		}
		accepted := 0
		if raw, err := edged.ParseDeviceEvent(b); err == nil {
			if err := h.st.DeviceEvent(ctx, "chair-1", raw); err != nil {
				t.Fatal(err)
			}
			accepted++
		}
		evs := h.since(seq)
		if n := count(evs, edged.EventDeviceEvent); n != accepted {
			t.Fatalf("%q: %d device.event logged, want %d", b, n, accepted)
		}
		if _, err := json.Marshal(h.st.DeviceStates()); err != nil {
			t.Fatalf("%q: device states do not encode: %v", b, err)
		}
		checkSeqs(t, h)
	})
}

// checkSeqs fails unless the log's seqs run 1..N.
func checkSeqs(t *testing.T, h *harness) {
	t.Helper()
	for i, e := range h.store.all() {
		if e.Seq != uint64(i+1) {
			t.Fatalf("event %d has seq %d", i, e.Seq)
		}
	}
}
