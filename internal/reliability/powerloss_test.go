package reliability

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// TestPowerLoss cuts the power (SIGKILL) of the real binary at random
// points under mixed load, again and again: devices publishing events as
// fast as they get PUBACKs, the cloud granting short rentals that expire,
// the outbox draining to the cloud broker. After every restart the store
// opens; at the end nothing acknowledged is lost (every device event whose
// PUBACK the device got is in the log or reached the cloud; every grant the
// station PUBACKed to the cloud broker has a rental.result), seq has no gap
// and no repeat, and no rental ran past its end by more than 5 s beyond
// the time edged was dead.
//
// CI: 10 kills. EDGED_LONG=1: 50.
func TestPowerLoss(t *testing.T) {
	bin := edgedBinary(t)
	kills := pick(10, 50)
	dir := t.TempDir()
	cl := newCloud(t)
	local := freeAddr(t)
	devs := []string{"chair-1", "chair-2", "chair-3", "chair-4"}
	cfg := writeConfig(t, stationConfig{Dir: dir, Local: local, Cloud: cl.Addr, Devices: devs})
	logPath := filepath.Join(dir, "edged.log")
	dumpLog(t, logPath)
	argv := []string{bin, "-config", cfg}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var chatty []*chattyDevice
	for _, id := range devs {
		c := &chattyDevice{ID: id, Broker: "tcp://" + local, Pause: 5 * time.Millisecond}
		chatty = append(chatty, c)
		wg.Add(1)
		go c.run(stop, &wg)
	}
	// The cloud grants a rental every 200 ms, of 1 to 4 s, round robin.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := 1; ; n++ {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			cl.send("stations/mall-1/down/rentals", map[string]any{"op": "grant", "rental_id": fmt.Sprintf("r-%d", n),
				"device_id": devs[n%len(devs)], "renter_id": "alice", "duration_s": 1 + n%4})
		}
	}()

	type interval struct{ from, to time.Time }
	var down []interval
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 8))
	start := time.Now()
	for i := 0; i < kills; i++ {
		d := startDaemon(t, argv, local, logPath)
		if i > 0 {
			down[len(down)-1].to = time.Now()
		}
		time.Sleep(time.Duration(300+rng.IntN(2700)) * time.Millisecond)
		d.kill()
		down = append(down, interval{from: time.Now()})
	}
	// Power stays on: every rental ends and the outbox drains.
	d := startDaemon(t, argv, local, logPath)
	down[len(down)-1].to = time.Now()
	close(stop)
	wg.Wait()
	time.Sleep(6 * time.Second)
	waitDrained(t, cl, 20*time.Second)
	d.stop()
	elapsed := time.Since(start)

	db := openStore(t, dir)
	logged, err := db.Events(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	stats := db.OutboxStats(time.Now())
	delivered := cl.Events()

	// seq: the log is contiguous up to the last seq; together with what the
	// cloud got it covers 1..last; a seq never names two events.
	all := map[uint64]edged.Event{}
	for s, e := range delivered {
		all[s] = e
	}
	for i, e := range logged {
		if i > 0 && e.Seq != logged[i-1].Seq+1 {
			t.Fatalf("log has a gap: seq %d after %d", e.Seq, logged[i-1].Seq)
		}
		if c, ok := delivered[e.Seq]; ok && (c.Type != e.Type || string(c.Data) != string(e.Data)) {
			t.Fatalf("seq %d is %s %s in the store but %s %s at the cloud", e.Seq, e.Type, e.Data, c.Type, c.Data)
		}
		all[e.Seq] = e
	}
	last := stats.LastSeq
	for s := uint64(1); s <= last; s++ {
		if _, ok := all[s]; !ok {
			t.Fatalf("seq %d is neither in the log nor delivered (last %d)", s, last)
		}
	}
	for s := range delivered {
		if s > last {
			t.Fatalf("cloud got seq %d beyond the store's last %d: a seq was reused after a crash", s, last)
		}
	}

	// Device events: every PUBACKed one survived.
	have := map[string]bool{}
	results := map[string]int{}
	started := map[string]edged.RentalStartedData{}
	ended := map[string]edged.RentalEndedData{}
	for s := uint64(1); s <= last; s++ {
		e := all[s]
		switch e.Type {
		case edged.EventDeviceEvent:
			var d edged.DeviceEventData
			json.Unmarshal(e.Data, &d)
			var ev struct{ ID string }
			json.Unmarshal(d.Event, &ev)
			have[ev.ID] = true
		case edged.EventRentalResult:
			var r edged.RentalResultData
			json.Unmarshal(e.Data, &r)
			if r.Op == "" || r.Op == edged.OpGrant {
				results[r.RentalID]++
			}
		case edged.EventRentalStarted:
			var r edged.RentalStartedData
			json.Unmarshal(e.Data, &r)
			if _, dup := started[r.RentalID]; dup {
				t.Errorf("rental %s started twice", r.RentalID)
			}
			started[r.RentalID] = r
		case edged.EventRentalEnded:
			var r edged.RentalEndedData
			json.Unmarshal(e.Data, &r)
			if _, dup := ended[r.RentalID]; dup {
				t.Errorf("rental %s ended twice", r.RentalID)
			}
			ended[r.RentalID] = r
		}
	}
	ackedEvents, lost := 0, 0
	for _, c := range chatty {
		for _, id := range c.Acked() {
			ackedEvents++
			if !have[id] {
				lost++
				if lost < 10 {
					t.Errorf("device event %s got its PUBACK but is lost", id)
				}
			}
		}
	}
	// Grants: every one the station acknowledged has its result.
	ackedGrants, noResult := 0, 0
	for _, p := range cl.Acked() {
		m, err := edged.ParseRentalMessage(p)
		if err != nil || m.Op != edged.OpGrant {
			continue
		}
		ackedGrants++
		if results[m.RentalID] == 0 {
			noResult++
			if noResult < 10 {
				t.Errorf("grant %s was acknowledged to the cloud broker but has no rental.result", m.RentalID)
			}
		}
	}
	// Rentals: each started one ended, no later than 5 s past its end
	// plus the time edged was dead in between.
	worst := time.Duration(0)
	for id, s := range started {
		e, ok := ended[id]
		if !ok {
			t.Errorf("rental %s started at %s and never ended", id, s.StartedAt)
			continue
		}
		end := s.StartedAt.Add(time.Duration(s.DurationS) * time.Second)
		deadTime := time.Duration(0)
		for _, iv := range down {
			from, to := maxTime(iv.from, s.StartedAt), minTime(iv.to, e.EndedAt)
			if to.After(from) {
				deadTime += to.Sub(from)
			}
		}
		over := e.EndedAt.Sub(end) - deadTime
		if over > worst {
			worst = over
		}
		if over > 5*time.Second {
			t.Errorf("rental %s ran %v past its end (beyond %v edged was dead)", id, over, deadTime)
		}
	}
	ids := make([]string, 0, len(started))
	for id := range started {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	t.Logf("power loss: %d kills survived in %v; %d events (last seq %d), %d delivered; device events PUBACKed %d, lost %d; grants PUBACKed %d, without result %d; rentals started %d, ended %d, worst overrun beyond dead time %v",
		kills, elapsed.Round(time.Second), len(all), last, len(delivered), ackedEvents, lost, ackedGrants, noResult,
		len(started), len(ended), worst.Round(time.Millisecond))
	if ackedEvents == 0 || ackedGrants == 0 || len(started) == 0 {
		t.Fatalf("the load did not happen: %d events, %d grants, %d rentals", ackedEvents, ackedGrants, len(started))
	}
}

// waitDrained waits until the cloud's events stop growing for a second.
func waitDrained(t *testing.T, cl *cloud, max time.Duration) {
	deadline := time.Now().Add(max)
	prev := -1
	for time.Now().Before(deadline) {
		n := len(cl.Events())
		if n == prev {
			return
		}
		prev = n
		time.Sleep(time.Second)
	}
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
