package serial

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/sim"
)

// TestOfflineAfterThreeFailedPolls: a device that stops answering is
// reported offline once, after three failed polls in a row, and online
// again with its state when it answers.
func TestOfflineAfterThreeFailedPolls(t *testing.T) {
	r := startRig(t, rigOptions{baud: 115200, units: 2, timeout: 100 * time.Millisecond,
		tune: func(b *Bus) { b.maxBackoff = 200 * time.Millisecond }})
	id := devID(1)
	waitFor(t, 10*time.Second, "online", func() bool { on, _ := r.rep.isOnline(id); return on })
	failedBefore := r.bus.Health().Devices[0].FailedPolls
	r.sim.Update(1, func(u *sim.Unit) { u.Dead = true })
	waitFor(t, 10*time.Second, "offline", func() bool { on, _ := r.rep.isOnline(id); return !on })
	if got := r.bus.Health().Devices[0].FailedPolls - failedBefore; got != OfflineAfter {
		t.Errorf("offline after %d failed polls, want %d", got, OfflineAfter)
	}
	r.sim.Update(1, func(u *sim.Unit) { u.Dead = false; u.Holding[0] = 1 })
	waitFor(t, 10*time.Second, "online again", func() bool { on, _ := r.rep.isOnline(id); return on })
	waitFor(t, 10*time.Second, "state after return", func() bool {
		s, _ := r.rep.last(id)
		return s.Status == edged.StatusInUse
	})
	want := []onlineChange{{devID(1), true}, {devID(2), true}, {devID(1), false}, {devID(1), true}}
	got := r.rep.onlineChanges()
	if len(got) == 4 && got[0].id == devID(2) { // the first two may come in either order
		got[0], got[1] = got[1], got[0]
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(onlineChange{})); diff != "" {
		t.Errorf("online reports (-want +got):\n%s", diff)
	}
}

// TestDeadDeviceDoesNotStarveTheBus: on a bus busy with seven live
// devices, a dead eighth costs the others at most one timeout per backoff
// period. Everything is compared with a bus of the seven alone, run side
// by side under the same load of the machine, over the same stretch.
func TestDeadDeviceDoesNotStarveTheBus(t *testing.T) {
	const (
		timeout    = 100 * time.Millisecond
		maxBackoff = time.Second
		// measure is how many polls of the seven alone the comparison
		// spans: eight per device, about 6 s.
		measure = 56
	)
	// livePolls counts the polls of units 1..7.
	livePolls := func(r *rig) (n uint64) {
		for _, d := range r.bus.Health().Devices[:7] {
			n += d.Polls
		}
		return n
	}
	// 9600 baud and a 10 ms poll interval: the bus is saturated, so any
	// time taken by the dead device shows in the others' polls.
	opts := rigOptions{baud: 9600, units: 7, timeout: timeout, pollInterval: 10 * time.Millisecond,
		tune: func(b *Bus) { b.maxBackoff = maxBackoff }}
	r7 := startRig(t, opts)
	opts.units = 8
	opts.setup = func(s *sim.Sim) { s.Update(8, func(u *sim.Unit) { u.Dead = true }) }
	r8 := startRig(t, opts)
	dead := func() edged.BusDeviceHealth { return r8.bus.Health().Devices[7] }
	waitFor(t, 10*time.Second, "unit 8 offline", func() bool { on, known := r8.rep.isOnline(devID(8)); return known && !on })
	// The backoff reaches its cap, 20 ms doubling to 1 s, after seven
	// more failed polls.
	waitFor(t, 30*time.Second, "backoff at its cap", func() bool { return dead().FailedPolls >= OfflineAfter+7 })

	start := time.Now()
	probesBefore := dead().Requests
	before7, before8 := livePolls(r7), livePolls(r8)
	waitFor(t, 60*time.Second, fmt.Sprint(measure, " live polls"), func() bool { return livePolls(r7)-before7 >= measure })
	polls7, polls8 := livePolls(r7)-before7, livePolls(r8)-before8
	probes := dead().Requests - probesBefore // exchanges completed in the stretch
	elapsed := time.Since(start)
	t.Logf("live polls in %v: %d with 7 devices, %d beside a dead one; %d probes of the dead one",
		elapsed.Round(time.Millisecond), polls7, polls8, probes)

	// Probes are at least maxBackoff apart, however slow the machine.
	if maxProbes := uint64(elapsed/maxBackoff) + 1; probes > maxProbes {
		t.Errorf("dead device probed %d times in %v, want at most %d", probes, elapsed, maxProbes)
	}
	// The bus's time taken by the probes, one timeout (plus the request on
	// the wire) each, is what the live devices may lose; plus 10% for
	// scheduling noise between the two buses and a poll at each end of the
	// stretch.
	perProbe := timeout + 20*time.Millisecond
	share := 1 - float64(probes)*float64(perProbe)/float64(elapsed)
	if min := float64(polls7)*share/1.10 - 2; float64(polls8) < min {
		t.Errorf("%d live polls beside a dead device, want at least %.1f (%d alone, %d probes)", polls8, min, polls7, probes)
	}

	// An offline (or never seen) device gets one try per poll: once the
	// bus has stopped, so that no request is in flight, the simulator has
	// seen exactly one request per failed poll.
	r8.stop()
	failed := dead().FailedPolls
	deadline := time.Now().Add(10 * time.Second)
	for uint64(r8.sim.Requests(8)) < failed && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond) // the simulator reads the last one off the pty
	}
	if req := uint64(r8.sim.Requests(8)); req != failed {
		t.Errorf("%d requests to the dead device for %d polls: an offline device gets one try", req, failed)
	}
	for _, c := range r8.rep.onlineChanges() {
		if c.id != devID(8) && !c.online {
			t.Errorf("%s reported offline", c.id)
		}
	}
}

// TestBadFrames: with 5% of replies corrupted (and, in turn, garbage,
// truncated or missing), no wrong value is ever reported and no device
// flaps offline.
func TestBadFrames(t *testing.T) {
	tests := []struct {
		name   string
		faults sim.Faults
		seen   func(h edged.BusHealth) uint64
	}{
		{"corrupt 5%", sim.Faults{Corrupt: 0.05}, func(h edged.BusHealth) uint64 { return h.CRCErrors }},
		{"garbage 5%", sim.Faults{Garbage: 0.05}, nil}, // garbage before a reply is skipped without an error
		{"truncated 5%", sim.Faults{Truncate: 0.05}, func(h edged.BusHealth) uint64 { return h.FrameErrors + h.CRCErrors }},
		{"no reply 5%", sim.Faults{NoReply: 0.05}, func(h edged.BusHealth) uint64 { return h.Timeouts }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel() // each on its own pty; mostly waiting on the wire
			r := startRig(t, rigOptions{baud: 115200, units: 8, timeout: 300 * time.Millisecond, pollInterval: 20 * time.Millisecond,
				setup: func(s *sim.Sim) { s.SetFaults(tt.faults) }})
			// 120 polls: about 480 requests, 24 of them spoilt.
			waitFor(t, 30*time.Second, "120 polls", func() bool { return r.bus.Health().Polls >= 120 })
			h := r.bus.Health()
			if tt.seen != nil && tt.seen(h) == 0 {
				t.Errorf("no faults seen: %+v", h.BusCounters)
			}
			r.rep.mu.Lock()
			defer r.rep.mu.Unlock()
			for n := 1; n <= 8; n++ {
				id := devID(n)
				if len(r.rep.states[id]) == 0 {
					t.Errorf("%s: no state reported", id)
				}
				for _, got := range r.rep.states[id] {
					if diff := cmp.Diff(stateOf(n).want(), got); diff != "" {
						t.Errorf("%s: wrong state reported (-want +got):\n%s", id, diff)
					}
				}
			}
			for _, c := range r.rep.online {
				if !c.online {
					t.Errorf("%s reported offline", c.id)
				}
			}
			t.Logf("%+v", h.BusCounters)
		})
	}
}

// TestUnplugReplug: the port vanishes (the USB adapter is pulled); the
// devices go offline, commands are refused, and when the port comes back
// they come back online without a restart.
func TestUnplugReplug(t *testing.T) {
	r := startRig(t, rigOptions{baud: 115200, units: 4, timeout: 100 * time.Millisecond,
		tune: func(b *Bus) {
			b.reopenMin, b.reopenMax, b.maxBackoff = 50*time.Millisecond, 200*time.Millisecond, 200*time.Millisecond
		}})
	allOnline := func(want bool) func() bool {
		return func() bool {
			for n := 1; n <= 4; n++ {
				if on, known := r.rep.isOnline(devID(n)); !known || on != want {
					return false
				}
			}
			return true
		}
	}
	waitFor(t, 10*time.Second, "all online", allOnline(true))
	if err := r.sim.Unplug(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "all offline", allOnline(false))
	if h := r.bus.Health(); h.PortOpen || h.PortErrors == 0 {
		t.Errorf("health after unplug: open %v, port errors %d", h.PortOpen, h.PortErrors)
	}
	err := r.bus.Send(context.Background(), devID(1), edged.DeviceCommand{CmdID: "u1", Action: edged.ActionStop})
	if edged.ErrorCode(err) != edged.EUNAVAILABLE {
		t.Errorf("Send while unplugged: %v, want unavailable", err)
	}
	r.sim.Update(2, func(u *sim.Unit) { u.Holding[0] = 1 })
	if err := r.sim.Replug(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "all online again", allOnline(true))
	waitFor(t, 10*time.Second, "new state after replug", func() bool {
		s, _ := r.rep.last(devID(2))
		return s.Status == edged.StatusInUse
	})
	if h := r.bus.Health(); !h.PortOpen || h.Opens != 2 {
		t.Errorf("health after replug: open %v, opens %d, want true, 2", h.PortOpen, h.Opens)
	}
	if err := r.bus.Send(context.Background(), devID(1), edged.DeviceCommand{CmdID: "u2", Action: edged.ActionStop}); err != nil {
		t.Errorf("Send after replug: %v", err)
	}
	waitFor(t, 10*time.Second, "ack after replug", func() bool { a, ok := r.rep.ack(devID(1), "u2"); return ok && a.OK })
}

// TestSlowAndFailingDevices: a slow device within the timeout is fine; one
// slower than the timeout and one answering exceptions are counted in the
// health and go offline, without taking their neighbour down.
func TestSlowAndFailingDevices(t *testing.T) {
	r := startRig(t, rigOptions{baud: 115200, units: 4, timeout: 150 * time.Millisecond,
		tune: func(b *Bus) { b.maxBackoff = 500 * time.Millisecond },
		setup: func(s *sim.Sim) {
			s.Update(1, func(u *sim.Unit) { u.Delay = 60 * time.Millisecond })
			s.Update(2, func(u *sim.Unit) { u.Delay = 400 * time.Millisecond })
			s.Update(3, func(u *sim.Unit) { u.Exception = 2 })
		}})
	waitFor(t, 10*time.Second, "slow unit 1 reported", func() bool { _, ok := r.rep.last(devID(1)); return ok })
	if got, _ := r.rep.last(devID(1)); !cmp.Equal(got, stateOf(1).want()) {
		t.Errorf("slow unit 1 state = %+v", got)
	}
	for _, n := range []int{2, 3} {
		waitFor(t, 10*time.Second, fmt.Sprintf("unit %d offline", n), func() bool {
			on, known := r.rep.isOnline(devID(n))
			return known && !on
		})
	}
	h := r.bus.Health()
	if d := h.Devices[1]; d.Timeouts == 0 {
		t.Errorf("too-slow unit: no timeouts counted: %+v", d)
	}
	if d := h.Devices[2]; d.Exceptions == 0 || d.LastError != "modbus exception 2 (illegal data address)" {
		t.Errorf("exception unit: %d exceptions, last error %q", d.Exceptions, d.LastError)
	}
	for _, n := range []int{1, 4} {
		if on, _ := r.rep.isOnline(devID(n)); !on {
			t.Errorf("unit %d not online", n)
		}
	}
	for _, c := range r.rep.onlineChanges() {
		if (c.id == devID(1) || c.id == devID(4)) && !c.online {
			t.Errorf("%s reported offline", c.id)
		}
	}
}

// TestCommandsJumpThePollQueue: on a saturated bus a command waits for the
// poll in progress, not for a whole round of polls.
func TestCommandsJumpThePollQueue(t *testing.T) {
	r := startRig(t, rigOptions{baud: 9600, units: 8, pollInterval: 10 * time.Millisecond})
	waitFor(t, 10*time.Second, "all polled twice", func() bool {
		for _, d := range r.bus.Health().Devices {
			if d.Polls < 2 {
				return false
			}
		}
		return true
	})
	// The quickest of three commands to three devices: a command queued
	// behind the polls would wait about a round every time, while one
	// stall of a loaded machine delays only one of them.
	cycle := r.bus.Health().Devices[0].PollPeriod
	var latency time.Duration
	for i, n := range []int{5, 2, 7} {
		id, cmdID := devID(n), fmt.Sprintf("q%d", i)
		start := time.Now()
		if err := r.bus.Send(context.Background(), id, edged.DeviceCommand{CmdID: cmdID, Action: edged.ActionStop}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "ack", func() bool { _, ok := r.rep.ack(id, cmdID); return ok })
		if d := time.Since(start); i == 0 || d < latency {
			latency = d
		}
	}
	t.Logf("quickest command acked in %v; a round of polls takes %v", latency, cycle)
	if latency > cycle/2 {
		t.Errorf("commands took at least %v, more than half a poll round (%v)", latency, cycle)
	}
}
