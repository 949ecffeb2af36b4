package edged_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// Random sequences of device list changes, grants, time and restarts (a
// restart brings back the retiring devices, as the daemon does). Whatever
// the order: no rental is lost or cut short by a list change, a removed
// device never gets a new rental, and the list in force is the last one
// applied.
func TestDeviceListChangesRandom(t *testing.T) {
	seeds := 40
	if testing.Short() {
		seeds = 10
	}
	for seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { randomListRun(t, uint64(seed)) })
	}
}

func randomListRun(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 15))
	universe := []string{"d0", "d1", "d2", "d3", "d4", "d5"}
	dev := func(id string) edged.Device {
		return edged.Device{ID: id, Kind: "chair", Transport: edged.TransportMQTT}
	}
	h := newHarness(t, func(o *edged.StationOptions) { o.Devices = []edged.Device{dev("d0"), dev("d1"), dev("d2")} })
	list := []string{"d0", "d1", "d2"}
	online := func() {
		for _, id := range list {
			if st, err := h.st.Device(id); err == nil && !st.Online {
				h.online(id, edged.StatusIdle)
			}
		}
		for _, d := range h.st.RetiringDevices() {
			if st, err := h.st.Device(d.ID); err == nil && !st.Online {
				h.online(d.ID, edged.StatusIdle)
			}
		}
	}
	// answer acks every start and stop sent, as well-behaved devices do.
	answer := func() {
		for _, s := range h.dev.take() {
			if s.Cmd.Action == edged.ActionStart || s.Cmd.Action == edged.ActionStop {
				_ = h.st.DeviceAck(ctx, s.Device, edged.CommandAck{CmdID: s.Cmd.CmdID, OK: true})
			}
		}
	}
	online()
	granted := map[string]int{}        // rental id -> duration_s
	listedAtGrant := map[string]bool{} // rental id -> device in the list when granted
	version := 0
	for step := range 300 {
		switch op := rng.IntN(10); {
		case op < 2: // a new list
			var next []edged.Device
			list = nil
			for _, id := range universe {
				if rng.IntN(2) == 0 {
					next = append(next, dev(id))
					list = append(list, id)
				}
			}
			if _, err := h.st.ApplyDevices(ctx, next); err != nil {
				t.Fatal(err)
			}
			version++
			online()
		case op < 6: // a grant
			id := universe[rng.IntN(len(universe))]
			rid := fmt.Sprintf("r%d", step)
			granted[rid] = 5 + rng.IntN(30)
			listedAtGrant[rid] = slices.Contains(list, id)
			h.rental(grant(rid, id, "renter", granted[rid]))
			answer()
		case op < 9: // time passes
			h.tick(time.Duration(1+rng.IntN(8)) * time.Second)
			answer()
		default: // a restart, with the retiring devices restored
			h.opts.Devices = append(h.st.Devices(), h.st.RetiringDevices()...)
			var want []edged.Device
			for _, id := range list {
				want = append(want, dev(id))
			}
			h.restart()
			if _, err := h.st.ApplyDevices(ctx, want); err != nil {
				t.Fatal(err)
			}
			online()
			answer()
		}
		var got []string
		for _, d := range h.st.Devices() {
			got = append(got, d.ID)
		}
		if !slices.Equal(got, list) {
			t.Fatalf("step %d (list version %d): devices %v, want %v", step, version, got, list)
		}
	}
	for range 60 { // every rental runs out
		h.tick(time.Second)
		answer()
	}
	started := 0
	for _, e := range h.since(0) {
		rid, _ := e.Data["rental_id"].(string)
		switch e.Type {
		case edged.EventRentalStarted:
			started++
			if !listedAtGrant[rid] {
				t.Errorf("%s started on a device not in the list: %v", rid, e.Data)
			}
		case edged.EventRentalEnded:
			if e.Data["reason"] != "expired" || int(e.Data["used_s"].(float64)) < granted[rid] {
				t.Errorf("%s cut short: %v, granted %d s", rid, e.Data, granted[rid])
			}
		}
	}
	if started == 0 {
		t.Error("no rental started: the run tested nothing")
	}
	if n := len(h.st.ActiveRentals()); n != 0 {
		t.Errorf("%d rentals still running after every end", n)
	}
}
