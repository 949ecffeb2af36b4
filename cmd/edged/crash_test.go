package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/devicesim"
	"github.com/stationedge/edged/store"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// edgedBinary builds the real edged once per test run.
func edgedBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "edged-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "edged")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// cloudBroker is an in-process MQTT broker standing in for the cloud.
func cloudBroker(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := mochi.New(&mochi.Options{InlineClient: true})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	if err := srv.AddListener(listeners.NewNet("cloud", ln)); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// cloudClient subscribes to the station's events and publishes to it.
type cloudClient struct {
	c      mqtt.Client
	mu     sync.Mutex
	events []edged.Event
}

func newCloudClient(t *testing.T, addr string) *cloudClient {
	t.Helper()
	cc := &cloudClient{}
	o := mqtt.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("cloud-test").
		SetProtocolVersion(4).SetAutoReconnect(true)
	cc.c = mqtt.NewClient(o)
	if tok := cc.c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud client: %v", tok.Error())
	}
	tok := cc.c.Subscribe("stations/mall-1/up/events", 1, func(_ mqtt.Client, m mqtt.Message) {
		var e edged.Event
		if json.Unmarshal(m.Payload(), &e) == nil {
			cc.mu.Lock()
			cc.events = append(cc.events, e)
			cc.mu.Unlock()
		}
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud subscribe: %v", tok.Error())
	}
	t.Cleanup(func() { cc.c.Disconnect(0) })
	return cc
}

func (cc *cloudClient) publish(t *testing.T, topic string, v any) {
	t.Helper()
	b, _ := json.Marshal(v)
	if tok := cc.c.Publish(topic, 1, false, b); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("cloud publish: %v", tok.Error())
	}
}

// wait returns the first event of typ received, waiting up to d.
func (cc *cloudClient) wait(t *testing.T, typ edged.EventType, d time.Duration) (edged.Event, time.Time) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		cc.mu.Lock()
		for _, e := range cc.events {
			if e.Type == typ {
				cc.mu.Unlock()
				return e, time.Now()
			}
		}
		cc.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no %s from the station within %v", typ, d)
	return edged.Event{}, time.Time{}
}

type daemon struct {
	cmd *exec.Cmd
	log *os.File
}

func startDaemon(t *testing.T, bin, config, localAddr, logPath string) *daemon {
	t.Helper()
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-config", config)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: cmd, log: lf}
	t.Cleanup(func() { d.kill() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", localAddr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return d
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(logPath)
			t.Fatalf("edged did not start listening: %s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (d *daemon) kill() {
	if d.cmd.ProcessState == nil {
		d.cmd.Process.Signal(syscall.SIGKILL)
		d.cmd.Wait()
	}
	d.log.Close()
}

// TestCrashDuringRental runs the real binary, kills it with SIGKILL during
// an active rental and restarts it: the rental resumes, ends no later than
// its granted duration plus 5 s, and seq continues with no gap and no
// repeat.
func TestCrashDuringRental(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := edgedBinary(t)
	dir := t.TempDir()
	cloud := cloudBroker(t)
	localAddr := freePort(t)
	config := filepath.Join(dir, "edged.yaml")
	data := filepath.Join(dir, "data")
	os.WriteFile(config, []byte(fmt.Sprintf(`
station: {id: mall-1}
data_dir: %s
local: {listen: "%s"}
uplink: {url: "tcp://%s", reconnect_max: 1s}
clock: {assume_synced: true}
http: {listen: ""}
devices:
  - {id: chair-1, kind: chair, transport: mqtt, secret_hash: "%s"}
`, data, localAddr, cloud, testHash)), 0o600)
	logPath := filepath.Join(dir, "edged.log")
	defer func() {
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("edged log:\n%s", out)
		}
	}()

	cc := newCloudClient(t, cloud)
	d := startDaemon(t, bin, config, localAddr, logPath)
	chair := &devicesim.Device{ID: "chair-1", Secret: "secret", Broker: "tcp://" + localAddr}
	if err := chair.Connect(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	cc.wait(t, edged.EventDeviceOnline, 10*time.Second)

	const duration = 10 * time.Second
	cc.publish(t, "stations/mall-1/down/rentals", map[string]any{
		"op": "grant", "rental_id": "r-crash", "device_id": "chair-1", "renter_id": "alice", "duration_s": int(duration / time.Second)})
	started, _ := cc.wait(t, edged.EventRentalStarted, 10*time.Second)
	var sd edged.RentalStartedData
	json.Unmarshal(started.Data, &sd)

	time.Sleep(4 * time.Second)
	d.cmd.Process.Signal(syscall.SIGKILL)
	d.cmd.Wait()
	chair.Disconnect()
	time.Sleep(500 * time.Millisecond)

	d = startDaemon(t, bin, config, localAddr, logPath)
	chair2 := &devicesim.Device{ID: "chair-1", Secret: "secret", Broker: "tcp://" + localAddr}
	if err := chair2.Connect(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	defer chair2.Disconnect()
	ended, _ := cc.wait(t, edged.EventRentalEnded, 20*time.Second)
	var ed edged.RentalEndedData
	json.Unmarshal(ended.Data, &ed)
	if ed.Reason != edged.ReasonExpired || ed.RentalID != "r-crash" {
		t.Fatalf("rental.ended = %+v", ed)
	}
	// The station's own times (its clock is synced, so the downtime is
	// measured and charged), not when the events reached the cloud: their
	// delivery after a restart says nothing about when the rental ended.
	if over := ed.EndedAt.Sub(sd.StartedAt) - duration; over > 5*time.Second {
		t.Fatalf("rental ended %v after its granted duration, want at most 5 s", over)
	} else {
		t.Logf("rental ended %v after its granted duration", over.Round(time.Millisecond))
	}
	// The device heard start again after the restart with the time left,
	// then stop.
	var actions []string
	for _, c := range chair2.Commands() {
		actions = append(actions, fmt.Sprintf("%s/%d", c.Action, c.DurationS))
	}
	if len(actions) < 2 || actions[len(actions)-1][:4] != "stop" {
		t.Fatalf("device commands after restart = %v, want start with time left, then stop", actions)
	}

	// Stop edged and read its log of events: seq 1..N, no gap, no repeat,
	// and one rental.started and one rental.ended.
	d.cmd.Process.Signal(syscall.SIGTERM)
	d.cmd.Wait()
	db, err := store.Open(filepath.Join(data, "edged.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	evs, err := db.Events(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	counts := map[edged.EventType]int{}
	for i, e := range evs {
		if e.Seq != uint64(i+1) {
			t.Fatalf("event %d has seq %d", i, e.Seq)
		}
		counts[e.Type]++
	}
	if counts[edged.EventRentalStarted] != 1 || counts[edged.EventRentalEnded] != 1 {
		t.Fatalf("event counts = %v", counts)
	}
	// Everything the cloud received matches the store, seq for seq.
	cc.mu.Lock()
	seen := map[uint64]edged.EventType{}
	for _, e := range cc.events {
		if prev, ok := seen[e.Seq]; ok && prev != e.Type {
			t.Fatalf("seq %d delivered as %s and %s", e.Seq, prev, e.Type)
		}
		seen[e.Seq] = e.Type
	}
	cc.mu.Unlock()
	var got []int
	for s := range seen {
		got = append(got, int(s))
	}
	sort.Ints(got)
	for i, s := range got {
		if s != i+1 || seen[uint64(s)] != evs[i].Type {
			t.Fatalf("cloud got seqs %v, store has %d events", got, len(evs))
		}
	}
}
