package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"time"
)

// rentalPhase is one grant rate.
type rentalPhase struct {
	rate int           // grants per second
	dur  time.Duration // how long grants are sent
}

type latencies struct {
	sent, got int
	p50, p99  time.Duration
	max       time.Duration
	// commits per second during the phase and changes per commit, read
	// from edged's /metrics (zero for the bridge, or an edged without the
	// counter).
	commitsPerS, changesPerCommit float64
	// store is edged's write counters while grants were sent, secs
	// long; all runs on until the phase's rentals ended.
	store, all storeCounters
	secs       float64
}

func summarize(sent int, ds []time.Duration) latencies {
	l := latencies{sent: sent, got: len(ds)}
	if len(ds) == 0 {
		return l
	}
	slices.Sort(ds)
	l.p50, l.p99, l.max = nearestRank(ds, 50), nearestRank(ds, 99), ds[len(ds)-1]
	return l
}

// nearestRank is the pct-th percentile of sorted ds: the smallest value
// with at least pct % of ds at or below it. Of 100 grants, p99 is the
// second slowest, and max is reported beside it.
func nearestRank(ds []time.Duration, pct int) time.Duration {
	rank := (pct*len(ds) + 99) / 100 // ceil(pct/100 × n), in integers
	return ds[max(rank, 1)-1]
}

// runRentals sends grants through the cloud broker at cloudAddr and
// measures, at the device, publish -> start. For edged the grant is a
// rental message on R/S/down/rentals; for the bridge it is the start
// command itself, published where the bridge maps it onto
// devices/D/commands (the scripts a bridge needs are not in the path).
func (b *bench) runRentals(gwAddr, cloudAddr, httpAddr string, creds, edged bool, pool int, phases []rentalPhase) ([]latencies, error) {
	var (
		mu     sync.Mutex
		sentAt = map[string]time.Time{}
		got    []time.Duration
	)
	onCmd := func(i int, c *client, topic string, payload []byte) {
		now := time.Now()
		var cmd struct {
			CmdID    string `json:"cmd_id"`
			Action   string `json:"action"`
			RentalID string `json:"rental_id"`
		}
		if json.Unmarshal(payload, &cmd) != nil {
			return
		}
		if cmd.Action == "start" {
			mu.Lock()
			if t0, ok := sentAt[cmd.RentalID]; ok {
				got = append(got, now.Sub(t0))
				delete(sentAt, cmd.RentalID)
			}
			mu.Unlock()
		}
		if edged && c != nil {
			ack := fmt.Appendf(nil, `{"cmd_id":%q,"ok":true}`, cmd.CmdID)
			go c.publish("devices/"+deviceID(i)+"/commands/ack", ack, true)
		}
	}
	f, err := connectFleet(gwAddr, pool, 64, creds, true, onCmd)
	if err != nil {
		return nil, err
	}
	defer f.close()
	if edged {
		for i, c := range f.clients {
			c.publish("devices/"+deviceID(i)+"/state", []byte(`{"status":"idle"}`), true)
		}
	}
	cloud, err := dial(dialOptions{addr: cloudAddr, id: "bench-cloud-pub", clean: true, window: 4096, timeout: 10 * time.Second})
	if err != nil {
		return nil, err
	}
	defer cloud.Close()
	time.Sleep(2 * time.Second) // edged's uplink connects and subscribes; states settle
	var out []latencies
	next := 0
	for pi, ph := range phases {
		mu.Lock()
		got = got[:0]
		clear(sentAt)
		mu.Unlock()
		n := int(float64(ph.rate) * ph.dur.Seconds())
		interval := time.Second / time.Duration(ph.rate)
		m0 := readCounters(httpAddr)
		t0 := time.Now()
		for k := range n {
			if d := time.Until(t0.Add(time.Duration(k) * interval)); d > 0 {
				time.Sleep(d)
			}
			dev := deviceID(next % pool)
			next++
			rid := fmt.Sprintf("r%d-%d", pi, k)
			var topic string
			var msg []byte
			if edged {
				topic = "stations/" + stationID + "/down/rentals"
				msg = fmt.Appendf(nil, `{"op":"grant","rental_id":%q,"device_id":%q,"renter_id":"u-%d","duration_s":1}`, rid, dev, k)
			} else {
				topic = "stations/" + stationID + "/dev/" + dev + "/commands"
				msg = fmt.Appendf(nil, `{"cmd_id":"c-%s","action":"start","rental_id":%q,"duration_s":1}`, rid, rid)
			}
			mu.Lock()
			sentAt[rid] = time.Now()
			mu.Unlock()
			if err := cloud.publish(topic, msg, true); err != nil {
				return nil, err
			}
		}
		// Read at once: the rates are those of granting at this rate.
		mSent := readCounters(httpAddr)
		sentFor := time.Since(t0).Seconds()
		// Wait for the stragglers (bounded), then let 1 s rentals end.
		deadline := time.Now().Add(15 * time.Second)
		for time.Now().Before(deadline) {
			mu.Lock()
			left := len(sentAt)
			mu.Unlock()
			if left == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		m1 := readCounters(httpAddr)
		mu.Lock()
		l := summarize(n, slices.Clone(got))
		mu.Unlock()
		if d := m1.since(m0); d.commits > 0 {
			l.commitsPerS = d.commits / time.Since(t0).Seconds()
			l.changesPerCommit = d.changes / d.commits
		}
		time.Sleep(2500 * time.Millisecond)
		l.store, l.secs, l.all = mSent.since(m0), sentFor, readCounters(httpAddr).since(m0)
		out = append(out, l)
	}
	return out, nil
}

// rentalTargets are the grant -> start p99 targets by grant rate.
var rentalTargets = map[int]time.Duration{10: 5 * time.Millisecond, 100: 10 * time.Millisecond, 1000: 50 * time.Millisecond}

// scenarioRental: cloud grant -> start at the device.
func (b *bench) scenarioRental(t *table) error {
	// 30 s at 10/s: 300 grants, so p99 is not one unlucky fsync.
	phases := []rentalPhase{{10, 30 * time.Second}, {100, 10 * time.Second}, {1000, 3 * time.Second}}
	if b.quick {
		phases = []rentalPhase{{10, 3 * time.Second}, {100, 3 * time.Second}, {1000, 1 * time.Second}}
	}
	pool := 0
	for _, p := range phases {
		pool = max(pool, int(float64(p.rate)*p.dur.Seconds()))
	}

	cloud, err := b.startMosquitto("rental-cloud", mosqOptions{extra: cloudConfig})
	if err != nil {
		return err
	}
	defer cloud.kill(15)
	httpAddr := freeAddr()
	e, err := b.startEdged("rental", edgedOptions{devices: pool, uplinkURL: "tcp://" + cloud.addr, httpAddr: httpAddr})
	if err != nil {
		return err
	}
	el, err := b.runRentals(e.addr, cloud.addr, httpAddr, true, true, pool, phases)
	e.kill(15)
	if err != nil {
		return fmt.Errorf("edged: %w", err)
	}

	cloud2, err := b.startMosquitto("rental-cloud-bridge", mosqOptions{extra: cloudConfig})
	if err != nil {
		return err
	}
	defer cloud2.kill(15)
	edge, err := b.startMosquitto("rental-edge-bridge", mosqOptions{extra: fmt.Sprintf(
		"connection cloud\naddress %s\ntopic # in 1 devices/ stations/%s/dev/\nrestart_timeout 1\n", cloud2.addr, stationID)})
	if err != nil {
		return err
	}
	defer edge.kill(15)
	ml, err := b.runRentals(edge.addr, cloud2.addr, "", false, false, pool, phases)
	if err != nil {
		return fmt.Errorf("bridge: %w", err)
	}
	ms := func(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d.Microseconds())/1000) }
	for i, p := range phases {
		a, m := el[i], ml[i]
		b.logf("rental %d/s: edged %d/%d p50 %v p99 %v max %v; bridge %d/%d p50 %v p99 %v max %v; edged commits %.1f/s, %.2f changes each",
			p.rate, a.got, a.sent, a.p50, a.p99, a.max, m.got, m.sent, m.p50, m.p99, m.max, a.commitsPerS, a.changesPerCommit)
		cell := func(l latencies) string {
			return fmt.Sprintf("%s / %s / %s ms (%d of %d)", ms(l.p50), ms(l.p99), ms(l.max), l.got, l.sent)
		}
		target, v := "", ""
		if goal, ok := rentalTargets[p.rate]; ok {
			ratio := ""
			if m.p99 > 0 {
				ratio = fmt.Sprintf(", %.1fx the bridge's p99", float64(a.p99)/float64(m.p99))
			}
			target = fmt.Sprintf("p99 < %s ms, every grant started", ms(goal))
			v = verdict(a.p99 < goal && a.got == a.sent, fmt.Sprintf("p99 %s ms%s, %d of %d started", ms(a.p99), ratio, a.got, a.sent))
		}
		t.add("rental latency", fmt.Sprintf("%d grants/s: p50 / p99 / max", p.rate), cell(a), "bridge, no logic: "+cell(m), target, v)
		if a.commitsPerS > 0 {
			t.add("rental fsyncs", fmt.Sprintf("%d grants/s: store commits per second", p.rate),
				fmt.Sprintf("%.1f/s, %.2f decisions each", a.commitsPerS, a.changesPerCommit), "", "", "")
		}
		b.logf("rental %d/s: store %+v over %.1f s; through the ends %+v", p.rate, a.store, a.secs, a.all)
		b.logf("rental %d/s: store write time %s", p.rate, writeTimeCell(a.store, rentalTargets[p.rate]))
		fs := fsyncCell(a.store, a.secs)
		if a.all.ok && a.sent > 0 {
			fs += fmt.Sprintf("; %.2f fsyncs per grant, its start, ack, end and uplink acks included", a.all.fsyncs/float64(a.sent))
		}
		t.add("rental fsyncs", fmt.Sprintf("%d grants/s: fsyncs while granting", p.rate), fs,
			"none: the bridge keeps messages in memory", "", "")
		// A grant waits for its own write transaction, and for the one in
		// flight when it came: the disk's tail is the grants' floor.
		t.add("rental fsyncs", fmt.Sprintf("%d grants/s: store write time while granting", p.rate),
			writeTimeCell(a.store, rentalTargets[p.rate]), "", "", "")
	}
	return nil
}
