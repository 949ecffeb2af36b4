package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/stationedge/edged"
)

// A reload adds a charger to a running bus and changes a profile: the new
// charger is polled and rents at once, the charger already there is read
// with its profile's new telemetry, and its rental running across the
// reload is not cut short and ends with its stop.
func TestReloadSerialDevicesAndProfiles(t *testing.T) {
	bus := simChargers(t, 7, 8)
	profile := func(telemetry bool) edged.Profile {
		p := edged.Profile{
			Status: &edged.StatusRegister{Table: "holding", Address: 0, Values: map[int]edged.Status{0: edged.StatusIdle, 1: edged.StatusInUse, 2: edged.StatusFault}},
			Commands: map[string]edged.CommandRegister{
				"start": {Table: "holding", Address: 16, Value: "{duration_s}"},
				"stop":  {Table: "holding", Address: 17, Value: "1"},
			},
		}
		if telemetry {
			p.Telemetry = []edged.TelemetryRegister{{Name: "power_w", Table: "input", Address: 2}}
		}
		return p
	}
	charger := func(id string, unit int) edged.Device {
		return edged.Device{ID: id, Kind: "charger", Transport: edged.TransportSerial, Bus: "bus0", Unit: unit, Profile: "charger-v1"}
	}
	cfg := testConfig(t)
	cfg.Local.Listen = "127.0.0.1:0"
	cfg.Serial.Buses = []edged.Bus{{Name: "bus0", Port: bus.Path(), Baud: 115200, DataBits: 8, Parity: "none",
		StopBits: 1, Timeout: 200 * time.Millisecond, PollInterval: 100 * time.Millisecond}}
	cfg.Profiles = map[string]edged.Profile{"charger-v1": profile(false)}
	cfg.Devices = []edged.Device{charger("charger-07", 7)}
	s := startStation(t, cfg)
	s.m.ConfigPath = filepath.Join(t.TempDir(), "edged.yaml")
	waitFor(t, "charger-07 online", func() bool { d, _ := s.m.Station.Device("charger-07"); return d.Online })
	s.send("rental", map[string]any{"op": "grant", "rental_id": "r1", "device_id": "charger-07", "renter_id": "bob", "duration_s": 3})
	s.waitEvent(0, edged.EventRentalStarted, nil)

	next := cfg
	next.Profiles = map[string]edged.Profile{"charger-v1": profile(true)}
	next.Devices = []edged.Device{charger("charger-07", 7), charger("charger-08", 8)}
	data, err := yaml.Marshal(next)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.m.ConfigPath, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.m.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "charger-08 polled", func() bool { d, _ := s.m.Station.Device("charger-08"); return d.Online })
	_, ended := s.waitEvent(0, edged.EventRentalEnded, nil)
	if ended["reason"] != "expired" || ended["used_s"].(float64) < 3 {
		t.Fatalf("r1 across the reload: %v", ended)
	}
	waitFor(t, "the stop of r1 written", func() bool { return bus.Holding(7, 17) == 1 })
	waitFor(t, "charger-07 read with its new profile", func() bool {
		d, _ := s.m.Station.Device("charger-07")
		_, ok := d.Telemetry["power_w"]
		return ok
	})
	s.send("rental", map[string]any{"op": "grant", "rental_id": "r2", "device_id": "charger-08", "renter_id": "eve", "duration_s": 30})
	s.waitEvent(0, edged.EventRentalStarted, func(d map[string]any) bool { return d["rental_id"] == "r2" })
	if got := bus.Holding(8, 16); got != 30 {
		t.Fatalf("start of the added charger wrote %d, want 30", got)
	}
	if src := s.m.Source(); src.From != "config" || src.LastRefusal != nil {
		t.Errorf("source %+v", src)
	}
}
