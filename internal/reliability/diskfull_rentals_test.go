package reliability

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/devicesim"
)

// TestDiskFullEnforcesRentals fills the data directory's tmpfs (see
// TestDiskFull) while two rentals run, and checks what contract v2 §4
// promises when the store cannot write:
//
//   - a rental that ends while the disk is full stops its device on time;
//   - a grant while the disk is full starts nothing (refused unavailable,
//     or not acknowledged to the cloud broker);
//   - SIGKILL and a restart on the still full disk: edged comes up (READY,
//     /healthz answers) and stops the rental it holds on time;
//   - once space returns, the log has every record in seq order with no
//     gap, each rental ended exactly once, and the cloud gets them all.
//
// "On time" is against the rental's ends_at as edged reported it, with
// start_timeout + 2 s of slack for a loaded machine.
func TestDiskFullEnforcesRentals(t *testing.T) {
	bin := edgedBinary(t)
	const startTimeout = time.Second
	const slack = startTimeout + 2*time.Second
	dir := t.TempDir()
	ns := newMountNS(t, filepath.Join(dir, "data"), "4m")
	// mosquitto, not the in-process stand-in: mochi loses a message in
	// flight to a client when that client publishes with the same packet
	// id (see library-facts), and here a grant waits unacknowledged while
	// the station publishes.
	cl, mosq := newMosquittoCloud(t)
	local, httpAddr := freeAddr(t), freeAddr(t)
	cfg := writeConfig(t, stationConfig{Dir: dir, Local: local, Cloud: cl.Addr,
		Devices: []string{"chair-1", "chair-2", "chair-3"},
		Extra:   fmt.Sprintf("rentals: {start_timeout: %s}\nhttp: {listen: %q}\n", startTimeout, httpAddr)})
	logPath := filepath.Join(dir, "edged.log")
	dumpLog(t, logPath)
	wd, env := newWatchdog(t)
	argv := []string{"nsenter", "-t", fmt.Sprint(ns.pid), "-m", "--", bin, "-config", cfg}
	d := startDaemon(t, argv, local, logPath, env...)
	api := "http://" + httpAddr

	devs := map[string]*devicesim.Device{}
	for _, id := range []string{"chair-1", "chair-2", "chair-3"} {
		dev := &devicesim.Device{ID: id, Secret: testSecret, Broker: "tcp://" + local}
		if err := dev.Connect(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(dev.Disconnect)
		devs[id] = dev
	}
	for id := range devs {
		cl.waitEvent(t, "device.online of "+id, edged.EventDeviceOnline, func(d map[string]any) bool { return d["device_id"] == id })
	}

	// A ends while the disk is full; B outlasts a restart on the full disk.
	const rentals = "stations/mall-1/down/rentals"
	cl.send(rentals, map[string]any{"op": "grant", "rental_id": "r-a", "device_id": "chair-1", "renter_id": "alice", "duration_s": 8})
	cl.send(rentals, map[string]any{"op": "grant", "rental_id": "r-b", "device_id": "chair-2", "renter_id": "bob", "duration_s": 20})
	endsAt := map[string]time.Time{}
	for _, id := range []string{"r-a", "r-b"} {
		data := cl.waitEvent(t, "rental.started of "+id, edged.EventRentalStarted, func(d map[string]any) bool { return d["rental_id"] == id })
		endsAt[id], _ = time.Parse(time.RFC3339Nano, fmt.Sprint(data["ends_at"]))
	}

	// Fill the disk, and make the store need new pages until a write
	// fails: device events of 30 KB from chair-3 (one not acknowledged is
	// one the store could not take).
	ns.fill(t)
	var flood sync.WaitGroup
	flood.Add(1)
	go func() {
		defer flood.Done()
		pad := strings.Repeat("x", 30000)
		for i := 0; i < 20; i++ {
			if devs["chair-3"].Publish("events", map[string]any{"type": "big", "n": i, "pad": pad}) != nil {
				return
			}
		}
	}()
	full := waitFor(t, "/healthz 503 on the full disk", time.Until(endsAt["r-a"]), func() bool { return httpStatus(api+"/healthz") == http.StatusServiceUnavailable })
	t.Logf("store reported unwritable %v after the disk filled; r-a ends in %v", full.Round(10*time.Millisecond), time.Until(endsAt["r-a"]).Round(10*time.Millisecond))

	flood.Wait()
	reconnect(t, devs["chair-3"]) // if the station dropped it for a message it could not take

	// (d) A grant while the disk is full starts nothing. (The check of
	// the broker's log for acknowledgements first sees those of r-a, r-b.)
	waitFor(t, "mosquitto logs the station's PUBACKs of r-a and r-b", 5*time.Second, func() bool { return mosq.acks() >= 2 })
	acks := mosq.acks()
	cl.send(rentals, map[string]any{"op": "grant", "rental_id": "r-full", "device_id": "chair-3", "renter_id": "carol", "duration_s": 60})
	fullGrantAt := time.Now()

	// (a) r-a's stop reaches chair-1 on time.
	stop := waitStop(t, devs["chair-1"], "r-a", time.Until(endsAt["r-a"].Add(slack)))
	t.Logf("r-a ended on the full disk: stop at the device %v after its ends_at", stop.At.Sub(endsAt["r-a"]).Round(time.Millisecond))
	if stop.At.Before(endsAt["r-a"].Add(-time.Second)) {
		t.Errorf("r-a stopped %v before its ends_at", endsAt["r-a"].Sub(stop.At))
	}
	for time.Since(fullGrantAt) < 2*startTimeout {
		time.Sleep(50 * time.Millisecond)
	}
	// The refusal cannot be made durable, so the grant is not
	// acknowledged: the cloud broker keeps it and redelivers it.
	if n := mosq.acks() - acks; n != 0 {
		t.Errorf("the station acknowledged %d messages from the cloud while the disk was full (only the grant r-full was sent)", n)
	}
	for _, c := range devs["chair-3"].Commands() {
		if c.Action == edged.ActionStart && c.RentalID == "r-full" {
			t.Errorf("a grant on the full disk started chair-3")
		}
	}

	// (b) Power loss on the full disk and a restart on it.
	readyBefore := wd.notified("READY=1")
	d.kill()
	d = startDaemon(t, argv, local, logPath, env...)
	waitFor(t, "READY=1 after the restart on a full disk", 15*time.Second, func() bool { return wd.notified("READY=1") > readyBefore })
	code := 0
	waitFor(t, "/healthz answers after the restart", 15*time.Second, func() bool { code = httpStatus(api + "/healthz"); return code != 0 })
	t.Logf("restarted on the full disk: READY sent, /healthz %d", code)
	for _, id := range []string{"chair-1", "chair-2", "chair-3"} {
		reconnect(t, devs[id])
	}
	stop = waitStop(t, devs["chair-2"], "r-b", time.Until(endsAt["r-b"].Add(slack)))
	t.Logf("r-b ended after a restart on the full disk: stop at the device %v after its ends_at", stop.At.Sub(endsAt["r-b"]).Round(time.Millisecond))
	if stop.At.Before(endsAt["r-b"].Add(-time.Second)) {
		t.Errorf("r-b stopped %v before its ends_at", endsAt["r-b"].Sub(stop.At))
	}

	// (c) Space returns: every record, in seq order, no gap.
	ns.free(t)
	freedAt := time.Now()
	waitFor(t, "/healthz 200 once space returns", 30*time.Second, func() bool { return httpStatus(api+"/healthz") == http.StatusOK })
	// The station writes what waited at its next retry (with backoff), and
	// takes device events again only after that: retry as a device would.
	tries := 0
	took := waitFor(t, "a device event taken after space returned", 30*time.Second, func() bool {
		tries++
		if devs["chair-3"].Publish("events", map[string]any{"type": "after", "try": tries}) == nil {
			return true
		}
		reconnect(t, devs["chair-3"])
		return false
	})
	t.Logf("space returned: /healthz 200 %v later, a device event taken %v after that (%d tries)",
		time.Since(freedAt).Round(10*time.Millisecond)-took.Round(10*time.Millisecond), took.Round(10*time.Millisecond), tries)
	var evs []edged.Event
	// The grant sent on the full disk was never acknowledged: the cloud
	// broker redelivers it, at the latest when the uplink reconnects.
	waitFor(t, "both rentals' rental.ended and a result for the grant sent on the full disk, in the log", 30*time.Second, func() bool {
		evs = apiEvents(t, api)
		return countEvents(evs, edged.EventRentalEnded, "r-a") > 0 && countEvents(evs, edged.EventRentalEnded, "r-b") > 0 &&
			countEvents(evs, edged.EventRentalResult, "r-full") > 0
	})
	for i, e := range evs {
		if e.Seq != uint64(i+1) {
			t.Fatalf("the log's event %d has seq %d: a gap or a repeat", i+1, e.Seq)
		}
		if i > 0 && e.TS.Before(evs[i-1].TS) {
			t.Errorf("seq %d (%s, %s) is older than seq %d (%s, %s): records written out of order",
				e.Seq, e.Type, e.TS.Format(time.StampMilli), e.Seq-1, evs[i-1].Type, evs[i-1].TS.Format(time.StampMilli))
		}
	}
	for _, id := range []string{"r-a", "r-b"} {
		if n := countEvents(evs, edged.EventRentalEnded, id); n != 1 {
			t.Errorf("%s has %d rental.ended, want 1", id, n)
		}
	}
	// The grant sent on the full disk is answered once the disk is back:
	// refused unavailable, or, redelivered after space returned, granted.
	fullResults := 0
	for _, e := range evs {
		var data map[string]any
		json.Unmarshal(e.Data, &data)
		if e.Type == edged.EventRentalResult && data["rental_id"] == "r-full" {
			fullResults++
			if fullResults == 1 {
				t.Logf("grant on the full disk: first rental.result, seq %d: %v", e.Seq, data)
			}
			if data["ok"] == true && e.TS.Before(freedAt) || data["ok"] == false && data["reason"] != "unavailable" {
				t.Errorf("grant on the full disk: rental.result %v at %s (space returned at %s), want unavailable while full",
					data, e.TS.Format(time.StampMilli), freedAt.Format(time.StampMilli))
			}
		}
	}
	if fullResults == 0 {
		t.Errorf("the grant sent on the full disk never got a rental.result")
	}
	last := evs[len(evs)-1].Seq
	waitFor(t, "the cloud gets every seq", 30*time.Second, func() bool {
		got := cl.Events()
		for s := uint64(1); s <= last; s++ {
			if _, ok := got[s]; !ok {
				return false
			}
		}
		return true
	})
	got := cl.Events()
	for _, e := range evs {
		if g := got[e.Seq]; g.Type != e.Type || string(g.Data) != string(e.Data) {
			t.Errorf("seq %d: the cloud got %s %s, the log has %s %s", e.Seq, g.Type, g.Data, e.Type, e.Data)
		}
	}
	t.Logf("after recovery: %d events in the log, seq 1..%d, all at the cloud", len(evs), last)
	logged, _ := os.ReadFile(logPath)
	// The uplink holds a grant the store cannot take on its connection
	// and retries it: the full disk never drops the link.
	if n := strings.Count(string(logged), "left for redelivery"); n != 0 {
		t.Errorf("the uplink dropped its connection %d times for a message the full disk could not take, want it held", n)
	}
	t.Logf("uplink reconnects logged: %d; held retries of the grant on the full disk: %d; rental.result for it: %d",
		strings.Count(string(logged), `msg="uplink lost"`), strings.Count(string(logged), "held and retried"), fullResults)
	d.stop()
}

// waitEvent waits for an event of typ whose data matches f and returns
// its data.
func (c *cloud) waitEvent(t *testing.T, what string, typ edged.EventType, f func(map[string]any) bool) map[string]any {
	t.Helper()
	var found map[string]any
	waitFor(t, what, 15*time.Second, func() bool {
		for _, e := range c.Events() {
			var d map[string]any
			if e.Type == typ && json.Unmarshal(e.Data, &d) == nil && f(d) {
				found = d
				return true
			}
		}
		return false
	})
	return found
}

// mosquittoLog is the debug log of a mosquitto run.
type mosquittoLog string

// acks counts the PUBACKs the station sent mosquitto for messages from
// the cloud.
func (l mosquittoLog) acks() int {
	b, _ := os.ReadFile(string(l))
	return strings.Count(string(b), "Received PUBACK from edged-mall-1")
}

// newMosquittoCloud runs Debian's mosquitto on a free loopback port as the
// cloud, with a subscriber recording the station's events.
func newMosquittoCloud(t *testing.T) (*cloud, mosquittoLog) {
	t.Helper()
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		bin = "/usr/sbin/mosquitto"
		if _, serr := os.Stat(bin); serr != nil {
			if os.Getenv("CI") != "" {
				t.Fatal("mosquitto is not installed (apt-get install mosquitto); CI must run this test")
			}
			t.Skip("mosquitto is not installed")
		}
	}
	dir := t.TempDir()
	addr := freeAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	logPath := filepath.Join(dir, "mosquitto.log")
	conf := fmt.Sprintf("persistence false\nallow_anonymous true\nmax_queued_messages 0\nlistener %s 127.0.0.1\nlog_dest file %s\nlog_type all\n", port, logPath)
	if os.Geteuid() == 0 {
		conf = "user root\n" + conf
	}
	cf := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", cf)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitFor(t, "mosquitto listening", 10*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	c := &cloud{Addr: addr, events: map[uint64]edged.Event{}, hook: &ackHook{inflight: map[string][]byte{}}}
	o := mqtt.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("cloud-test").
		SetProtocolVersion(4).SetAutoReconnect(true).SetCleanSession(true)
	c.sub = mqtt.NewClient(o)
	if tok := c.sub.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud client: %v", tok.Error())
	}
	tok := c.sub.Subscribe("stations/+/up/events", 1, func(_ mqtt.Client, m mqtt.Message) {
		var e edged.Event
		if json.Unmarshal(m.Payload(), &e) == nil {
			c.mu.Lock()
			c.events[e.Seq] = e
			c.mu.Unlock()
		}
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud subscribe: %v", tok.Error())
	}
	t.Cleanup(func() { c.sub.Disconnect(0) })
	return c, mosquittoLog(logPath)
}

// notified returns how many times edged sent the notify line l.
func (w *watchdog) notified(l string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, s := range w.all {
		if s == l {
			n++
		}
	}
	return n
}

// httpStatus is the status code of a GET, 0 when it gets no answer.
func httpStatus(url string) int {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// apiEvents reads the whole event log through the API, oldest first.
func apiEvents(t *testing.T, api string) []edged.Event {
	t.Helper()
	var all []edged.Event
	for after := uint64(0); ; {
		resp, err := http.Get(fmt.Sprintf("%s/api/v1/events?after=%d&limit=1000", api, after))
		if err != nil {
			t.Fatal(err)
		}
		var page []edged.Event
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /api/v1/events: %d %v", resp.StatusCode, err)
		}
		if len(page) == 0 {
			return all
		}
		all = append(all, page...)
		after = page[len(page)-1].Seq
	}
}

func countEvents(evs []edged.Event, typ edged.EventType, rentalID string) int {
	n := 0
	for _, e := range evs {
		var d map[string]any
		if e.Type == typ && json.Unmarshal(e.Data, &d) == nil && d["rental_id"] == rentalID {
			n++
		}
	}
	return n
}

// waitStop waits up to within for dev's first stop for rentalID.
func waitStop(t *testing.T, dev *devicesim.Device, rentalID string, within time.Duration) devicesim.Command {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		for _, c := range dev.Commands() {
			if c.Action == edged.ActionStop && c.RentalID == rentalID {
				return c
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s got no stop for %s in time (by ends_at + slack); commands: %+v", dev.ID, rentalID, dev.Commands())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// reconnect connects dev again after the station restarted, keeping the
// commands it received.
func reconnect(t *testing.T, dev *devicesim.Device) {
	t.Helper()
	dev.Disconnect()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := dev.Connect(2 * time.Second)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s cannot reconnect: %v", dev.ID, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
