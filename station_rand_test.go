package edged_test

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// TestRandomRentalRules drives the station with long random sequences of
// grants, extends, cancels and their redeliveries (after the end, past
// not_after, after a restart), acks, lost commands and acks, swallowed
// stops, devices going offline and online and lying about their status,
// time passing, a store that fails to write, and restarts. After every
// step it checks that no device has two running rentals, no rental runs
// past its end and the event log has no gap; at the end, once faults stop,
// that every started rental ended exactly once, every rental message got
// one result and every redelivery the same, and every device whose rental
// ended was stopped and acknowledged its stop.
func TestRandomRentalRules(t *testing.T) {
	seeds, steps := 150, 400
	if testing.Short() {
		seeds = 30
	}
	for seed := 0; seed < seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { randomRun(t, uint64(seed), steps) })
	}
}

// delivery is one delivery of a rental message and what the station said.
type delivery struct {
	key   string
	acked bool // Rental returned nil: the uplink acknowledged it
}

// resultKey is the key of the message a rental.result answers.
func resultKey(e decoded) string {
	id, _ := e.Data["rental_id"].(string)
	op, _ := e.Data["op"].(string)
	d, _ := e.Data["duration_s"].(float64)
	return edged.ResultKey(id, op, int64(d))
}

func randomRun(t *testing.T, seed uint64, steps int) {
	rng := rand.New(rand.NewPCG(seed, 7))
	h := newHarness(t)
	devices := []string{"chair-1", "chair-2", "chair-3"}
	renters := []string{"alice", "bob"}
	startedAt := map[string]time.Time{} // rental id -> fake time of its start ack
	running := map[string]bool{}        // what each device does, as the device knows it
	var sent []map[string]any           // every rental message delivered, for redeliveries
	var deliveries []delivery
	var log []string
	step := func(s string) { log = append(log, s) }
	defer func() {
		if t.Failed() {
			t.Logf("seed %d steps:\n%v", seed, log)
		}
	}()
	// deliver hands the commands sent so far to the devices. lossy loses
	// commands (a swallowed stop among them) and acks, and has devices
	// refuse some.
	deliver := func(lossy bool) {
		for _, s := range h.dev.take() {
			if lossy && rng.IntN(5) == 0 {
				continue // lost on the way: never reaches the device
			}
			ok := !lossy || rng.IntN(8) != 0
			switch s.Cmd.Action {
			case edged.ActionStart:
				if ok {
					running[s.Device] = true
				}
			case edged.ActionStop:
				if ok {
					running[s.Device] = false
				}
			}
			if lossy && rng.IntN(5) == 0 {
				continue // done, but the ack is lost
			}
			h.st.DeviceAck(ctx, s.Device, edged.CommandAck{CmdID: s.Cmd.CmdID, OK: ok})
			if s.Cmd.Action == edged.ActionStart && ok {
				if _, seen := startedAt[s.Cmd.RentalID]; !seen {
					if r, err := h.store.Rental(ctx, s.Cmd.RentalID); err == nil && r.State == edged.RentalActive {
						startedAt[s.Cmd.RentalID] = h.clock.Now()
					}
				}
			}
		}
	}
	report := func(dev string, truthful bool) {
		st := edged.StatusIdle
		if running[dev] {
			st = edged.StatusInUse
		}
		if !truthful {
			st = []edged.Status{edged.StatusIdle, edged.StatusInUse, edged.StatusFault}[rng.IntN(3)]
		}
		h.st.DeviceState(ctx, dev, edged.StateReport{Status: st})
	}
	rental := func(m map[string]any) {
		b, _ := json.Marshal(m)
		healthy := h.st.Unrecorded() == 0
		seq := h.lastSeq()
		err := h.st.Rental(ctx, b)
		d, _ := m["duration_s"].(int)
		key := edged.ResultKey(m["rental_id"].(string), m["op"].(string), int64(d))
		deliveries = append(deliveries, delivery{key: key, acked: err == nil})
		sent = append(sent, m)
		if err != nil || !healthy {
			return
		}
		// Acknowledged with nothing waiting: its one result is durable now,
		// unless it is a grant still starting, whose result comes later.
		n := 0
		for _, e := range h.since(seq) {
			if e.Type == edged.EventRentalResult && resultKey(e) == key {
				n++
			}
		}
		if n == 1 {
			return
		}
		if r, err := h.store.Rental(ctx, m["rental_id"].(string)); n == 0 && m["op"] == "grant" && err == nil && r.State == edged.RentalStarting {
			return
		}
		t.Errorf("%s %s acknowledged with %d results", m["op"], m["rental_id"], n)
	}
	notAfter := func() string {
		return h.clock.Now().Add(time.Duration(rng.IntN(90)-30) * time.Second).Format(time.RFC3339)
	}
	for _, d := range devices {
		h.online(d, edged.StatusIdle)
	}
	nextID := 0
	grants := map[string]map[string]any{} // the first grant of each rental id
	// target names a rental for an extend or cancel: mostly one granted,
	// by its renter and device; sometimes anything.
	target := func(dev, renter string) (string, string, string) {
		id := fmt.Sprintf("r%d", 1+rng.IntN(nextID+1))
		if g, ok := grants[id]; ok && rng.IntN(4) != 0 {
			return id, g["device_id"].(string), g["renter_id"].(string)
		}
		return id, dev, renter
	}
	for i := 0; i < steps; i++ {
		dev := devices[rng.IntN(len(devices))]
		renter := renters[rng.IntN(len(renters))]
		if h.store.fail != nil && rng.IntN(8) == 0 {
			step("store recovers")
			h.store.setFail(nil)
		}
		switch op := rng.IntN(17); op {
		case 0, 1:
			nextID++
			id := fmt.Sprintf("r%d", nextID)
			if rng.IntN(5) == 0 && nextID > 1 {
				id = fmt.Sprintf("r%d", 1+rng.IntN(nextID-1)) // the same rental id again
			}
			step("grant " + id + " " + dev)
			m := grant(id, dev, renter, 1+rng.IntN(120))
			if rng.IntN(3) == 0 {
				m["not_after"] = notAfter()
			}
			if _, ok := grants[id]; !ok {
				grants[id] = m
			}
			rental(m)
		case 2:
			id, dev, renter := target(dev, renter)
			step("extend " + id)
			rental(map[string]any{"op": "extend", "rental_id": id, "device_id": dev, "renter_id": renter, "duration_s": 1 + rng.IntN(200)})
		case 3:
			id, dev, renter := target(dev, renter)
			step("cancel " + id)
			m := map[string]any{"op": "cancel", "rental_id": id, "device_id": dev, "renter_id": renter}
			if rng.IntN(3) == 0 {
				m["not_after"] = notAfter()
			}
			rental(m)
		case 4, 5, 16:
			step("deliver")
			deliver(true)
		case 6, 15:
			step("online " + dev)
			h.st.DeviceOnline(ctx, dev, true)
			report(dev, rng.IntN(4) != 0)
		case 7:
			if rng.IntN(2) == 0 {
				step("offline " + dev)
				h.st.DeviceOnline(ctx, dev, false)
			}
		case 8, 9:
			d := time.Duration(rng.IntN(3000)) * time.Millisecond
			if rng.IntN(3) == 0 {
				d *= 10
			}
			step("tick " + d.String())
			h.tick(d)
		case 10:
			step("end " + dev)
			b, _ := json.Marshal(map[string]any{"cmd_id": fmt.Sprintf("c%d", i), "device_id": dev, "renter_id": renter, "action": "end"})
			h.st.RenterCommand(ctx, b)
		case 11:
			if rng.IntN(3) == 0 {
				step("restart")
				h.dev.take() // in flight at the crash: lost
				h.clock.Advance(time.Duration(rng.IntN(5000)) * time.Millisecond)
				h.restart()
				for _, d := range devices {
					if rng.IntN(3) != 0 { // most devices reconnect at once
						h.st.DeviceOnline(ctx, d, true)
						report(d, true)
					}
				}
			}
		case 12, 13:
			if len(sent) > 0 {
				m := sent[rng.IntN(len(sent))]
				step(fmt.Sprintf("redeliver %s %s", m["op"], m["rental_id"]))
				rental(m)
			}
		case 14:
			if h.store.fail == nil && rng.IntN(2) == 0 {
				step("store fails")
				h.store.setFail(errDiskFull)
			}
		}
		checkInvariants(t, h, startedAt)
		if t.Failed() {
			return
		}
	}

	// Faults stop: the store writes, devices are online, truthful, and get
	// and acknowledge every command. Every rental runs out.
	step("faults stop")
	h.store.setFail(nil)
	for _, d := range devices {
		h.st.DeviceOnline(ctx, d, true)
	}
	for i := 0; i < 40; i++ {
		h.tick(30 * time.Second)
		deliver(false)
		for _, d := range devices {
			report(d, true)
		}
		deliver(false)
	}
	h.tick(10 * time.Minute)
	deliver(false)
	checkInvariants(t, h, startedAt)
	if n := h.st.Unrecorded(); n != 0 {
		t.Errorf("%d records still wait with a healthy store", n)
	}
	if len(h.st.ActiveRentals()) != 0 {
		t.Errorf("rentals still running after all time ran out: %+v", h.st.ActiveRentals())
	}
	for _, d := range devices {
		if running[d] {
			t.Errorf("device %s still runs with no rental", d)
		}
	}
	h.tick(10 * time.Minute)
	for _, s := range h.dev.take() {
		t.Errorf("sent %s to %s after every stop was acknowledged", s.Cmd.Action, s.Device)
	}

	evs := decode(t, h.store.all())
	started, ended := map[string]int{}, map[string]int{}
	grantOK := map[string]bool{}
	answers := map[string][]string{}
	for _, e := range evs {
		id, _ := e.Data["rental_id"].(string)
		switch e.Type {
		case edged.EventRentalStarted:
			// In decision order: the grant's ok, then its start, then its end.
			if !grantOK[id] || ended[id] > 0 {
				t.Errorf("rental %s: rental.started at seq %d out of order", id, e.Seq)
			}
			started[id]++
		case edged.EventRentalEnded:
			if started[id] == 0 {
				t.Errorf("rental %s: rental.ended at seq %d before its start", id, e.Seq)
			}
			ended[id]++
		case edged.EventRentalResult:
			if e.Data["reason"] == string(edged.ReasonInvalid) {
				continue // refused as invalid: never recorded, judged anew
			}
			answers[resultKey(e)] = append(answers[resultKey(e)], fmt.Sprint(e.Data["ok"], " ", e.Data["reason"]))
			if e.Data["op"] == edged.OpGrant && e.Data["ok"] == true {
				grantOK[id] = true
			}
		}
	}
	for id, n := range started {
		if n != 1 || ended[id] != 1 {
			t.Errorf("rental %s started %d times and ended %d times", id, n, ended[id])
		}
	}
	delivered, acked := map[string]int{}, map[string]bool{}
	for _, d := range deliveries {
		delivered[d.key]++
		acked[d.key] = acked[d.key] || d.acked
	}
	for key, as := range answers {
		for _, a := range as[1:] {
			if a != as[0] {
				t.Errorf("message %q answered %v: a redelivery answered differently", key, as)
				break
			}
		}
		if len(as) > delivered[key] {
			t.Errorf("message %q delivered %d times, answered %d times", key, delivered[key], len(as))
		}
	}
	for key := range acked {
		if acked[key] && len(answers[key]) == 0 && !invalidOnly(evs, key) {
			t.Errorf("message %q acknowledged but never answered", key)
		}
	}
}

// invalidOnly reports whether every answer to key was invalid.
func invalidOnly(evs []decoded, key string) bool {
	n := 0
	for _, e := range evs {
		if e.Type == edged.EventRentalResult && resultKey(e) == key {
			if e.Data["reason"] != string(edged.ReasonInvalid) {
				return false
			}
			n++
		}
	}
	return n > 0
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
