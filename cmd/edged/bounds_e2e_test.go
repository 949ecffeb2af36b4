package main

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stationedge/edged"
)

// startSmallMosquitto runs mosquitto as a cloud broker that drops any
// client sending a packet over 128 KiB, as cloud services do.
func startSmallMosquitto(t *testing.T) string {
	t.Helper()
	return startMosquitto(t, "max_packet_size 131072")
}

// TestDeviceCannotStallTheUplink: a device that sends telemetry that would
// hold megabytes (eight 60,000-byte strings) and events that escape to
// several times their size is refused as bad input, so its state stays
// small, and another device's 50 events all reach a cloud broker that
// drops clients sending over 128 KiB, with no uplink reconnect (§2, §3.5).
func TestDeviceCannotStallTheUplink(t *testing.T) {
	cloudAddr := startSmallMosquitto(t)
	cc := newCloudClient(t, cloudAddr)
	var mu sync.Mutex
	var largestState int
	tok := cc.c.Subscribe("stations/mall-1/up/devices/+", 1, func(_ mqtt.Client, m mqtt.Message) {
		mu.Lock()
		largestState = max(largestState, len(m.Payload()))
		mu.Unlock()
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud subscribe: %v", tok.Error())
	}
	cfg := testConfig(t, "chair-1", "chair-2")
	cfg.Uplink.URL = "tcp://" + cloudAddr
	s := startStation(t, cfg)
	waitFor(t, "uplink connected", func() bool { return s.m.Uplink.Status().State == "connected" })
	big := s.device("chair-1")
	calm := s.device("chair-2")

	// Within the bounds: 64 fields of 256 bytes.
	tel := map[string]any{}
	for i := 0; i < edged.MaxTelemetryKeys; i++ {
		tel[fmt.Sprintf("f%02d", i)] = strings.Repeat("v", edged.MaxTelemetryString)
	}
	if err := big.Publish("telemetry", tel); err != nil {
		t.Fatal(err)
	}
	// Over them, and events that json would escape to 6x their size.
	for i := 0; i < 8; i++ {
		if err := big.Publish("telemetry", map[string]any{fmt.Sprint("s", i): strings.Repeat("x", 60000)}); err != nil {
			t.Fatal(err)
		}
		ev := []byte(`{"type":"dump","data":"` + strings.Repeat("<", 60000) + `"}`)
		if err := big.PublishRaw("devices/chair-1/events", ev); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 50; i++ {
		if err := calm.Publish("events", map[string]any{"type": "tick", "n": i}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "chair-2's 50 events at the cloud", func() bool {
		n := 0
		for _, d := range cc.eventsOf(edged.EventDeviceEvent) {
			if d["device_id"] == "chair-2" {
				n++
			}
		}
		return n == 50
	})
	if got := s.m.Broker.Stats().BadInput; got != 16 {
		t.Errorf("BadInput = %d, want 16 (8 telemetry, 8 events)", got)
	}
	for _, d := range cc.eventsOf(edged.EventDeviceEvent) {
		if d["device_id"] == "chair-1" {
			t.Errorf("an oversized event of chair-1 reached the cloud")
		}
	}
	st, _ := s.m.Station.Device("chair-1")
	if len(st.Telemetry) != edged.MaxTelemetryKeys {
		t.Errorf("chair-1 telemetry holds %d fields, want the 64 within the bounds", len(st.Telemetry))
	}
	// The state within the bounds reaches the cloud too (a marker change
	// after it, so it has been published).
	if err := big.Publish("telemetry", map[string]any{"f00": "marker"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "chair-1's state at the cloud", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return largestState > 16<<10
	})
	mu.Lock()
	t.Logf("largest device state at the cloud: %d bytes", largestState)
	mu.Unlock()
	if st := s.m.Uplink.Status(); st.Reconnects != 0 || st.State != "connected" {
		t.Errorf("uplink %s after %d reconnects, want connected with none", st.State, st.Reconnects)
	}
}
