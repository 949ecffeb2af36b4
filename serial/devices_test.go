package serial

import (
	"context"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// A running bus takes an added device, stops polling a removed one and
// keeps polling the others without a gap in their polls.
func TestApplyDevicesOnRunningBus(t *testing.T) {
	r := startRig(t, rigOptions{baud: 115200, units: 2, timeout: 2 * time.Second})
	r.sim.Add(3, testUnit(stateOf(3)))
	for _, id := range []string{devID(1), devID(2)} {
		waitFor(t, 10*time.Second, id+" state", func() bool { _, ok := r.rep.last(id); return ok })
	}
	dev := func(n int) edged.Device {
		return edged.Device{ID: devID(n), Kind: "charger", Transport: edged.TransportSerial, Bus: "bus0", Unit: n, Profile: "charger-v1"}
	}
	d := edged.DiffDevices([]edged.Device{dev(1), dev(2)}, []edged.Device{dev(1), dev(3)})
	if err := r.bus.ApplyDevices(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "added device polled", func() bool { _, ok := r.rep.last(devID(3)); return ok })
	polls := func(id string) uint64 {
		for _, h := range r.bus.Health().Devices {
			if h.DeviceID == id {
				return h.Polls
			}
		}
		return 0
	}
	if polls(devID(2)) != 0 {
		t.Fatal("removed device still in the bus's health")
	}
	p1 := polls(devID(1))
	waitFor(t, 10*time.Second, "kept device still polled", func() bool { return polls(devID(1)) > p1+2 })
	if err := r.bus.Send(context.Background(), devID(2), edged.DeviceCommand{CmdID: "c1", Action: "stop"}); edged.ErrorCode(err) != edged.ENOTFOUND {
		t.Fatalf("send to a removed device: %v, want ENOTFOUND", err)
	}
	// A unit used twice is refused whole.
	bad := edged.DeviceDiff{Added: []edged.Device{{ID: "dup", Kind: "charger", Transport: edged.TransportSerial, Bus: "bus0", Unit: 1, Profile: "charger-v1"}}}
	if err := r.bus.ApplyDevices(context.Background(), bad); edged.ErrorCode(err) != edged.EINVALID {
		t.Fatalf("unit twice: %v, want EINVALID", err)
	}
}
