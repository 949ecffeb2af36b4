package main

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/cloudemu"
	"github.com/stationedge/edged/internal/devicesim"
	"github.com/stationedge/edged/store"
)

// The tests in this file run the real edged binary against the in-process
// emulators of AWS IoT Core and Alibaba Cloud IoT Platform
// (internal/cloudemu), which disconnect a client that breaks one of their
// rules and count why. A station must never be thrown off: every test ends
// with no rule broken. The generic profile is covered by the mosquitto
// tests of cloud_test.go.

const emuPK, emuDN, emuSecret = "a1pk", "st01", "emu-secret-e2e"

// emuStation is the real binary, an emulated cloud and what the cloud got.
type emuStation struct {
	t       *testing.T
	profile string
	emuDir  string // the emulator's CA and certificates, kept across its restarts
	addr    string // the emulator's address, kept across its restarts
	key     ed25519.PrivateKey

	mu     sync.Mutex
	clouds []*cloudemu.Cloud // every emulator run, the current one last
	msgs   []emuMsg

	bin, config, local, logPath, data string
	d                                 *daemon
}

type emuMsg struct {
	topic   string
	payload []byte
}

// startEmuStation starts an emulator of profile and edged connected to it,
// with the given devices in its config and batch_events batch (0: the
// profile's default).
func startEmuStation(t *testing.T, profile string, batch int, devices ...string) *emuStation {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	s := &emuStation{t: t, profile: profile, bin: edgedBinary(t)}
	dir := t.TempDir()
	s.emuDir = filepath.Join(dir, "cloud")
	s.startCloud()
	s.addr = s.cloud().Addr()
	pub, priv, _ := ed25519.GenerateKey(nil)
	s.key = priv
	c := s.cloud()

	s.local = freePort(t)
	s.data = filepath.Join(dir, "data")
	var b strings.Builder
	fmt.Fprintf(&b, "station: {id: mall-1}\ndata_dir: %s\nlocal: {listen: %q}\n", s.data, s.local)
	fmt.Fprintf(&b, "clock: {assume_synced: true}\nhttp: {listen: \"\"}\n")
	fmt.Fprintf(&b, "rentals: {verify_key: %q, start_timeout: 5s}\n", base64.StdEncoding.EncodeToString(pub))
	fmt.Fprintf(&b, "uplink:\n  profile: %s\n  url: %q\n  ca_file: %q\n  keepalive: 30s\n  reconnect_max: 1s\n", profile, c.URL(), c.CAFile())
	switch profile {
	case edged.ProfileAWS:
		fmt.Fprintf(&b, "  client_id: mall-1\n  cert_file: %q\n  key_file: %q\n", c.ClientCertFile(), c.ClientKeyFile())
	case edged.ProfileAliyun:
		fmt.Fprintf(&b, "  aliyun: {product_key: %s, device_name: %s, device_secret: %q}\n", emuPK, emuDN, emuSecret)
	}
	if batch > 0 {
		fmt.Fprintf(&b, "  batch_events: %d\n", batch)
	}
	b.WriteString("devices:\n")
	for _, id := range devices {
		fmt.Fprintf(&b, "  - {id: %s, kind: chair, transport: mqtt, secret_hash: %q}\n", id, testHash)
	}
	s.config = filepath.Join(dir, "edged.yaml")
	if err := os.WriteFile(s.config, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	s.logPath = filepath.Join(dir, "edged.log")
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(s.logPath)
			if len(out) > 8000 {
				out = out[len(out)-8000:]
			}
			t.Logf("edged log (tail):\n%s", out)
		}
	})
	s.d = startDaemon(t, s.bin, s.config, s.local, s.logPath)
	return s
}

// startCloud starts the emulator (again, on the same address and
// certificates once it ran) and records what the station publishes on it.
func (s *emuStation) startCloud() {
	s.t.Helper()
	c, err := cloudemu.Start(cloudemu.Options{Profile: cloudemu.Profile(s.profile), Dir: s.emuDir, Addr: s.addr,
		ProductKey: emuPK, DeviceName: emuDN, DeviceSecret: emuSecret})
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { c.Close() })
	if err := c.Subscribe("#", func(topic string, payload []byte) {
		s.mu.Lock()
		s.msgs = append(s.msgs, emuMsg{topic, payload})
		s.mu.Unlock()
	}); err != nil {
		s.t.Fatal(err)
	}
	s.mu.Lock()
	s.clouds = append(s.clouds, c)
	s.mu.Unlock()
}

// stopCloud takes the cloud away: every connection closed, nothing more
// accepted until startCloud.
func (s *emuStation) stopCloud() {
	s.cloud().Close()
}

func (s *emuStation) cloud() *cloudemu.Cloud {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.clouds[len(s.clouds)-1]
}

// topic is the profile's name of an up or down topic: events, gateway,
// devices, rentals.
func (s *emuStation) topic(name string) string {
	if s.profile == edged.ProfileAliyun {
		return "/" + emuPK + "/" + emuDN + "/user/" + name
	}
	switch name {
	case "gateway":
		return "stations/mall-1/gateway"
	case "rentals":
		return "stations/mall-1/down/rentals"
	}
	return "stations/mall-1/up/" + name
}

// messages returns what the clouds got on topic, in order of arrival.
func (s *emuStation) messages(topic string) []emuMsg {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []emuMsg
	for _, m := range s.msgs {
		if m.topic == topic {
			out = append(out, m)
		}
	}
	return out
}

// events returns the envelopes the clouds got, in order of arrival. Every
// message on the events topic must be a batch {"station","events"} of 1 to
// batch envelopes in seq order, within the profile's largest message.
func (s *emuStation) events(batch int) []edged.Event {
	s.t.Helper()
	maxBytes := 128 << 10
	if s.profile == edged.ProfileAliyun {
		maxBytes = 256 << 10
	}
	var out []edged.Event
	for _, m := range s.messages(s.topic("events")) {
		if len(m.payload) > maxBytes {
			s.t.Fatalf("an events message of %d bytes, over %d", len(m.payload), maxBytes)
		}
		var b struct {
			Station string        `json:"station"`
			Events  []edged.Event `json:"events"`
		}
		if err := json.Unmarshal(m.payload, &b); err != nil || b.Station != "mall-1" || len(b.Events) == 0 || len(b.Events) > batch {
			s.t.Fatalf("not a batch of 1 to %d events: %.200s (%v)", batch, m.payload, err)
		}
		for i, e := range b.Events {
			if i > 0 && e.Seq != b.Events[i-1].Seq+1 {
				s.t.Fatalf("a batch with seq %d after %d", e.Seq, b.Events[i-1].Seq)
			}
		}
		out = append(out, b.Events...)
	}
	return out
}

// checkOrder fails unless evs, in order of arrival, came in seq order with
// no gap: each seq is either the next one after the highest so far or a
// repeat of one already delivered (after a reconnect). It returns the
// highest seq and how many repeats there were.
func checkOrder(t *testing.T, evs []edged.Event) (high uint64, repeats int) {
	t.Helper()
	for _, e := range evs {
		switch {
		case e.Seq == high+1:
			high = e.Seq
		case e.Seq <= high:
			repeats++
		default:
			t.Fatalf("seq %d arrived before seq %d", e.Seq, high+1)
		}
	}
	return high, repeats
}

// waitEvents waits until the clouds have every seq up to at least n.
func (s *emuStation) waitEvents(batch int, within time.Duration, what string, done func([]edged.Event) bool) []edged.Event {
	s.t.Helper()
	deadline := time.Now().Add(within)
	for {
		evs := s.events(batch)
		checkOrder(s.t, evs)
		if done(evs) {
			return evs
		}
		if time.Now().After(deadline) {
			high, _ := checkOrder(s.t, evs)
			s.t.Fatalf("%s: the cloud has every seq up to %d only (%d envelopes)", what, high, len(evs))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// noViolations fails if any emulator run counted a broken rule.
func (s *emuStation) noViolations() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, c := range s.clouds {
		if v := c.Violations(); len(v) > 0 {
			s.t.Errorf("cloud run %d: rules broken: %v", i+1, v)
		}
	}
}

// device connects a simulated device to edged's local broker.
func (s *emuStation) device(id string) *devicesim.Device {
	s.t.Helper()
	d := &devicesim.Device{ID: id, Secret: "secret", Broker: "tcp://" + s.local}
	if err := d.Connect(5 * time.Second); err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(d.Disconnect)
	return d
}

// stop ends edged with sig and waits for it to exit. A stop that hangs
// fails the test (and the process is killed) rather than the test run.
func (s *emuStation) stop(sig syscall.Signal) {
	s.t.Helper()
	s.d.cmd.Process.Signal(sig)
	exited := make(chan struct{})
	go func() { s.d.cmd.Wait(); close(exited) }()
	select {
	case <-exited:
	case <-time.After(60 * time.Second):
		s.d.cmd.Process.Signal(syscall.SIGKILL)
		<-exited
		s.d.log.Close()
		s.t.Fatalf("edged did not exit within 60 s of %v", sig)
	}
	s.d.log.Close()
}

// checkStored stops edged (SIGTERM) and fails unless every event its
// store recorded before the stop is among the seqs the cloud has, in
// order with no gap, in envelopes of up to batch events (events recorded
// during the stop, such as devices going offline, are left for the next
// run).
func (s *emuStation) checkStored(batch int) {
	s.t.Helper()
	stopAt := time.Now()
	s.stop(syscall.SIGTERM)
	// What the cloud holds once edged is gone: events recorded after the
	// wait that brought us here (a device's presence) may have been sent
	// meanwhile.
	high, _ := checkOrder(s.t, s.events(batch))
	db, err := store.Open(filepath.Join(s.data, "edged.db"), store.Options{})
	if err != nil {
		s.t.Fatal(err)
	}
	defer db.Close()
	evs, err := db.Events(ctx, 0, 0)
	if err != nil {
		s.t.Fatal(err)
	}
	for i, e := range evs {
		if e.Seq != uint64(i+1) {
			s.t.Fatalf("the store's event %d has seq %d", i, e.Seq)
		}
		if e.Seq > high && e.TS.Before(stopAt) {
			s.t.Fatalf("the store has seq %d (%s, recorded before the stop), the cloud every seq up to %d only", e.Seq, e.Type, high)
		}
	}
	if uint64(len(evs)) < high {
		s.t.Fatalf("the cloud has seq %d, the store %d events", high, len(evs))
	}
}

// publishBacklog has two devices publish n device events between them,
// each numbered per device, and waits for every PUBACK.
func publishBacklog(t *testing.T, n int, devs ...*devicesim.Device) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(devs))
	for _, d := range devs {
		wg.Go(func() {
			for i := 0; i < n/len(devs); i++ {
				if err := d.Publish("events", map[string]any{"type": "count", "n": i}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// checkBacklog fails unless evs hold every device's n/len(devs) counted
// events exactly once per seq, each device's in the order it sent them.
func checkBacklog(t *testing.T, evs []edged.Event, n int, devs ...string) {
	t.Helper()
	next := map[string]int{}
	seen := map[uint64]bool{}
	for _, e := range evs {
		if e.Type != edged.EventDeviceEvent || seen[e.Seq] {
			continue
		}
		seen[e.Seq] = true
		var d struct {
			DeviceID string `json:"device_id"`
			Event    struct {
				Type string `json:"type"`
				N    int    `json:"n"`
			} `json:"event"`
		}
		json.Unmarshal(e.Data, &d)
		if d.Event.Type != "count" {
			continue
		}
		if d.Event.N != next[d.DeviceID] {
			t.Fatalf("%s: event %d arrived where %d was due", d.DeviceID, d.Event.N, next[d.DeviceID])
		}
		next[d.DeviceID]++
	}
	for _, id := range devs {
		if next[id] != n/len(devs) {
			t.Fatalf("%s: %d of its %d events arrived", id, next[id], n/len(devs))
		}
	}
}

func hasEvent(evs []edged.Event, typ edged.EventType, f func(map[string]any) bool) (edged.Event, bool) {
	for _, e := range evs {
		if e.Type != typ {
			continue
		}
		var d map[string]any
		json.Unmarshal(e.Data, &d)
		if f(d) {
			return e, true
		}
	}
	return edged.Event{}, false
}

var emuProfiles = []string{edged.ProfileAWS, edged.ProfileAliyun}

// TestEmuCloudRental: a signed grant published by the cloud on the
// profile's rentals topic starts the device; rental.result, started and
// ended come back in batches, in seq order with no gap, and no rule of the
// cloud is broken.
func TestEmuCloudRental(t *testing.T) {
	for _, profile := range emuProfiles {
		t.Run(profile, func(t *testing.T) {
			s := startEmuStation(t, profile, 0, "chair-1")
			chair := s.device("chair-1")
			s.waitEvents(200, 15*time.Second, "device.online", func(evs []edged.Event) bool {
				_, ok := hasEvent(evs, edged.EventDeviceOnline, func(d map[string]any) bool { return d["device_id"] == "chair-1" })
				return ok
			})
			grant := signedMsg(s.key, "mall-1", map[string]any{"op": "grant", "rental_id": "r-1", "device_id": "chair-1", "renter_id": "alice", "duration_s": 2})
			b, _ := json.Marshal(grant)
			if err := s.cloud().Publish(s.topic("rentals"), b); err != nil {
				t.Fatal(err)
			}
			r1 := func(d map[string]any) bool { return d["rental_id"] == "r-1" }
			evs := s.waitEvents(200, 20*time.Second, "rental.ended", func(evs []edged.Event) bool {
				_, ok := hasEvent(evs, edged.EventRentalEnded, r1)
				return ok
			})
			res, _ := hasEvent(evs, edged.EventRentalResult, r1)
			started, ok := hasEvent(evs, edged.EventRentalStarted, r1)
			ended, _ := hasEvent(evs, edged.EventRentalEnded, r1)
			var rd map[string]any
			json.Unmarshal(res.Data, &rd)
			if !ok || res.Seq == 0 || rd["ok"] != true || res.Seq > ended.Seq || started.Seq > ended.Seq {
				t.Fatalf("rental.result %d %s, started %d, ended %d: want an ok result and started before ended", res.Seq, res.Data, started.Seq, ended.Seq)
			}
			var ed map[string]any
			json.Unmarshal(ended.Data, &ed)
			if ed["reason"] != "expired" {
				t.Fatalf("rental.ended = %s", ended.Data)
			}
			if cmds := chair.Commands(); len(cmds) == 0 || cmds[0].Action != "start" || cmds[0].DurationS != 2 {
				t.Fatalf("chair-1 got %+v, want start for 2 s", cmds)
			}
			s.noViolations()
		})
	}
}

// TestEmuCloudBacklog: 3,000 device events published while the cloud is
// down are drained when it comes back, in seq order with no gap, each
// device's in the order it sent them, and nothing the store holds is
// missing; no rule broken.
func TestEmuCloudBacklog(t *testing.T) {
	for _, profile := range emuProfiles {
		t.Run(profile, func(t *testing.T) {
			const n = 3000
			s := startEmuStation(t, profile, 0, "chair-1", "chair-2")
			devs := []*devicesim.Device{s.device("chair-1"), s.device("chair-2")}
			s.waitEvents(200, 15*time.Second, "device.online", func(evs []edged.Event) bool {
				_, ok := hasEvent(evs, edged.EventDeviceOnline, func(d map[string]any) bool { return d["device_id"] == "chair-2" })
				return ok
			})
			s.stopCloud()
			publishBacklog(t, n, devs...)
			before := len(s.events(200))
			s.startCloud()
			evs := s.waitEvents(200, 60*time.Second, "the backlog", func(evs []edged.Event) bool {
				high, _ := checkOrder(t, evs)
				return high >= n
			})
			checkBacklog(t, evs, n, "chair-1", "chair-2")
			if after := len(s.events(200)) - before; after < n || s.cloud().Connects() < 1 {
				t.Fatalf("%d envelopes after the outage on %d connects", after, s.cloud().Connects())
			}
			high, repeats := checkOrder(t, evs)
			s.checkStored(200)
			s.noViolations()
			t.Logf("%s: %d envelopes up to seq %d, %d repeated, in %d messages", profile, len(evs), high, repeats, len(s.messages(s.topic("events"))))
		})
	}
}

// TestEmuCloudRestart: edged stopped (SIGTERM) in the middle of a drain
// and started again on the same store delivers everything, in seq order
// with no gap, repeating at most its in-flight window; no rule broken.
func TestEmuCloudRestart(t *testing.T) {
	for _, profile := range emuProfiles {
		t.Run(profile, func(t *testing.T) {
			const n = 3000
			// Small batches, so the drain takes seconds at the
			// profile's rate (aws 300 messages at 90/s, aliyun 150 at
			// 25/s) and a restart lands in the middle of it.
			batch := 10
			if profile == edged.ProfileAliyun {
				batch = 20
			}
			s := startEmuStation(t, profile, batch, "chair-1", "chair-2")
			devs := []*devicesim.Device{s.device("chair-1"), s.device("chair-2")}
			s.stopCloud()
			publishBacklog(t, n, devs...)
			s.startCloud()
			s.waitEvents(batch, 60*time.Second, "a part of the backlog", func(evs []edged.Event) bool {
				high, _ := checkOrder(t, evs)
				return high >= 200
			})
			s.stop(syscall.SIGTERM)
			mid, _ := checkOrder(t, s.events(batch))
			s.d = startDaemon(t, s.bin, s.config, s.local, s.logPath)
			if mid >= n {
				t.Fatalf("the backlog was drained (seq %d) before the restart: the test shows nothing", mid)
			}
			evs := s.waitEvents(batch, 90*time.Second, "the backlog after the restart", func(evs []edged.Event) bool {
				high, _ := checkOrder(t, evs)
				return high >= n
			})
			checkBacklog(t, evs, n, "chair-1", "chair-2")
			high, repeats := checkOrder(t, evs)
			s.checkStored(batch)
			// The default window (256 events) bounds what is sent twice.
			if w := edged.DefaultConfig().Uplink.Window; repeats > w {
				t.Fatalf("%d events repeated after the restart, more than the window of %d", repeats, w)
			}
			s.noViolations()
			t.Logf("%s: restarted at seq %d; %d envelopes up to seq %d, %d repeated", profile, mid, len(evs), high, repeats)
		})
	}
}

// TestEmuAliyunStatesAfterReconnect: aliyun keeps no retained message, so
// when the cloud drops the station (Kick) the reconnect sends the gateway
// message and every device's state again; a clean stop (SIGTERM) says
// {"online": false} on the gateway topic.
func TestEmuAliyunStatesAfterReconnect(t *testing.T) {
	devices := []string{"chair-1", "chair-2", "chair-3"}
	s := startEmuStation(t, edged.ProfileAliyun, 0, devices...)
	for _, id := range devices {
		s.device(id)
	}
	// statesSince returns the devices whose state arrived after message
	// index from, checking that each message is a batch.
	statesSince := func(from int) map[string]bool {
		got := map[string]bool{}
		for i, m := range s.messages(s.topic("devices")) {
			var b struct {
				Station string              `json:"station"`
				Devices []edged.DeviceState `json:"devices"`
			}
			if err := json.Unmarshal(m.payload, &b); err != nil || b.Station != "mall-1" || len(b.Devices) == 0 {
				t.Fatalf("not a batch of states: %.200s", m.payload)
			}
			if i < from {
				continue
			}
			for _, d := range b.Devices {
				if d.Online {
					got[d.DeviceID] = true
				}
			}
		}
		return got
	}
	waitFor(t, "every device online at the cloud", func() bool { return len(statesSince(0)) == len(devices) })
	states0, gateways0, connects0 := len(s.messages(s.topic("devices"))), len(s.messages(s.topic("gateway"))), s.cloud().Connects()
	if n := s.cloud().Kick(); n != 1 {
		t.Fatalf("the cloud closed %d connections, want the station's one", n)
	}
	waitFor(t, "every device's state again", func() bool { return len(statesSince(states0)) == len(devices) })
	gw := s.messages(s.topic("gateway"))
	if len(gw) <= gateways0 || !strings.Contains(string(gw[len(gw)-1].payload), `"online":true`) || s.cloud().Connects() != connects0+1 {
		t.Fatalf("after the reconnect: %d gateway messages (last %s), %d connects", len(gw), gw[len(gw)-1].payload, s.cloud().Connects())
	}
	s.stop(syscall.SIGTERM)
	waitFor(t, `{"online": false} on a clean stop`, func() bool {
		gw := s.messages(s.topic("gateway"))
		return string(gw[len(gw)-1].payload) == `{"online":false}`
	})
	for _, m := range s.messages(s.topic("gateway")) {
		if _, ok := s.cloud().Retained(m.topic); ok {
			t.Fatal("aliyun holds a retained message")
		}
	}
	s.noViolations()
}

// TestEmuAWSWillAfterKill: on aws, edged killed with SIGKILL leaves the
// gateway topic's retained message reading {"online": false} (its will);
// started again, it reads online.
func TestEmuAWSWillAfterKill(t *testing.T) {
	s := startEmuStation(t, edged.ProfileAWS, 0, "chair-1")
	s.device("chair-1")
	retained := func() string {
		b, _ := s.cloud().Retained(s.topic("gateway"))
		return string(b)
	}
	waitFor(t, "retained presence", func() bool { return strings.Contains(retained(), `"online":true`) })
	s.stop(syscall.SIGKILL)
	waitFor(t, "the retained will", func() bool { return retained() == `{"online":false}` })
	s.d = startDaemon(t, s.bin, s.config, s.local, s.logPath)
	waitFor(t, "retained presence after the restart", func() bool { return strings.Contains(retained(), `"online":true`) })
	s.noViolations()
}
