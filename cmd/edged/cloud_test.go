package main

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/devicesim"
	"github.com/stationedge/edged/internal/faultproxy"
)

// startMosquitto runs Debian's mosquitto on a free loopback port with its
// own configuration, plus extra lines of mosquitto.conf, and returns its
// address. In CI a missing mosquitto is a failure, never a skip.
func startMosquitto(t *testing.T, extra ...string) string {
	t.Helper()
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/mosquitto"); serr == nil {
			bin = "/usr/sbin/mosquitto"
		} else if os.Getenv("CI") != "" {
			t.Fatal("mosquitto is not installed (apt-get install mosquitto); CI must run these tests")
		} else {
			t.Skip("mosquitto is not installed")
		}
	}
	dir := t.TempDir()
	addr := freePort(t)
	_, port, _ := net.SplitHostPort(addr)
	conf := fmt.Sprintf("persistence false\nallow_anonymous true\nmax_queued_messages 0\nlistener %s 127.0.0.1\nlog_dest file %s\n",
		port, filepath.Join(dir, "mosquitto.log"))
	for _, l := range extra {
		conf += l + "\n"
	}
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
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatal("mosquitto did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// eventsOf returns the events of typ the cloud received so far.
func (cc *cloudClient) eventsOf(typ edged.EventType) []map[string]any {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	var out []map[string]any
	for _, e := range cc.events {
		if e.Type == typ {
			var d map[string]any
			json.Unmarshal(e.Data, &d)
			out = append(out, d)
		}
	}
	return out
}

// waitData waits for an event of typ whose data matches f.
func (cc *cloudClient) waitData(t *testing.T, typ edged.EventType, f func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		for _, d := range cc.eventsOf(typ) {
			if f(d) {
				return d
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the cloud got no matching %s", typ)
	return nil
}

func signedMsg(key ed25519.PrivateKey, station string, m map[string]any) map[string]any {
	rm := edged.RentalMessage{Op: m["op"].(string), RentalID: m["rental_id"].(string), DeviceID: m["device_id"].(string), RenterID: m["renter_id"].(string)}
	if d, ok := m["duration_s"].(int); ok {
		rm.DurationS = int64(d)
	}
	if na, ok := m["not_after"].(string); ok {
		rm.NotAfter = na
	}
	m["sig"] = edged.SignRental(key, station, rm)
	return m
}

// TestCloudRentalsOverMosquitto drives the station from a cloud on real
// mosquitto: signed grants start a real MQTT device, refusals come back
// with their reasons, renter commands are gated by the binding, and a
// rental that expires during an outage stops its device on time, its
// rental.ended arriving once the link returns.
func TestCloudRentalsOverMosquitto(t *testing.T) {
	cloud := startMosquitto(t)
	proxy, err := faultproxy.New(cloud)
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	pub, priv, _ := ed25519.GenerateKey(nil)
	cfg := testConfig(t, "chair-1", "chair-2")
	cfg.Uplink.URL = "tcp://" + proxy.Addr()
	cfg.Uplink.KeepAlive = 2 * time.Second
	cfg.Uplink.ReconnectMax = time.Second
	cfg.Rentals.VerifyKey = base64.StdEncoding.EncodeToString(pub)
	cc := newCloudClient(t, cloud)
	s := startStation(t, cfg)
	chair := s.device("chair-1")
	other := s.device("chair-2")
	cc.waitData(t, edged.EventDeviceOnline, func(d map[string]any) bool { return d["device_id"] == "chair-2" })

	const rentals = "stations/mall-1/down/rentals"
	cc.publish(t, rentals, signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-1", "device_id": "chair-1", "renter_id": "alice", "duration_s": 600}))
	cc.waitData(t, edged.EventRentalResult, func(d map[string]any) bool { return d["rental_id"] == "r-1" && d["ok"] == true })
	cc.waitData(t, edged.EventRentalStarted, func(d map[string]any) bool { return d["rental_id"] == "r-1" })
	if cmds := chair.Commands(); len(cmds) != 1 || cmds[0].Action != "start" || cmds[0].DurationS != 600 {
		t.Fatalf("chair-1 got %+v, want start for 600 s", cmds)
	}

	tampered := signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-2", "device_id": "chair-2", "renter_id": "bob", "duration_s": 60})
	tampered["duration_s"] = 6000
	refusals := []struct {
		name, id string
		msg      map[string]any
		reason   string
	}{
		{"tampered", "r-2", tampered, "bad_signature"},
		{"other station", "r-3", signedMsg(priv, "mall-2", map[string]any{"op": "grant", "rental_id": "r-3", "device_id": "chair-2", "renter_id": "bob", "duration_s": 60}), "bad_signature"},
		{"past not_after", "r-4", signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-4", "device_id": "chair-2", "renter_id": "bob", "duration_s": 60,
			"not_after": time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)}), "expired"},
	}
	for _, r := range refusals {
		cc.publish(t, rentals, r.msg)
		d := cc.waitData(t, edged.EventRentalResult, func(d map[string]any) bool { return d["rental_id"] == r.id })
		if d["ok"] != false || d["reason"] != r.reason {
			t.Errorf("%s: rental.result = %v, want %s", r.name, d, r.reason)
		}
	}
	if len(other.Commands()) != 0 {
		t.Fatalf("a refused grant reached chair-2: %+v", other.Commands())
	}

	const commands = "stations/mall-1/down/commands"
	cc.publish(t, commands, map[string]any{"cmd_id": "c-1", "device_id": "chair-1", "renter_id": "mallory", "action": "massage"})
	cc.publish(t, commands, map[string]any{"cmd_id": "c-2", "device_id": "chair-1", "renter_id": "alice", "action": "massage"})
	if d := cc.waitData(t, edged.EventCommandResult, func(d map[string]any) bool { return d["cmd_id"] == "c-1" }); d["reason"] != "not_renter" {
		t.Fatalf("other renter's command = %v", d)
	}
	if d := cc.waitData(t, edged.EventCommandResult, func(d map[string]any) bool { return d["cmd_id"] == "c-2" }); d["ok"] != true {
		t.Fatalf("renter's command = %v", d)
	}
	for _, c := range chair.Commands() {
		if c.CmdID == "c-1" {
			t.Fatal("another renter's command reached the device")
		}
	}

	// A short rental that runs out while the link is down.
	cc.publish(t, rentals, signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-5", "device_id": "chair-2", "renter_id": "bob", "duration_s": 2}))
	cc.waitData(t, edged.EventRentalStarted, func(d map[string]any) bool { return d["rental_id"] == "r-5" })
	proxy.Cut()
	waitFor(t, "stop at chair-2", func() bool {
		c := other.Commands()
		return len(c) > 0 && c[len(c)-1].Action == "stop"
	})
	cs := other.Commands()
	if ran := cs[len(cs)-1].At.Sub(cs[0].At); ran < 2*time.Second || ran > 2*time.Second+5*time.Second { // 2 s granted; §4 allows 5 s more
		t.Fatalf("chair-2 ran %v between start and stop, want 2 s (at most 7)", ran)
	}
	if len(cc.eventsOf(edged.EventRentalEnded)) != 0 {
		t.Fatal("rental.ended reached the cloud through a cut link")
	}
	proxy.Restore()
	d := cc.waitData(t, edged.EventRentalEnded, func(d map[string]any) bool { return d["rental_id"] == "r-5" })
	if d["reason"] != "expired" {
		t.Fatalf("rental.ended = %v", d)
	}
}

// TestKillDuringDrain SIGKILLs the real binary ten times while it drains
// a backlog to mosquitto: the cloud ends with every seq, none lost, in
// order within each connection, and a repeated seq always carries the
// same event.
func TestKillDuringDrain(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := edgedBinary(t)
	cloud := startMosquitto(t)
	proxy, err := faultproxy.New(cloud)
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	proxy.Cut()
	dir := t.TempDir()
	localAddr := freePort(t)
	config := filepath.Join(dir, "edged.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf(`
station: {id: mall-1}
data_dir: %s
local: {listen: "%s"}
uplink: {url: "tcp://%s", reconnect_max: 1s, keepalive: 2s, window: 16}
http: {listen: ""}
devices:
  - {id: chair-1, kind: chair, transport: mqtt, secret_hash: "%s"}
`, filepath.Join(dir, "data"), localAddr, proxy.Addr(), testHash)), 0o600)
	logPath := filepath.Join(dir, "edged.log")
	defer func() {
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("edged log:\n%s", out)
		}
	}()
	cc := newCloudClient(t, cloud)
	d := startDaemon(t, bin, config, localAddr, logPath)

	// A backlog while the cloud is unreachable.
	chair := &devicesim.Device{ID: "chair-1", Secret: "secret", Broker: "tcp://" + localAddr}
	if err := chair.Connect(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	const backlog = 3000
	for i := 0; i < backlog; i++ {
		if err := chair.Publish("events", map[string]any{"type": "count", "n": i}); err != nil {
			t.Fatal(err)
		}
	}
	chair.Disconnect()

	proxy.Restore()
	kills := 0
	for kills < 10 {
		// Let the drain get going, then kill it mid-way.
		time.Sleep(time.Duration(150+kills*40) * time.Millisecond)
		d.cmd.Process.Signal(syscall.SIGKILL)
		d.cmd.Wait()
		kills++
		d = startDaemon(t, bin, config, localAddr, logPath)
	}
	// Let it finish: the cloud must end with every seq.
	var want uint64
	deadline := time.Now().Add(60 * time.Second)
	for {
		cc.mu.Lock()
		seqs := map[uint64]string{}
		repeats, mismatched := 0, 0
		var max uint64
		for _, e := range cc.events {
			key := string(e.Type) + string(e.Data)
			if prev, ok := seqs[e.Seq]; ok {
				repeats++
				if prev != key {
					mismatched++
				}
			}
			seqs[e.Seq] = key
			if e.Seq > max {
				max = e.Seq
			}
		}
		cc.mu.Unlock()
		if mismatched > 0 {
			t.Fatalf("%d repeated seqs carried a different event", mismatched)
		}
		counts := 0
		for _, k := range seqs {
			if len(k) > 12 && k[:12] == "device.event" {
				counts++
			}
		}
		if counts >= backlog && uint64(len(seqs)) == max {
			want = max
			t.Logf("%d kills during the drain: %d distinct seqs delivered, %d repeats, none lost", kills, len(seqs), repeats)
			// A crash repeats at most the window (16 here).
			if repeats > kills*16 {
				t.Fatalf("%d repeats after %d kills: more than the window of 16 per kill", repeats, kills)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %d kills the cloud has %d distinct seqs up to %d and %d of %d device events", kills, len(seqs), max, counts, backlog)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if want < backlog {
		t.Fatalf("only %d seqs", want)
	}
}
