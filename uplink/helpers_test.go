package uplink

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/faultproxy"
)

// mosquitto is a Debian mosquitto broker run by a test, on loopback ports
// of its own with its own configuration.
type mosquitto struct {
	addr string // host:port of the first (plain) listener
	log  string
}

// startMosquitto runs mosquitto with the given extra configuration lines;
// extra may use {port} placeholders via listeners (see below). It returns
// once every listener accepts connections. In CI a missing mosquitto is a
// failure, never a skip.
func startMosquitto(t testing.TB, extra string) *mosquitto {
	t.Helper()
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("mosquitto is not installed (apt-get install mosquitto); CI must run these tests")
		}
		t.Skip("mosquitto is not installed")
	}
	dir := t.TempDir()
	port := freePort(t)
	m := &mosquitto{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), log: filepath.Join(dir, "mosquitto.log")}
	conf := fmt.Sprintf(`user root
persistence false
log_dest file %s
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
allow_anonymous true
max_queued_messages 0
max_inflight_messages 0
listener %d 127.0.0.1
%s
`, m.log, port, extra)
	cf := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "-c", cf)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			b, _ := os.ReadFile(m.log)
			if len(b) > 4000 {
				b = b[len(b)-4000:]
			}
			t.Logf("mosquitto log (tail):\n%s%s", b, stderr.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", m.addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-exited:
			t.Fatalf("mosquitto exited: %s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("mosquitto did not listen on %s: %s", m.addr, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return m
}

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// waitFor polls cond every 10 ms until it holds or d passes.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fakeOutbox is an in-memory edged.Outbox.
type fakeOutbox struct {
	mu      sync.Mutex
	events  []edged.Event // queued, ascending seq
	nextSeq uint64
	acked   int
	notify  chan struct{}
}

func newFakeOutbox() *fakeOutbox {
	return &fakeOutbox{nextSeq: 1, notify: make(chan struct{}, 1)}
}

// Append queues n device events for device ids cycling through devices.
func (o *fakeOutbox) Append(n, devices int) {
	o.mu.Lock()
	for i := 0; i < n; i++ {
		seq := o.nextSeq
		o.nextSeq++
		data, _ := json.Marshal(edged.DeviceEventData{
			DeviceID: fmt.Sprintf("dev-%02d", i%devices),
			Event:    json.RawMessage(fmt.Sprintf(`{"type":"tick","n":%d}`, seq)),
		})
		o.events = append(o.events, edged.Event{
			Seq: seq, Station: "st-1", Type: edged.EventDeviceEvent,
			TS: time.Unix(1700000000, 0), ClockSynced: true, Data: data,
		})
	}
	o.mu.Unlock()
	select {
	case o.notify <- struct{}{}:
	default:
	}
}

func (o *fakeOutbox) Pending(ctx context.Context, after uint64, limit int) ([]edged.Event, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	i := sort.Search(len(o.events), func(i int) bool { return o.events[i].Seq > after })
	j := min(i+limit, len(o.events))
	return append([]edged.Event(nil), o.events[i:j]...), nil
}

func (o *fakeOutbox) Ack(ctx context.Context, seqs ...uint64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	gone := make(map[uint64]bool, len(seqs))
	for _, s := range seqs {
		gone[s] = true
	}
	kept := o.events[:0]
	for _, e := range o.events {
		if gone[e.Seq] {
			o.acked++
			continue
		}
		kept = append(kept, e)
	}
	o.events = kept
	return nil
}

func (o *fakeOutbox) OutboxStats(now time.Time) edged.OutboxStats {
	o.mu.Lock()
	defer o.mu.Unlock()
	return edged.OutboxStats{Events: len(o.events), LastSeq: o.nextSeq - 1}
}

func (o *fakeOutbox) Notify() <-chan struct{} { return o.notify }

func (o *fakeOutbox) Len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.events)
}

// fakeStates is an in-memory edged.StateSource.
type fakeStates struct {
	mu      sync.Mutex
	states  map[string]edged.DeviceState
	changed chan struct{}
	tick    time.Time
	version uint64
}

func newFakeStates() *fakeStates {
	return &fakeStates{states: map[string]edged.DeviceState{}, changed: make(chan struct{}, 1), tick: time.Unix(1700000000, 0)}
}

// Set replaces a device's state, stamping a new UpdatedAt and Version
// (the uplink coalesces by Version).
func (f *fakeStates) Set(st edged.DeviceState) edged.DeviceState {
	f.mu.Lock()
	f.tick = f.tick.Add(time.Millisecond)
	st.UpdatedAt = f.tick
	f.version++
	st.Version = f.version
	if st.Kind == "" {
		st.Kind = "chair"
	}
	if st.Transport == "" {
		st.Transport = edged.TransportMQTT
	}
	if st.Status == "" {
		st.Status = edged.StatusIdle
	}
	f.states[st.DeviceID] = st
	f.mu.Unlock()
	select {
	case f.changed <- struct{}{}:
	default:
	}
	return st
}

func (f *fakeStates) DeviceStates() []edged.DeviceState {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]edged.DeviceState, 0, len(f.states))
	for _, s := range f.states {
		out = append(out, s.Clone())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].DeviceID < out[j].DeviceID })
	return out
}

func (f *fakeStates) StatesChanged() <-chan struct{} { return f.changed }

func (f *fakeStates) ChangedSince(v uint64) ([]edged.DeviceState, uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return changedSince(f.states, v), f.version
}

// changedSince is edged.StateSource's ChangedSince over a fake's states.
func changedSince(states map[string]edged.DeviceState, v uint64) []edged.DeviceState {
	var out []edged.DeviceState
	for _, s := range states {
		if s.Version > v {
			out = append(out, s.Clone())
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out
}

// fakeHandler is an edged.CloudHandler that records what it made durable.
type fakeHandler struct {
	mu       sync.Mutex
	rentals  []string // payloads accepted, in order
	commands []string
	calls    int
	// fail, when set, decides whether a call fails (before recording).
	fail func(call int, payload []byte) error
}

func (h *fakeHandler) handle(list *[]string, payload []byte) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls++
	if h.fail != nil {
		if err := h.fail(h.calls, payload); err != nil {
			return err
		}
	}
	*list = append(*list, string(payload))
	return nil
}

func (h *fakeHandler) Rental(ctx context.Context, p []byte) error { return h.handle(&h.rentals, p) }
func (h *fakeHandler) RenterCommand(ctx context.Context, p []byte) error {
	return h.handle(&h.commands, p)
}

func (h *fakeHandler) snapshot() (rentals, commands []string, calls int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.rentals...), append([]string(nil), h.commands...), h.calls
}

// cloud is a subscriber at the cloud broker, standing in for the back end.
type cloud struct {
	t      testing.TB
	client mqtt.Client
	mu     sync.Mutex
	msgs   []cloudMsg
}

type cloudMsg struct {
	topic    string
	payload  []byte
	retained bool
}

// newCloud connects a subscriber to addr and subscribes to filter.
func newCloud(t testing.TB, addr, filter string) *cloud {
	t.Helper()
	c := &cloud{t: t}
	opts := mqtt.NewClientOptions().AddBroker("tcp://" + addr).
		SetClientID(fmt.Sprintf("cloud-%d", time.Now().UnixNano())).
		SetProtocolVersion(4).SetAutoReconnect(false).SetCleanSession(true).
		SetOrderMatters(true)
	c.client = mqtt.NewClient(opts)
	if err := wait(context.Background(), c.client.Connect(), 5*time.Second); err != nil {
		t.Fatalf("cloud connect: %v", err)
	}
	t.Cleanup(func() { c.client.Disconnect(100) })
	tok := c.client.Subscribe(filter, 1, func(_ mqtt.Client, m mqtt.Message) {
		c.mu.Lock()
		c.msgs = append(c.msgs, cloudMsg{m.Topic(), append([]byte(nil), m.Payload()...), m.Retained()})
		c.mu.Unlock()
	})
	if err := wait(context.Background(), tok, 5*time.Second); err != nil {
		t.Fatalf("cloud subscribe: %v", err)
	}
	return c
}

func (c *cloud) messages() []cloudMsg {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]cloudMsg(nil), c.msgs...)
}

// publish sends a QoS 1 message as the cloud back end.
func (c *cloud) publish(topic, payload string) {
	c.t.Helper()
	if err := wait(context.Background(), c.client.Publish(topic, 1, false, payload), 5*time.Second); err != nil {
		c.t.Fatalf("cloud publish: %v", err)
	}
}

// events returns the seqs received on the events topic, in arrival order,
// and the payload first seen for each seq.
func (c *cloud) events(topic string) ([]uint64, map[uint64]string) {
	var seqs []uint64
	first := map[uint64]string{}
	for _, m := range c.messages() {
		if m.topic != topic {
			continue
		}
		var ev struct {
			Seq uint64 `json:"seq"`
		}
		if err := json.Unmarshal(m.payload, &ev); err != nil {
			c.t.Fatalf("event is not JSON: %q", m.payload)
		}
		seqs = append(seqs, ev.Seq)
		if _, ok := first[ev.Seq]; !ok {
			first[ev.Seq] = string(m.payload)
		}
	}
	return seqs, first
}

// checkOrder checks a stream of seqs for the uplink's promise: every seq
// from 1 to want arrives; each message is either the next seq or a repeat
// of one already sent (a resend after a loss), and the number of resends
// (points where the seq goes back) is at most maxRestarts.
func checkOrder(t *testing.T, seqs []uint64, want uint64, maxRestarts int) (repeats int) {
	t.Helper()
	var high uint64
	restarts := 0
	for i, s := range seqs {
		switch {
		case s == high+1:
			high = s
		case s <= high:
			repeats++
			if i > 0 && s <= seqs[i-1] {
				restarts++
			}
		default:
			t.Fatalf("gap: got seq %d after %d (message %d of %d)", s, high, i, len(seqs))
		}
	}
	if high != want {
		t.Fatalf("got seqs up to %d, want %d", high, want)
	}
	if restarts > maxRestarts {
		t.Fatalf("seq went back %d times, but the link was lost at most %d times", restarts, maxRestarts)
	}
	return repeats
}

// testLogger logs to the test at debug level when -v is given.
func testLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return nil
	}
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// station bundles the fakes of the station side.
type station struct {
	outbox  *fakeOutbox
	states  *fakeStates
	handler *fakeHandler
}

func newStation() *station {
	return &station{outbox: newFakeOutbox(), states: newFakeStates(), handler: &fakeHandler{}}
}

// baseConfig is an uplink configuration for tests: a 1 s keepalive and a
// 1 s reconnect cap, so outages are detected and healed within seconds.
func (s *station) config(t testing.TB, url string) Config {
	return Config{
		UplinkConfig: edged.UplinkConfig{
			URL: url, TopicRoot: "stations", KeepAlive: time.Second,
			ReconnectMax: time.Second, Window: 64,
		},
		StationID: "st-1", StationName: "Test station",
		Outbox: s.outbox, States: s.states, Handler: s.handler,
		Logger: testLogger(t),
	}
}

// runUplink starts u.Run and stops it at cleanup, checking it returns nil.
func runUplink(t *testing.T, u *Uplink) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- u.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run returned %v, want nil on cancel", err)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("Run did not return within 10s of cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// newProxy starts a fault proxy in front of addr, closed when the test ends.
func newProxy(t testing.TB, addr string) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.New(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}
