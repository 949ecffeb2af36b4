package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/faultproxy"
)

// cloudConfig is the stand-in cloud's mosquitto: it never drops a QoS 1
// message for the subscriber the bench keeps connected.
const cloudConfig = "max_queued_messages 0\nmax_inflight_messages 1000\n"

// counter counts what the cloud received: deliveries, unique ids and
// duplicates (edged: by seq; mosquitto: by the id in each payload).
type counter struct {
	mu          sync.Mutex
	seen        map[string]bool
	deliveries  int
	first, last time.Time
	progress    atomic.Int64 // unique ids, for waiting
}

func newCounter() *counter { return &counter{seen: map[string]bool{}} }

func (c *counter) add(key string) {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.deliveries == 0 {
		c.first = now
	}
	c.deliveries++
	c.last = now
	if !c.seen[key] {
		c.seen[key] = true
		c.progress.Add(1)
	}
}

// wait returns once want unique ids arrived, or nothing arrived for idle
// (20 s before the first one: a gateway's reconnect delay), or after max.
func (c *counter) wait(want int64, idle, max time.Duration) {
	deadline := time.Now().Add(max)
	lastN, lastT := c.progress.Load(), time.Now()
	for time.Now().Before(deadline) {
		n := c.progress.Load()
		if n >= want {
			return
		}
		limit := idle
		if n == 0 {
			limit = 20 * time.Second
		}
		if n != lastN {
			lastN, lastT = n, time.Now()
		} else if time.Since(lastT) > limit {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cloudSubscriber connects to the cloud broker and feeds c with the key of
// every message on filter. edged's envelope is keyed by seq and only its
// device.event records count; a bridged message is keyed by its id.
func cloudSubscriber(addr, filter string, edgedEnvelope bool, c *counter) (*client, error) {
	var envelope struct {
		Seq  uint64 `json:"seq"`
		Type string `json:"type"`
	}
	var raw struct {
		ID string `json:"id"`
	}
	cl, err := dial(dialOptions{addr: addr, id: "bench-cloud-sub", clean: true, window: 1, timeout: 10 * time.Second,
		onPublish: func(topic string, payload []byte) {
			if edgedEnvelope {
				envelope.Type = ""
				if json.Unmarshal(payload, &envelope) == nil && envelope.Type == "device.event" {
					c.add(strconv.FormatUint(envelope.Seq, 10))
				}
				return
			}
			if bytes.HasPrefix(payload, []byte(`{"type"`)) && json.Unmarshal(payload, &raw) == nil {
				c.add(raw.ID)
			}
		}})
	if err != nil {
		return nil, err
	}
	if err := cl.subscribe(filter, 10*time.Second); err != nil {
		cl.Close()
		return nil, err
	}
	return cl, nil
}

// publishBacklog has devices publish total events, spread evenly, and
// waits for every PUBACK. It returns how many were acknowledged.
func publishBacklog(addr string, devices, total int, creds bool) (int64, time.Duration, error) {
	f, err := connectFleet(addr, devices, ingestWindow, creds, false, nil)
	if err != nil {
		return 0, 0, err
	}
	defer f.close()
	t0 := time.Now()
	var wg sync.WaitGroup
	per := total / devices
	for i, c := range f.clients {
		wg.Go(func() {
			topic := "devices/" + deviceID(i) + "/events"
			for k := range per {
				p := fmt.Appendf(nil, `{"type":"tick","id":"%s-%d"}`, deviceID(i), k)
				if c.publish(topic, p, false) != nil {
					return
				}
			}
			c.drainWindow(60 * time.Second)
		})
	}
	wg.Wait()
	return f.acked(), time.Since(t0), nil
}

// drainKills are the kill patterns: none; SIGKILL 3 s after the backlog is
// in (offline); SIGKILL at once after the last PUBACK (acked); SIGKILL when
// 30% has reached the cloud (mid).
var drainKills = []string{"none", "offline", "acked", "mid"}

// drainCase is one gateway under one kill pattern.
type drainCase struct {
	gateway string // edged, mosquitto-default, mosquitto-safe
	kill    string // none, offline, mid
}

type drainResult struct {
	acked            int64         // events the gateway acknowledged to devices
	unique, dup      int           // at the cloud
	drain            time.Duration // cloud start -> last event
	rate             float64       // events/s first -> last
	backlogPublishIn time.Duration
}

// gateway is edged or an edge mosquitto bridging to the cloud.
type gateway interface {
	pid() int
	kill(sig syscallSignal)
	restart() error
	deviceAddr() string
}

func (b *bench) runDrain(dc drainCase, total int) (drainResult, error) {
	var res drainResult
	const devices = 100
	// The cloud runs from the start with the bench's subscriber on it, so
	// nothing the gateway delivers can arrive before the subscription; the
	// gateway reaches it through a proxy that refuses every connection
	// (accepts and closes) until the cloud "comes up".
	cloud, err := b.startMosquitto("cloud-"+dc.gateway+"-"+dc.kill, mosqOptions{extra: cloudConfig})
	if err != nil {
		return res, err
	}
	defer cloud.kill(9)
	c := newCounter()
	filter, env := "devices/+/events", false
	if dc.gateway == "edged" {
		filter, env = "stations/"+stationID+"/up/events", true
	}
	sub, err := cloudSubscriber(cloud.addr, filter, env, c)
	if err != nil {
		return res, err
	}
	defer sub.Close()
	link, err := faultproxy.New(cloud.addr)
	if err != nil {
		return res, err
	}
	defer link.Close()
	link.Cut()
	cloudAddr := link.Addr()

	var (
		gw    gateway
		creds bool
	)
	switch dc.gateway {
	case "edged":
		e, err := b.startEdged("drain-"+dc.kill, edgedOptions{devices: devices, uplinkURL: "tcp://" + cloudAddr})
		if err != nil {
			return res, err
		}
		gw, creds = edgedGateway{e}, true
	default:
		extra := fmt.Sprintf("connection cloud\naddress %s\ntopic devices/+/events out 1\nrestart_timeout 1\n", cloudAddr)
		if dc.gateway == "mosquitto-safe" {
			extra = "persistence true\nautosave_interval 1\nmax_queued_messages 0\n" + extra + "cleansession false\n"
		}
		m, err := b.startMosquitto("edge-"+dc.gateway+"-"+dc.kill, mosqOptions{extra: extra})
		if err != nil {
			return res, err
		}
		gw = mosqGateway{m}
	}
	defer gw.kill(9)
	acked, took, err := publishBacklog(gw.deviceAddr(), devices, total, creds)
	if err != nil {
		return res, fmt.Errorf("backlog: %w", err)
	}
	res.acked, res.backlogPublishIn = acked, took
	if dc.kill == "offline" || dc.kill == "acked" {
		// offline: stay offline a while, as a station would (mosquitto
		// saves its queue every autosave_interval), then be killed.
		// acked: killed at once after the last PUBACK.
		if dc.kill == "offline" {
			time.Sleep(3 * time.Second)
		}
		gw.kill(9)
		if err := gw.restart(); err != nil {
			return res, err
		}
	}
	t0 := time.Now()
	link.Restore()
	if dc.kill == "mid" {
		c.wait(acked*3/10, b.idle(30*time.Second), 120*time.Second)
		gw.kill(9)
		if err := gw.restart(); err != nil {
			return res, err
		}
	}
	c.wait(acked, b.idle(15*time.Second), 600*time.Second)
	c.mu.Lock()
	defer c.mu.Unlock()
	res.unique = len(c.seen)
	res.dup = c.deliveries - len(c.seen)
	if !c.last.IsZero() {
		res.drain = c.last.Sub(t0)
		if el := c.last.Sub(c.first).Seconds(); el > 0 {
			res.rate = float64(c.deliveries) / el
		}
	}
	return res, nil
}

// scenarioDrain: a backlog built while the cloud is down, delivered when
// it comes up; edged against an edge mosquitto bridge.
func (b *bench) scenarioDrain(t *table) error {
	total := 100000
	if b.quick {
		total = 10000
	}
	type key struct{ gw, kill string }
	got := map[key]drainResult{}
	for _, kill := range drainKills {
		for _, gw := range []string{"edged", "mosquitto-default", "mosquitto-safe"} {
			if b.cases != "" && !strings.Contains(b.cases, gw+":"+kill) {
				continue
			}
			r, err := b.runDrain(drainCase{gateway: gw, kill: kill}, total)
			if err != nil {
				return fmt.Errorf("%s kill=%s: %w", gw, kill, err)
			}
			b.logf("drain %s kill=%s: acked %d (in %v), cloud got %d unique, %d dup, drain %v, %.0f/s",
				gw, kill, r.acked, r.backlogPublishIn.Round(time.Millisecond), r.unique, r.dup, r.drain.Round(time.Millisecond), r.rate)
			got[key{gw, kill}] = r
		}
	}
	desc := map[string]string{"none": "no kill", "offline": "SIGKILL 3 s into offline", "acked": "SIGKILL right after the last PUBACK", "mid": "SIGKILL mid-drain"}
	for _, kill := range drainKills {
		e := got[key{"edged", kill}]
		d, s := got[key{"mosquitto-default", kill}], got[key{"mosquitto-safe", kill}]
		cell := func(r drainResult) string {
			return fmt.Sprintf("%.1f s, lost %d, dup %d", r.drain.Seconds(), r.acked-int64(r.unique), r.dup)
		}
		t.add("drain "+fmtRate(float64(total)), desc[kill]+": time, loss, duplicates",
			cell(e), "default: "+cell(d)+"; safest: "+cell(s), "", "")
		lost := e.acked - int64(e.unique)
		switch kill {
		case "none":
			t.add("drain "+fmtRate(float64(total)), "no kill: events/s delivered", fmtRate(e.rate),
				"default: "+fmtRate(d.rate)+"; safest: "+fmtRate(s.rate), "", "")
			ok := e.drain <= s.drain && lost == 0
			t.add("drain "+fmtRate(float64(total)), "as fast as safest bridge, no loss", fmt.Sprintf("%.1f s", e.drain.Seconds()),
				fmt.Sprintf("safest: %.1f s", s.drain.Seconds()), "<= safest bridge's time, 0 lost",
				verdict(ok, fmt.Sprintf("%.2fx the bridge's time, %d lost", e.drain.Seconds()/max(s.drain.Seconds(), 0.001), lost)))
		default:
			// The bench leaves uplink.window at edged's default.
			w := edged.DefaultConfig().Uplink.Window
			ok := lost == 0 && e.dup <= w
			t.add("drain "+fmtRate(float64(total)), fmt.Sprintf("%s: loss, dup <= window (%d)", desc[kill], w), fmt.Sprintf("lost %d, dup %d", lost, e.dup), "",
				fmt.Sprintf("0 lost, dup <= %d", w), verdict(ok, fmt.Sprintf("lost %d, dup %d", lost, e.dup)))
		}
	}
	return nil
}

type edgedGateway struct{ *edgedRun }

func (g edgedGateway) kill(sig syscallSignal) { g.edgedRun.proc.kill(sig) }
func (g edgedGateway) restart() error         { return g.edgedRun.restart("") }
func (g edgedGateway) deviceAddr() string     { return g.addr }

type mosqGateway struct{ *mosqRun }

func (g mosqGateway) kill(sig syscallSignal) { g.mosqRun.proc.kill(sig) }
func (g mosqGateway) restart() error         { return g.mosqRun.restart() }
func (g mosqGateway) deviceAddr() string     { return g.addr }

// idle is how long a drain waits with nothing arriving before it counts
// the rest as lost: shorter in a quick run.
func (b *bench) idle(full time.Duration) time.Duration {
	if b.quick {
		return full / 3
	}
	return full
}
