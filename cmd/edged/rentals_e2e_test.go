package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/devicesim"
)

// The tests in this file drive the real edged binary with real MQTT
// devices that misbehave as firmware does (a lost stop, a refused stop, a
// start never acknowledged) and with mosquitto as a cloud that redelivers,
// and check what contract v2 promises for them (§3.1 results, §4 stops).

// binStation is one run of the real binary, its cloud (mosquitto) and a
// cloud client watching its events.
type binStation struct {
	t       *testing.T
	local   string // the local broker, host:port
	api     string // the technicians' HTTP, http://host:port
	cloud   *cloudClient
	timeout time.Duration // rentals.start_timeout
	markers atomic.Int64

	bin, config, logPath string
	d                    *daemon
	upAt                 time.Time // when edged was back up after powerLoss
}

// startBinStation builds and starts edged with rentals.start_timeout set
// to startTimeout, a synchronized clock, mosquitto as its cloud, the HTTP
// API on loopback (no users) and the given MQTT devices.
func startBinStation(t *testing.T, startTimeout time.Duration, devices ...string) *binStation {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := edgedBinary(t)
	cloud := startMosquitto(t)
	dir := t.TempDir()
	local, httpAddr := freePort(t), freePort(t)
	var b strings.Builder
	fmt.Fprintf(&b, "station: {id: mall-1}\ndata_dir: %s\nlocal: {listen: %q}\n", filepath.Join(dir, "data"), local)
	fmt.Fprintf(&b, "uplink: {url: \"tcp://%s\", reconnect_max: 1s, keepalive: 5s}\n", cloud)
	fmt.Fprintf(&b, "rentals: {start_timeout: %s}\nclock: {assume_synced: true}\nhttp: {listen: %q}\ndevices:\n", startTimeout, httpAddr)
	for _, id := range devices {
		fmt.Fprintf(&b, "  - {id: %s, kind: chair, transport: mqtt, secret_hash: %q}\n", id, testHash)
	}
	config := filepath.Join(dir, "edged.yaml")
	if err := os.WriteFile(config, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "edged.log")
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			if len(out) > 8000 {
				out = out[len(out)-8000:]
			}
			t.Logf("edged log (tail):\n%s", out)
		}
	})
	cc := newCloudClient(t, cloud)
	d := startDaemon(t, bin, config, local, logPath)
	return &binStation{t: t, local: local, api: "http://" + httpAddr, cloud: cc, timeout: startTimeout,
		bin: bin, config: config, logPath: logPath, d: d}
}

// powerLoss kills edged (SIGKILL), starts it again on the same store and
// reconnects devs.
func (s *binStation) powerLoss(devs ...*devicesim.Device) {
	s.t.Helper()
	s.d.kill()
	s.d = startDaemon(s.t, s.bin, s.config, s.local, s.logPath)
	s.upAt = time.Now()
	for _, dev := range devs {
		dev.Disconnect()
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := dev.Connect(2 * time.Second)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				s.t.Fatalf("%s cannot reconnect after the restart: %v", dev.ID, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// device connects a simulated device that answers commands as answer
// says (nil: a well-behaved device) and waits until the cloud has its
// device.online, which also shows that the uplink is up.
func (s *binStation) device(id string, answer func(devicesim.Command) (bool, bool)) *devicesim.Device {
	s.t.Helper()
	d := &devicesim.Device{ID: id, Secret: "secret", Broker: "tcp://" + s.local, Answer: answer}
	if err := d.Connect(5 * time.Second); err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(d.Disconnect)
	s.cloud.waitData(s.t, edged.EventDeviceOnline, func(d map[string]any) bool { return d["device_id"] == id })
	return d
}

// rental publishes a rental message on the station's rentals topic.
func (s *binStation) rental(m map[string]any) {
	s.t.Helper()
	s.cloud.publish(s.t, "stations/mall-1/down/rentals", m)
}

// results returns the rental.result events the cloud got for rentalID
// and op, in seq order, once each.
func (s *binStation) results(rentalID, op string) []map[string]any {
	var out []map[string]any
	for _, e := range s.cloud.bySeq() {
		if e.Type != edged.EventRentalResult {
			continue
		}
		var d map[string]any
		json.Unmarshal(e.Data, &d)
		if d["rental_id"] == rentalID && d["op"] == op {
			out = append(out, d)
		}
	}
	return out
}

// waitResults waits until the cloud has n results for rentalID and op.
func (s *binStation) waitResults(rentalID, op string, n int) []map[string]any {
	s.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		r := s.results(rentalID, op)
		if len(r) >= n {
			return r
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("the cloud got %d rental.result for %s %s, want %d: %v", len(r), op, rentalID, n, r)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// marker has dev publish a device event and waits until the cloud has it
// and every event before it, with no seq missing. What the station
// recorded before the marker has then reached the cloud.
func (s *binStation) marker(dev *devicesim.Device) []edged.Event {
	s.t.Helper()
	n := s.markers.Add(1)
	tag := fmt.Sprintf(`"marker":%d`, n)
	if err := dev.Publish("events", map[string]any{"type": "marker", "marker": n}); err != nil {
		s.t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		evs := s.cloud.bySeq()
		for i, e := range evs {
			if e.Type == edged.EventDeviceEvent && strings.Contains(string(e.Data), tag) {
				if int(e.Seq) == i+1 {
					return evs[:i+1]
				}
				break
			}
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("marker %d and every event before it did not reach the cloud (it has %d distinct seqs)", n, len(evs))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// endByOperator ends a rental through the technicians' API.
func (s *binStation) endByOperator(rentalID string) {
	s.t.Helper()
	resp, err := http.Post(s.api+"/api/v1/rentals/"+rentalID+"/end", "application/json", nil)
	if err != nil {
		s.t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		s.t.Fatalf("operator end of %s: HTTP %d", rentalID, resp.StatusCode)
	}
}

// bySeq returns the events the cloud received, once per seq, in seq order.
func (cc *cloudClient) bySeq() []edged.Event {
	cc.mu.Lock()
	seen := map[uint64]edged.Event{}
	for _, e := range cc.events {
		seen[e.Seq] = e
	}
	cc.mu.Unlock()
	out := make([]edged.Event, 0, len(seen))
	for _, e := range seen {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Seq < out[j].Seq })
	return out
}

// stopsFor returns the stop commands dev received for rentalID.
func stopsFor(dev *devicesim.Device, rentalID string) []devicesim.Command {
	var out []devicesim.Command
	for _, c := range dev.Commands() {
		if c.Action == edged.ActionStop && c.RentalID == rentalID {
			out = append(out, c)
		}
	}
	return out
}

func countAction(dev *devicesim.Device, action string) int {
	n := 0
	for _, c := range dev.Commands() {
		if c.Action == action {
			n++
		}
	}
	return n
}

// waitStops waits until dev has n stops for rentalID, at most within.
func waitStops(t *testing.T, dev *devicesim.Device, rentalID string, n int, within time.Duration) []devicesim.Command {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		st := stopsFor(dev, rentalID)
		if len(st) >= n {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s got %d stops for %s within %v, want %d (all commands: %+v)", dev.ID, len(st), rentalID, within, n, dev.Commands())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func grant(id, device string, seconds int) map[string]any {
	return map[string]any{"op": "grant", "rental_id": id, "device_id": device, "renter_id": "alice", "duration_s": seconds}
}

// TestStopIsResentUntilAcknowledged: a device that loses its first stop
// gets another one for the same rental, and a device that refuses stop
// (ok false) keeps getting it, taking no new rental meanwhile, until it
// reports idle, across a power loss too (§4 "a stop is delivered"). One
// rental is ended by a cancel from the cloud, the other by a technician.
func TestStopIsResentUntilAcknowledged(t *testing.T) {
	s := startBinStation(t, time.Second, "chair-lost", "chair-refuse")
	var stopsSeen atomic.Int32
	lost := s.device("chair-lost", func(c devicesim.Command) (bool, bool) {
		if c.Action == edged.ActionStop && stopsSeen.Add(1) == 1 {
			return false, false // lost: no ack, keeps running
		}
		return true, true
	})
	var refuseStop atomic.Bool
	refuseStop.Store(true)
	refusing := s.device("chair-refuse", func(c devicesim.Command) (bool, bool) {
		return true, c.Action != edged.ActionStop || !refuseStop.Load()
	})
	s.rental(grant("r-lost", "chair-lost", 600))
	s.rental(grant("r-refuse", "chair-refuse", 600))
	for _, id := range []string{"r-lost", "r-refuse"} {
		s.cloud.waitData(t, edged.EventRentalStarted, func(d map[string]any) bool { return d["rental_id"] == id })
	}

	s.rental(map[string]any{"op": "cancel", "rental_id": "r-lost", "device_id": "chair-lost", "renter_id": "alice"})
	s.endByOperator("r-refuse")

	// The lost stop is sent again. A generous deadline, ten times the
	// promised start_timeout, so a loaded machine cannot fail it; the gap
	// itself is reported.
	stops := waitStops(t, lost, "r-lost", 2, 10*s.timeout)
	gap := stops[1].At.Sub(stops[0].At)
	t.Logf("lost stop resent %v after the first (start_timeout %v, contract: within start_timeout)", gap.Round(time.Millisecond), s.timeout)
	if gap < s.timeout/2 {
		t.Errorf("second stop %v after the first: sooner than start_timeout %v, a resend loop?", gap, s.timeout)
	}
	waitFor(t, "chair-lost idle after the second stop", func() bool { return lost.Status() == "idle" })
	idleAt, lostStops := time.Now(), len(stopsFor(lost, "r-lost"))

	// The refused stop keeps coming, for the same rental.
	stops = waitStops(t, refusing, "r-refuse", 3, 20*s.timeout)
	var gaps []string
	for i := 1; i < len(stops); i++ {
		gaps = append(gaps, stops[i].At.Sub(stops[i-1].At).Round(time.Millisecond).String())
	}
	t.Logf("refused stop sent %d times, gaps %s", len(stops), strings.Join(gaps, " "))
	if refusing.Status() != "in_use" {
		t.Fatalf("the refusing device is %s, want in_use (it refuses stop)", refusing.Status())
	}

	// While its stop is outstanding the device takes no new rental.
	s.rental(grant("r-busy", "chair-refuse", 60))
	if r := s.waitResults("r-busy", "grant", 1)[0]; r["ok"] != false || r["reason"] != "device_busy" {
		t.Errorf("grant while a stop is outstanding = %v, want ok false, device_busy", r)
	}

	// The outstanding stop survives a power loss: the device, back and
	// still running, gets it again.
	before := len(stopsFor(refusing, "r-refuse"))
	s.powerLoss(lost, refusing)
	stops = waitStops(t, refusing, "r-refuse", before+1, 10*s.timeout)
	t.Logf("after a power loss, the outstanding stop came %v after edged was back up", stops[before].At.Sub(s.upAt).Round(time.Millisecond))
	s.rental(grant("r-busy-2", "chair-refuse", 60))
	if r := s.waitResults("r-busy-2", "grant", 1)[0]; r["ok"] != false || r["reason"] != "device_busy" {
		t.Errorf("grant after the restart while a stop is outstanding = %v, want ok false, device_busy", r)
	}

	// The device finally reports idle: the stop is delivered and it can
	// be rented again.
	refuseStop.Store(false)
	if err := refusing.Publish("state", map[string]any{"status": "idle"}); err != nil {
		t.Fatal(err)
	}
	s.rental(grant("r-again", "chair-refuse", 60))
	if r := s.waitResults("r-again", "grant", 1)[0]; r["ok"] != true {
		t.Errorf("grant after the device reported idle = %v, want ok", r)
	}

	// The acknowledged stop is not sent again: let a few resend periods
	// pass since chair-lost acknowledged it, then count.
	for time.Since(idleAt) < 4*s.timeout {
		time.Sleep(50 * time.Millisecond)
	}
	if m := len(stopsFor(lost, "r-lost")); m != lostStops || lostStops != 2 {
		t.Errorf("chair-lost got %d stops for r-lost, then %d: want exactly 2 (the lost one and the acknowledged one)", lostStops, m)
	}
}

// TestCancelBeforeStartAck: a cancel that arrives while the device has
// not acknowledged start gives the grant the result cancelled and the
// cancel ok, stops the device, and no rental.started or rental.ended is
// ever emitted for the rental (§3.1).
func TestCancelBeforeStartAck(t *testing.T) {
	// A start_timeout long enough for the cancel to overtake the start's
	// timeout on a loaded machine; the test waits it out once.
	s := startBinStation(t, 3*time.Second, "chair-1", "chair-2")
	var mu sync.Mutex
	started := make(chan struct{})
	chair := s.device("chair-1", func(c devicesim.Command) (bool, bool) {
		if c.Action == edged.ActionStart {
			mu.Lock()
			select {
			case <-started:
			default:
				close(started)
			}
			mu.Unlock()
			return false, false // never acknowledged
		}
		return true, true
	})
	other := s.device("chair-2", nil)

	granted := time.Now()
	s.rental(grant("r-c", "chair-1", 60))
	select {
	case <-started:
	case <-time.After(15 * time.Second):
		t.Fatal("chair-1 got no start")
	}
	s.rental(map[string]any{"op": "cancel", "rental_id": "r-c", "device_id": "chair-1", "renter_id": "alice"})

	g := s.waitResults("r-c", "grant", 1)[0]
	c := s.waitResults("r-c", "cancel", 1)[0]
	if g["ok"] != false || g["reason"] != "cancelled" {
		t.Errorf("grant's rental.result = %v, want ok false, cancelled", g)
	}
	if c["ok"] != true {
		t.Errorf("cancel's rental.result = %v, want ok true", c)
	}
	waitStops(t, chair, "r-c", 1, 10*s.timeout)

	// Past the start_timeout, so a late timeout result would show too,
	// then everything the station recorded up to a marker.
	for time.Since(granted) < s.timeout+time.Second {
		time.Sleep(50 * time.Millisecond)
	}
	evs := s.marker(other)
	counts := map[string]int{}
	for _, e := range evs {
		var d map[string]any
		json.Unmarshal(e.Data, &d)
		if d["rental_id"] != "r-c" {
			continue
		}
		k := string(e.Type)
		if e.Type == edged.EventRentalResult {
			k += "/" + fmt.Sprint(d["op"])
		}
		counts[k]++
	}
	want := map[string]int{"rental.result/grant": 1, "rental.result/cancel": 1}
	if fmt.Sprint(counts) != fmt.Sprint(want) {
		t.Errorf("events for r-c = %v, want %v (one result each, no rental.started or rental.ended)", counts, want)
	}
}

// TestRedeliveredRentalMessagesAnsweredAlike: a grant, an extend and a
// cancel, each redelivered byte for byte after the rental ended and after
// their not_after passed, and again after a power loss, get the same
// result as the first time, change nothing and do not start the device
// again (§3.1).
func TestRedeliveredRentalMessagesAnsweredAlike(t *testing.T) {
	s := startBinStation(t, time.Second, "chair-1", "chair-2")
	chair := s.device("chair-1", nil)
	other := s.device("chair-2", nil)

	notAfter := time.Now().Add(6 * time.Second).UTC().Truncate(time.Second)
	na := notAfter.Format(time.RFC3339)
	msgs := []map[string]any{
		{"op": "grant", "rental_id": "r-re", "device_id": "chair-1", "renter_id": "alice", "duration_s": 30, "not_after": na},
		{"op": "extend", "rental_id": "r-re", "device_id": "chair-1", "renter_id": "alice", "duration_s": 40, "not_after": na},
		{"op": "cancel", "rental_id": "r-re", "device_id": "chair-1", "renter_id": "alice", "not_after": na},
	}
	follows := []edged.EventType{edged.EventRentalStarted, edged.EventRentalExtended, edged.EventRentalEnded}
	first := map[string]map[string]any{}
	for i, m := range msgs {
		s.rental(m)
		op := m["op"].(string)
		first[op] = s.waitResults("r-re", op, 1)[0]
		if first[op]["ok"] != true {
			t.Fatalf("first %s: rental.result = %v, want ok", op, first[op])
		}
		s.cloud.waitData(t, follows[i], func(d map[string]any) bool { return d["rental_id"] == "r-re" })
	}
	waitFor(t, "chair-1 stopped and idle", func() bool { return chair.Status() == "idle" && len(stopsFor(chair, "r-re")) > 0 })

	// Past not_after (judged: the clock is synchronized).
	for !time.Now().After(notAfter.Add(500 * time.Millisecond)) {
		time.Sleep(50 * time.Millisecond)
	}
	redeliver := func(when string, n int) {
		t.Helper()
		before := s.marker(other)
		starts := countAction(chair, edged.ActionStart)
		for _, m := range msgs {
			s.rental(m)
		}
		for _, m := range msgs {
			op := m["op"].(string)
			again := s.waitResults("r-re", op, n)[n-1]
			if again["ok"] != first[op]["ok"] || again["reason"] != first[op]["reason"] {
				t.Errorf("redelivered %s %s: rental.result = %v, first time %v", op, when, again, first[op])
			}
		}
		after := s.marker(other)
		var extra []string
		for _, e := range after[len(before):] {
			var d map[string]any
			json.Unmarshal(e.Data, &d)
			if d["rental_id"] == "r-re" && e.Type != edged.EventRentalResult {
				extra = append(extra, string(e.Type))
			}
			if e.Type == edged.EventRentalResult && d["rental_id"] != "r-re" {
				extra = append(extra, string(e.Type)+" for "+fmt.Sprint(d["rental_id"]))
			}
		}
		for _, m := range msgs {
			if got := len(s.results("r-re", m["op"].(string))); got != n {
				extra = append(extra, fmt.Sprintf("%d results for %s, want %d", got, m["op"], n))
			}
		}
		if len(extra) > 0 {
			t.Errorf("the redeliveries %s changed more than their results: %v", when, extra)
		}
		if got := countAction(chair, edged.ActionStart); got != starts {
			t.Errorf("chair-1 got %d start commands after the redeliveries %s, want none", got-starts, when)
		}
	}
	redeliver("after the end and past not_after", 2)
	// The answers come from the store: the same after a power loss.
	s.powerLoss(chair, other)
	redeliver("after a restart", 3)
}
