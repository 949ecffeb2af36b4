package reliability

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stationedge/edged"
	"github.com/stationedge/edged/store"
)

var ctx = context.Background()

// long reports whether the full-size campaign was asked for (EDGED_LONG=1).
func long() bool { return os.Getenv("EDGED_LONG") != "" }

// pick returns ci normally and full under EDGED_LONG.
func pick[T any](ci, full T) T {
	if long() {
		return full
	}
	return ci
}

// testSecret is every simulated device's secret; testHash is its bcrypt
// hash at the minimum cost, so thousands of devices connect in seconds.
const (
	testSecret = "secret"
	testHash   = "$2a$04$83maV7dITTtnC4sUur0I7evHBAR207siP09DESia7L6MraTjQ9gX2"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// edgedBinary builds the real edged once per test run.
func edgedBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "edged-reliability")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "edged")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/stationedge/edged/cmd/edged").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// cloud is an in-process MQTT broker standing in for the cloud. It records
// which messages to the station the station acknowledged (PUBACK), and a
// subscriber records every event the station delivered.
type cloud struct {
	Addr string
	srv  *mochi.Server
	hook *ackHook
	sub  mqtt.Client

	mu     sync.Mutex
	events map[uint64]edged.Event // by seq
}

// ackHook records the payloads of QoS 1 messages to a client that the
// client acknowledged, by watching the PUBACKs it reads from the client.
// (mochi's OnQosComplete is no use here: it also fires for the broker's own
// PUBACK to a client's publish, with the client's packet id, which may
// equal the id of a message in flight to that client.)
type ackHook struct {
	mochi.HookBase
	mu       sync.Mutex
	inflight map[string][]byte // client/packet id -> payload
	acked    [][]byte
}

func (h *ackHook) ID() string { return "acks" }
func (h *ackHook) Provides(b byte) bool {
	return b == mochi.OnQosPublish || b == mochi.OnPacketRead
}

func (h *ackHook) OnQosPublish(cl *mochi.Client, pk packets.Packet, sent int64, resends int) {
	if !strings.Contains(pk.TopicName, "/down/") {
		return
	}
	h.mu.Lock()
	h.inflight[cl.ID+"/"+strconv.Itoa(int(pk.PacketID))] = append([]byte(nil), pk.Payload...)
	h.mu.Unlock()
}

func (h *ackHook) OnPacketRead(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Puback {
		return pk, nil
	}
	k := cl.ID + "/" + strconv.Itoa(int(pk.PacketID))
	h.mu.Lock()
	if p, ok := h.inflight[k]; ok {
		h.acked = append(h.acked, p)
		delete(h.inflight, k)
	}
	h.mu.Unlock()
	return pk, nil
}

func newCloud(t *testing.T) *cloud {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cloud{Addr: ln.Addr().String(), events: map[uint64]edged.Event{},
		hook: &ackHook{inflight: map[string][]byte{}}}
	c.srv = mochi.New(&mochi.Options{InlineClient: true, Logger: discardLogger()})
	if err := c.srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	if err := c.srv.AddHook(c.hook, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.srv.AddListener(listeners.NewNet("cloud", ln)); err != nil {
		t.Fatal(err)
	}
	if err := c.srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.srv.Close() })
	o := mqtt.NewClientOptions().AddBroker("tcp://" + c.Addr).SetClientID("cloud-test").
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
	return c
}

// send publishes v to the station at QoS 1 without waiting.
func (c *cloud) send(topic string, v any) {
	b, _ := json.Marshal(v)
	c.sub.Publish(topic, 1, false, b)
}

// Acked returns the payloads the station acknowledged.
func (c *cloud) Acked() [][]byte {
	c.hook.mu.Lock()
	defer c.hook.mu.Unlock()
	return append([][]byte(nil), c.hook.acked...)
}

// Events returns the events delivered so far, by seq.
func (c *cloud) Events() map[uint64]edged.Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[uint64]edged.Event, len(c.events))
	for k, v := range c.events {
		out[k] = v
	}
	return out
}

// daemon is one run of the real binary.
type daemon struct {
	t    *testing.T
	cmd  *exec.Cmd
	done chan struct{}
}

type stationConfig struct {
	Dir, Local, Cloud string
	Devices           []string
	Extra             string // more YAML, top level
}

// writeConfig writes an edged config and returns its path.
func writeConfig(t *testing.T, c stationConfig) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "station: {id: mall-1}\ndata_dir: %s\n", filepath.Join(c.Dir, "data"))
	fmt.Fprintf(&b, "clock: {assume_synced: true}\n")
	if !strings.Contains(c.Extra, "local:") {
		fmt.Fprintf(&b, "local: {listen: %q}\n", c.Local)
	}
	if !strings.Contains(c.Extra, "http:") {
		fmt.Fprintf(&b, "http: {listen: \"\"}\n")
	}
	if c.Cloud != "" && !strings.Contains(c.Extra, "uplink:") {
		fmt.Fprintf(&b, "uplink: {url: \"tcp://%s\", reconnect_max: 1s, keepalive: 5s}\n", c.Cloud)
	}
	b.WriteString(c.Extra)
	b.WriteString("\ndevices:\n")
	for _, id := range c.Devices {
		fmt.Fprintf(&b, "  - {id: %s, kind: chair, transport: mqtt, secret_hash: %q}\n", id, testHash)
	}
	path := filepath.Join(c.Dir, "edged.yaml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startDaemon runs argv (the binary and its arguments, possibly behind a
// wrapper such as unshare) with output appended to logPath, and waits
// until addr accepts connections.
func startDaemon(t *testing.T, argv []string, addr, logPath string, env ...string) *daemon {
	t.Helper()
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, cmd: cmd, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		lf.Close()
		close(d.done)
	}()
	t.Cleanup(d.kill)
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return d
		}
		select {
		case <-d.done:
			out, _ := os.ReadFile(logPath)
			t.Fatalf("edged exited before listening: %s", tail(out, 3000))
		default:
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(logPath)
			t.Fatalf("edged did not start listening: %s", tail(out, 3000))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// kill is power loss: SIGKILL, and wait until it is gone.
func (d *daemon) kill() {
	select {
	case <-d.done:
		return
	default:
	}
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

// stop is a clean stop (SIGTERM, as systemd does).
func (d *daemon) stop() {
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(15 * time.Second):
		d.t.Errorf("edged did not stop within 15 s of SIGTERM")
		d.kill()
	}
}

// procStats is what /proc says about a process.
type procStats struct {
	RSSKB, Threads, FDs int
}

func readProc(pid int) (procStats, error) {
	var s procStats
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		switch fields[0] {
		case "VmRSS:":
			s.RSSKB, _ = strconv.Atoi(fields[1])
		case "Threads:":
			s.Threads, _ = strconv.Atoi(fields[1])
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return s, err
	}
	s.FDs = len(fds)
	return s, nil
}

// openStore opens a stopped station's store read-write (bbolt locks it).
func openStore(t *testing.T, dir string) *store.DB {
	t.Helper()
	db, err := store.Open(filepath.Join(dir, "data", "edged.db"), store.Options{})
	if err != nil {
		t.Fatalf("store does not open after the crash: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// dumpLog prints the daemon's log when the test failed.
func dumpLog(t *testing.T, path string) {
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(path)
			t.Logf("edged log (tail):\n%s", tail(out, 6000))
		}
	})
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
