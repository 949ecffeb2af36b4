package main

import (
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// ingestResult is one broker under one load.
type ingestResult struct {
	rate       float64 // PUBACKs per second
	cpuPct     float64 // of one core, over the measured interval
	hwmMB      float64
	rssMB      float64
	writeBytes int64 // bytes the broker wrote over the measured interval
	acked      int64 // PUBACKs over the measured interval
	connect    time.Duration
	benchPct   float64 // this process (the load generator), % of one core
	otherPct   float64 // the rest of the machine (other processes, kernel softirq), % of one core
}

// ingestWindow is each device's QoS 1 publishes in flight. mochi (edged)
// handles one client's packets in order, so more than a few only queue.
const ingestWindow = 8

// runIngest connects n devices to a broker (pid) at addr and has each
// publish QoS 1 on devices/D/<kind> as fast as its window allows, for
// warm then dur; it measures over dur only.
func runIngest(pid func() int, addr string, n int, creds bool, kind string, warm, dur time.Duration) (ingestResult, error) {
	var res ingestResult
	t0 := time.Now()
	f, err := connectFleet(addr, n, ingestWindow, creds, false, nil)
	if err != nil {
		return res, err
	}
	defer f.close()
	res.connect = time.Since(t0)
	var stop atomic.Bool
	var wg sync.WaitGroup
	for i, c := range f.clients {
		wg.Go(func() {
			topic := "devices/" + deviceID(i) + "/" + kind
			buf := make([]byte, 0, 96)
			for k := 0; !stop.Load(); k++ {
				buf = buf[:0]
				switch kind {
				case "events":
					buf = append(buf, `{"type":"tick","id":"`...)
					buf = append(buf, deviceID(i)...)
					buf = append(buf, '-')
					buf = strconv.AppendInt(buf, int64(k), 10)
					buf = append(buf, `"}`...)
				default: // telemetry
					buf = append(buf, `{"power_w":`...)
					buf = strconv.AppendInt(buf, int64(k%2000), 10)
					buf = append(buf, `,"temp_c":21.5}`...)
				}
				if err := c.publish(topic, buf, false); err != nil {
					return
				}
			}
			c.flush()
		})
	}
	time.Sleep(warm)
	a0, s0, me0, all0 := f.acked(), readStat(pid()), readStat(os.Getpid()), machineBusy()
	m0 := time.Now()
	time.Sleep(dur)
	a1, s1, me1, all1 := f.acked(), readStat(pid()), readStat(os.Getpid()), machineBusy()
	el := time.Since(m0).Seconds()
	stop.Store(true)
	// Publishers blocked on a full window wake up as acks arrive; close
	// the connections if they do not within a bound.
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		f.close()
		<-done
	}
	res.acked = a1 - a0
	res.rate = float64(a1-a0) / el
	res.cpuPct = float64(s1.cpuTicks-s0.cpuTicks) / clkTck / el * 100
	res.benchPct = float64(me1.cpuTicks-me0.cpuTicks) / clkTck / el * 100
	res.otherPct = float64((all1-all0)-(s1.cpuTicks-s0.cpuTicks)-(me1.cpuTicks-me0.cpuTicks)) / clkTck / el * 100
	res.hwmMB = float64(s1.hwmKB) / 1024
	res.rssMB = float64(s1.rssKB) / 1024
	res.writeBytes = s1.writeBytes - s0.writeBytes
	return res, nil
}

// scenarioIngest: durable ingest on edged beside plain mosquitto.
func (b *bench) scenarioIngest(t *table) error {
	sizes := []int{100, 1000, 5000}
	warm, dur := 2*time.Second, 15*time.Second
	kinds := []string{"events", "telemetry"}
	if b.quick {
		warm, dur = 1*time.Second, 4*time.Second
		kinds = []string{"events"}
		sizes = []int{100, 1000} // 5,000 only in the full run
	}
	var best float64
	var bestPeer float64
	for _, kind := range kinds {
		for _, n := range sizes {
			e, err := b.startEdged(fmt.Sprintf("ingest-%s-%d", kind, n), edgedOptions{devices: n})
			if err != nil {
				return err
			}
			er, err := runIngest(e.pid, e.addr, n, true, kind, warm, dur)
			e.kill(15)
			if err != nil {
				return fmt.Errorf("edged ingest %d: %w", n, err)
			}
			m, err := b.startMosquitto(fmt.Sprintf("ingest-%s-%d", kind, n), mosqOptions{})
			if err != nil {
				return err
			}
			mr, err := runIngest(m.pid, m.addr, n, false, kind, warm, dur)
			m.kill(15)
			if err != nil {
				return fmt.Errorf("mosquitto ingest %d: %w", n, err)
			}
			b.logf("ingest %s n=%d: edged %.0f/s cpu %.0f%% hwm %.1f MB (connect %v); mosquitto %.0f/s cpu %.0f%% hwm %.1f MB",
				kind, n, er.rate, er.cpuPct, er.hwmMB, er.connect.Round(time.Millisecond), mr.rate, mr.cpuPct, mr.hwmMB)
			sc := "ingest " + kind
			t.add(sc, fmt.Sprintf("%d devices: msg/s PUBACKed", n), fmtRate(er.rate), fmtRate(mr.rate), "", "")
			cpu := func(r ingestResult) string {
				return fmt.Sprintf("%.0f (load generator %.0f, rest of machine %.0f)", r.cpuPct, r.benchPct, max(r.otherPct, 0))
			}
			t.add(sc, fmt.Sprintf("%d devices: CPU %% of one core", n), cpu(er), cpu(mr), "", "")
			t.add(sc, fmt.Sprintf("%d devices: VmHWM / VmRSS MB", n), fmt.Sprintf("%.1f / %.1f", er.hwmMB, er.rssMB), fmt.Sprintf("%.1f / %.1f", mr.hwmMB, mr.rssMB), "", "")
			if kind == "events" && er.rate > best {
				best, bestPeer = er.rate, mr.rate
			}
		}
	}
	t.add("ingest events", "best durable rate", fmtRate(best), fmtRate(bestPeer), ">= 30,000 msg/s", verdict(best >= 30000, fmt.Sprintf("%.0f%% of target", best/30000*100)))
	if bestPeer > 0 {
		t.add("ingest events", "best rate / mosquitto's", fmt.Sprintf("%.2f", best/bestPeer), "1", ">= 0.5", verdict(best/bestPeer >= 0.5, fmt.Sprintf("%.0f%% of target", best/bestPeer/0.5*100)))
	}
	return b.scenarioPaced(t)
}

// pacedResult is one broker under a paced load of device events.
type pacedResult struct {
	sent, acked int64
	secs        float64       // how long sending took
	writeBytes  int64         // the broker's disk writes while sending
	store       storeCounters // edged's write counters while sending
}

// runPaced connects n devices to a broker (pid) at addr and has them send
// QoS 1 device events (devices/D/events) in turn, rate per second in all,
// for dur. With httpAddr (edged) it reads the store's counters around the
// sending.
func runPaced(pid func() int, addr, httpAddr string, n int, creds bool, rate int, dur time.Duration) (pacedResult, error) {
	var res pacedResult
	f, err := connectFleet(addr, n, ingestWindow, creds, false, nil)
	if err != nil {
		return res, err
	}
	defer f.close()
	time.Sleep(2 * time.Second) // the connects' presence events settle
	total := int64(float64(rate) * dur.Seconds())
	interval := time.Second / time.Duration(rate)
	a0, m0, s0 := f.acked(), readCounters(httpAddr), readStat(pid())
	t0 := time.Now()
	buf := make([]byte, 0, 96)
	for k := range total {
		if d := time.Until(t0.Add(time.Duration(k) * interval)); d > 0 {
			time.Sleep(d)
		}
		i := int(k % int64(n))
		buf = append(buf[:0], `{"type":"tick","id":"`...)
		buf = append(buf, deviceID(i)...)
		buf = append(buf, '-')
		buf = strconv.AppendInt(buf, k, 10)
		buf = append(buf, `"}`...)
		if err := f.clients[i].publish("devices/"+deviceID(i)+"/events", buf, true); err != nil {
			return res, err
		}
		res.sent++
	}
	res.secs = time.Since(t0).Seconds()
	m1, s1 := readCounters(httpAddr), readStat(pid())
	res.store, res.writeBytes = m1.since(m0), s1.writeBytes-s0.writeBytes
	// Every event sent is PUBACKed once durable; wait for the last (bounded).
	for deadline := time.Now().Add(10 * time.Second); f.acked()-a0 < total && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	res.acked = f.acked() - a0
	return res, nil
}

// scenarioPaced: 1,000 devices sending 1,000 device events a second in
// all, the fsyncs edged pays for them beside what they carried.
func (b *bench) scenarioPaced(t *table) error {
	const n, rate = 1000, 1000
	dur := 10 * time.Second
	if b.quick {
		dur = 3 * time.Second
	}
	httpAddr := freeAddr()
	e, err := b.startEdged("ingest-paced", edgedOptions{devices: n, httpAddr: httpAddr})
	if err != nil {
		return err
	}
	er, err := runPaced(e.pid, e.addr, httpAddr, n, true, rate, dur)
	e.kill(15)
	if err != nil {
		return fmt.Errorf("edged paced ingest: %w", err)
	}
	m, err := b.startMosquitto("ingest-paced", mosqOptions{})
	if err != nil {
		return err
	}
	mr, err := runPaced(m.pid, m.addr, "", n, false, rate, dur)
	m.kill(15)
	if err != nil {
		return fmt.Errorf("mosquitto paced ingest: %w", err)
	}
	b.logf("paced ingest: edged %+v; mosquitto %+v", er, mr)
	what := fmt.Sprintf("%s devices, %s events/s for %v", fmtRate(n), fmtRate(rate), dur)
	sent := func(r pacedResult) string {
		return fmt.Sprintf("%d of %d PUBACKed, sent in %.2f s; disk writes %.0f kB/s", r.acked, r.sent, r.secs, float64(r.writeBytes)/1024/r.secs)
	}
	t.add("ingest paced", what+": events", sent(er), sent(mr), "", "")
	fs := fsyncCell(er.store, er.secs)
	if er.store.ok && er.store.fsyncs > 0 {
		fs += fmt.Sprintf("; %.2f events per fsync, %.2f per write tx", float64(er.sent)/er.store.fsyncs, per(float64(er.sent), er.store.tx()))
	}
	t.add("ingest paced", what+": fsyncs", fs, "none: mosquitto keeps messages in memory", "", "")
	return nil
}

func fmtRate(r float64) string {
	s := strconv.FormatInt(int64(r+0.5), 10)
	var out []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out)
}

func verdict(ok bool, detail string) string {
	if ok {
		return "MET (" + detail + ")"
	}
	return "MISSED (" + detail + ")"
}
