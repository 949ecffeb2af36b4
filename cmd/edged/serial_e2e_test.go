package main

import (
	"encoding/json"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/sim"
)

// TestSerialChargerRental runs a rental on an RS-485 charger through the
// real Main, bus and simulator: the same events as an MQTT device, start
// and stop as register writes, unrented use stopped.
func TestSerialChargerRental(t *testing.T) {
	bus := simChargers(t, 7, 8)

	cfg := testConfig(t)
	cfg.Serial.Buses = []edged.Bus{{Name: "bus0", Port: bus.Path(), Baud: 115200, DataBits: 8, Parity: "none",
		StopBits: 1, Timeout: 200 * time.Millisecond, PollInterval: 100 * time.Millisecond}}
	cfg.Profiles = map[string]edged.Profile{"charger-v1": {
		Status:    &edged.StatusRegister{Table: "holding", Address: 0, Values: map[int]edged.Status{0: edged.StatusIdle, 1: edged.StatusInUse, 2: edged.StatusFault}},
		Telemetry: []edged.TelemetryRegister{{Name: "power_w", Table: "input", Address: 2}, {Name: "temp_c", Table: "input", Address: 3, Scale: 0.1}},
		Commands: map[string]edged.CommandRegister{
			"start": {Table: "holding", Address: 16, Value: "{duration_s}"},
			"stop":  {Table: "holding", Address: 17, Value: "1"},
		},
	}}
	for _, u := range []int{7, 8} {
		cfg.Devices = append(cfg.Devices, edged.Device{ID: map[int]string{7: "charger-07", 8: "charger-08"}[u],
			Kind: "charger", Transport: edged.TransportSerial, Bus: "bus0", Unit: u, Profile: "charger-v1"})
	}
	if err := cfg.Validate(nil); err != nil {
		t.Fatal(err)
	}
	s := startStation(t, cfg)
	waitFor(t, "chargers online and idle", func() bool {
		a, _ := s.m.Station.Device("charger-07")
		b, _ := s.m.Station.Device("charger-08")
		return a.Online && a.Status == edged.StatusIdle && b.Online && a.Telemetry["temp_c"] == 21.5
	})

	s.send("rental", map[string]any{"op": "grant", "rental_id": "r-ch", "device_id": "charger-07", "renter_id": "bob", "duration_s": 2})
	started, data := s.waitEvent(0, edged.EventRentalStarted, nil)
	if data["device_id"] != "charger-07" || data["duration_s"] != 2.0 {
		t.Fatalf("rental.started = %v", data)
	}
	if got := bus.Holding(7, 16); got != 2 {
		t.Fatalf("start wrote %d to holding 16, want the duration 2", got)
	}
	waitFor(t, "charger in use", func() bool { st, _ := s.m.Station.Device("charger-07"); return st.Status == edged.StatusInUse })
	_, data = s.waitEvent(started.Seq, edged.EventRentalEnded, nil)
	if data["reason"] != "expired" {
		t.Fatalf("rental.ended = %v", data)
	}
	waitFor(t, "stop written and charger idle", func() bool {
		st, _ := s.m.Station.Device("charger-07")
		return bus.Holding(7, 17) == 1 && st.Status == edged.StatusIdle
	})

	// The rental's events are those of an MQTT device's rental, field for
	// field.
	evs, _ := s.m.Store.Events(ctx, 0, 0)
	var got []string
	for _, e := range evs {
		var d map[string]any
		json.Unmarshal(e.Data, &d)
		if d["rental_id"] != "r-ch" {
			continue
		}
		keys := make([]string, 0, len(d))
		for k := range d {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		got = append(got, string(e.Type)+" "+strings.Join(keys, ","))
	}
	want := []string{
		"rental.result device_id,ok,op,rental_id",
		"rental.started device_id,duration_s,ends_at,rental_id,renter_id,started_at",
		"rental.ended device_id,ended_at,reason,rental_id,renter_id,used_s",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("serial rental events:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// Someone starts charger-08 by hand: unrented use, stopped.
	bus.Update(8, func(u *sim.Unit) { u.Holding[0] = 1 })
	s.waitEvent(0, edged.EventUnrentedUse, func(d map[string]any) bool { return d["device_id"] == "charger-08" })
	waitFor(t, "charger-08 stopped", func() bool { return bus.Holding(8, 17) == 1 })
}

// simChargers starts a simulated RS-485 bus (on a pty pair) with a
// charger at each unit, closed when the test ends.
func simChargers(t *testing.T, units ...byte) *sim.Sim {
	t.Helper()
	bus, err := sim.Start(sim.Options{Dir: t.TempDir(), Baud: 115200, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bus.Close() })
	for _, u := range units {
		bus.Add(u, sim.Charger())
	}
	return bus
}
