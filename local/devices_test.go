package local

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// A change of the device list closes the sessions of the removed device
// and of the one whose secret changed, and no other; an added device logs
// in at once; a device with two secrets may use either.
func TestApplyDevicesDropsOnlyChanged(t *testing.T) {
	a, b := hashes(t)
	var devs []edged.Device
	for i := range 10 {
		devs = append(devs, edged.Device{ID: fmt.Sprintf("keep-%d", i), Kind: "chair", Transport: edged.TransportMQTT, SecretHash: a})
	}
	devs = append(devs,
		edged.Device{ID: "gone", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: a},
		edged.Device{ID: "rolled", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: a},
		edged.Device{ID: "retiring", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: a})
	e := start(t, func(c *Config) { c.Devices = devs })
	clients := map[string]*v3{}
	for _, d := range devs {
		clients[d.ID] = connectV3(t, e.addr, d.ID, secretA)
	}
	next := append([]edged.Device{}, devs[:10]...)
	next = append(next,
		edged.Device{ID: "rolled", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: a, SecretHashes: []string{b}},
		edged.Device{ID: "new", Kind: "chair", Transport: edged.TransportMQTT, SecretHashes: []string{b}})
	d := edged.DiffDevices(devs, next)
	d.Retiring = []string{"retiring"}
	if err := e.b.ApplyDevices(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"gone", "rolled"} {
		select {
		case <-clients[id].lost:
		case <-time.After(testWaitPeriod):
			t.Fatalf("%s not disconnected", id)
		}
	}
	if got := e.b.ListDrops(); got != 2 {
		t.Errorf("%d sessions dropped, want 2", got)
	}
	if _, err := dialV3(t, e.addr, "gone", "gone", secretA); err == nil {
		t.Error("a removed device logged in")
	}
	// The rolled device may use either secret; the new one logs in at once.
	connectV3(t, e.addr, "rolled", secretB).c.Disconnect(0)
	connectV3(t, e.addr, "rolled", secretA).alive(t, e, "rolled")
	connectV3(t, e.addr, "new", secretB).alive(t, e, "new")
	// Every other session is kept: each still publishes on it, and none
	// connected twice or lost its connection.
	for _, id := range append([]string{"retiring"}, func() []string {
		var s []string
		for _, d := range devs[:10] {
			s = append(s, d.ID)
		}
		return s
	}()...) {
		c := clients[id]
		c.alive(t, e, id)
		if n := c.connects.Load(); n != 1 || len(c.lost) != 0 {
			t.Errorf("%s: %d connects, %d losses, want 1 and 0", id, n, len(c.lost))
		}
	}
	if got := e.b.Stats().Connected; got != 13 {
		t.Errorf("%d connected, want 13 (10 kept, retiring, rolled, new)", got)
	}
	// The station lets the retiring device go: now it is dropped.
	if err := e.b.ApplyDevices(context.Background(), edged.DeviceDiff{Removed: []edged.Device{devs[12]}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-clients["retiring"].lost:
	case <-time.After(testWaitPeriod):
		t.Fatal("retiring device not disconnected once let go")
	}
	// A bad entry changes nothing.
	bad := edged.DeviceDiff{Added: []edged.Device{{ID: "x", Kind: "k", Transport: edged.TransportMQTT, SecretHash: "plain"}}}
	if err := e.b.ApplyDevices(context.Background(), bad); edged.ErrorCode(err) != edged.EINVALID {
		t.Fatalf("bad hash: %v, want EINVALID", err)
	}
	if e.b.device("x") != nil {
		t.Fatal("a refused entry was added")
	}
}
