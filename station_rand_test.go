package edged_test

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// TestRandomRentalRules drives the station with long random sequences of
// grants, extends, cancels, acks, missing acks, devices going offline and
// online, time passing and restarts, and checks after every step that no
// device has two running rentals, no rental runs past its end, and every
// started rental ends exactly once.
func TestRandomRentalRules(t *testing.T) {
	seeds, steps := 150, 400
	if testing.Short() {
		seeds = 30
	}
	for seed := 0; seed < seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { randomRun(t, uint64(seed), steps) })
	}
}

func randomRun(t *testing.T, seed uint64, steps int) {
	rng := rand.New(rand.NewPCG(seed, 7))
	h := newHarness(t)
	devices := []string{"chair-1", "chair-2", "chair-3"}
	renters := []string{"alice", "bob"}
	startedAt := map[string]time.Time{} // rental id -> fake time of its start ack
	var log []string
	step := func(s string) { log = append(log, s) }
	defer func() {
		if t.Failed() {
			t.Logf("seed %d steps:\n%v", seed, log)
		}
	}()
	ackAll := func(ok bool) {
		for _, s := range h.dev.take() {
			if rng.IntN(4) == 0 {
				continue // this ack never arrives
			}
			h.st.DeviceAck(ctx, s.Device, edged.CommandAck{CmdID: s.Cmd.CmdID, OK: ok || s.Cmd.Action != "start"})
			if s.Cmd.Action == "start" && ok {
				if _, seen := startedAt[s.Cmd.RentalID]; !seen {
					if r, err := h.store.Rental(ctx, s.Cmd.RentalID); err == nil && r.State == edged.RentalActive {
						startedAt[s.Cmd.RentalID] = h.clock.Now()
					}
				}
			}
		}
	}
	nextID := 0
	for i := 0; i < steps; i++ {
		dev := devices[rng.IntN(len(devices))]
		renter := renters[rng.IntN(len(renters))]
		switch op := rng.IntN(12); op {
		case 0, 1:
			nextID++
			id := fmt.Sprintf("r%d", nextID)
			if rng.IntN(5) == 0 && nextID > 1 {
				id = fmt.Sprintf("r%d", 1+rng.IntN(nextID-1)) // a redelivery
			}
			step("grant " + id + " " + dev)
			h.rental(grant(id, dev, renter, 1+rng.IntN(120)))
		case 2:
			id := fmt.Sprintf("r%d", 1+rng.IntN(nextID+1))
			step("extend " + id)
			h.rental(map[string]any{"op": "extend", "rental_id": id, "device_id": dev, "renter_id": renter, "duration_s": 1 + rng.IntN(200)})
		case 3:
			id := fmt.Sprintf("r%d", 1+rng.IntN(nextID+1))
			step("cancel " + id)
			h.rental(map[string]any{"op": "cancel", "rental_id": id, "device_id": dev, "renter_id": renter})
		case 4, 5:
			step("acks")
			ackAll(rng.IntN(6) != 0)
		case 6:
			step("online " + dev)
			h.st.DeviceOnline(ctx, dev, true)
			st := []edged.Status{edged.StatusIdle, edged.StatusInUse, edged.StatusFault, edged.StatusIdle}[rng.IntN(4)]
			h.st.DeviceState(ctx, dev, edged.StateReport{Status: st})
		case 7:
			step("offline " + dev)
			h.st.DeviceOnline(ctx, dev, false)
		case 8, 9:
			d := time.Duration(rng.IntN(30000)) * time.Millisecond
			step("tick " + d.String())
			h.tick(d)
		case 10:
			step("end " + dev)
			h.command(map[string]any{"cmd_id": fmt.Sprintf("c%d", i), "device_id": dev, "renter_id": renter, "action": "end"})
		case 11:
			if rng.IntN(3) == 0 {
				step("restart")
				h.dev.take()
				h.clock.Advance(time.Duration(rng.IntN(5000)) * time.Millisecond)
				h.restart()
			}
		}
		checkInvariants(t, h, startedAt)
		if t.Failed() {
			return
		}
	}
	// Let every rental run out: each started one ends exactly once.
	for i := 0; i < 20; i++ {
		h.tick(30 * time.Second)
		ackAll(true)
	}
	h.tick(10 * time.Minute)
	checkInvariants(t, h, startedAt)
	started, ended := map[string]int{}, map[string]int{}
	for _, e := range decode(t, h.store.all()) {
		id, _ := e.Data["rental_id"].(string)
		switch e.Type {
		case edged.EventRentalStarted:
			started[id]++
		case edged.EventRentalEnded:
			ended[id]++
		}
	}
	for id, n := range started {
		if n != 1 || ended[id] != 1 {
			t.Errorf("rental %s started %d times and ended %d times", id, n, ended[id])
		}
	}
	if len(h.st.ActiveRentals()) != 0 {
		t.Errorf("rentals still running after all time ran out: %+v", h.st.ActiveRentals())
	}
}

func checkInvariants(t *testing.T, h *harness, startedAt map[string]time.Time) {
	t.Helper()
	byDevice := map[string]string{}
	now := h.clock.Now()
	for _, r := range h.st.ActiveRentals() {
		if other, ok := byDevice[r.DeviceID]; ok {
			t.Fatalf("device %s runs rentals %s and %s", r.DeviceID, other, r.ID)
		}
		byDevice[r.DeviceID] = r.ID
		if r.State != edged.RentalActive {
			continue
		}
		if at, ok := startedAt[r.ID]; ok && now.Sub(at) >= r.Duration {
			t.Fatalf("rental %s still runs %v after its start, granted %v", r.ID, now.Sub(at), r.Duration)
		}
	}
	for i, e := range h.store.all() {
		if e.Seq != uint64(i+1) {
			t.Fatalf("event %d has seq %d", i, e.Seq)
		}
	}
}
