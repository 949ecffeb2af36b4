package uplink

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
)

const (
	eventsTopic  = "stations/st-1/up/events"
	gatewayTopic = "stations/st-1/gateway"
	deviceTopic  = "stations/st-1/up/devices/"
)

func TestNewValidates(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	os.WriteFile(notPEM, []byte("not a certificate"), 0o600)
	s := newStation()
	tests := []struct {
		name string
		edit func(c *Config)
		want string // substring of the error; "" for none
	}{
		{"tcp", func(c *Config) {}, ""},
		{"default port", func(c *Config) { c.URL = "tls://example.com" }, ""},
		{"disabled", func(c *Config) { c.URL = ""; c.Outbox = nil }, ""},
		{"bad scheme", func(c *Config) { c.URL = "http://example.com" }, "scheme"},
		{"no host", func(c *Config) { c.URL = "tcp://" }, "scheme://host"},
		{"credentials in url", func(c *Config) { c.URL = "tcp://u:p@example.com" }, "username"},
		{"missing ca", func(c *Config) { c.URL = "tls://example.com"; c.CAFile = filepath.Join(dir, "nope") }, "ca_file"},
		{"ca not pem", func(c *Config) { c.URL = "tls://example.com"; c.CAFile = notPEM }, "no PEM"},
		{"cert without key", func(c *Config) { c.URL = "tls://example.com"; c.CertFile = notPEM }, "go together"},
		{"ca on plain tcp", func(c *Config) { c.CAFile = notPEM }, "need a tls"},
		{"bad station", func(c *Config) { c.StationID = "Bad/ID" }, "station id"},
		{"no outbox", func(c *Config) { c.Outbox = nil }, "required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := s.config(t, "tcp://127.0.0.1:1")
			tt.edit(&c)
			_, err := New(c)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("New: %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("New: got %v, want an error with %q", err, tt.want)
			case err != nil && edged.ErrorCode(err) != edged.EINVALID:
				t.Fatalf("New: got code %s, want %s", edged.ErrorCode(err), edged.EINVALID)
			}
		})
	}
}

func TestDisabled(t *testing.T) {
	u, err := New(Config{StationID: "st-1"})
	if err != nil {
		t.Fatal(err)
	}
	stop := runUplink(t, u)
	if got := u.Status().State; got != StateDisabled {
		t.Fatalf("state: got %q, want %q", got, StateDisabled)
	}
	stop()
}

func TestBackoff(t *testing.T) {
	for n := 0; n < 12; n++ {
		for range 50 {
			d := backoff(n, 5*time.Second)
			lo, hi := 250*time.Millisecond<<n/1, 500*time.Millisecond<<n
			hi = min(hi, 5*time.Second)
			lo = min(lo, hi/2)
			if d < lo || d > hi {
				t.Fatalf("backoff(%d) = %v, want within [%v, %v]", n, d, lo, hi)
			}
		}
	}
}

// TestPresence: the gateway is retained online with its identity while
// connected, and offline after a clean stop; device states are retained.
func TestPresence(t *testing.T) {
	m := startMosquitto(t, "")
	s := newStation()
	s.states.Set(edged.DeviceState{DeviceID: "chair-1", Online: true})
	cfg := s.config(t, "tcp://"+m.addr)
	loc := edged.Location{Lat: 48.1, Lon: 11.5}
	cfg.StationLocation = &loc
	cfg.StartedAt = time.Date(2026, 1, 2, 3, 4, 5, 600000000, time.FixedZone("x", 3600))
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := runUplink(t, u)
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })

	// A subscriber arriving later sees the retained messages.
	c := newCloud(t, m.addr, "stations/st-1/#")
	waitFor(t, 5*time.Second, "retained presence and device", func() bool { return len(c.messages()) >= 2 })
	got := map[string]any{}
	for _, msg := range c.messages() {
		if !msg.retained {
			t.Errorf("%s: not retained", msg.topic)
		}
		var v any
		json.Unmarshal(msg.payload, &v)
		got[msg.topic] = v
	}
	wantGateway := map[string]any{
		"online": true, "version": edged.Version, "started_at": "2026-01-02T02:04:05.6Z",
		"station": map[string]any{"id": "st-1", "name": "Test station", "location": map[string]any{"lat": 48.1, "lon": 11.5}},
	}
	if diff := cmp.Diff(wantGateway, got[gatewayTopic]); diff != "" {
		t.Errorf("gateway presence (-want +got):\n%s", diff)
	}
	dev, _ := got[deviceTopic+"chair-1"].(map[string]any)
	if dev["device_id"] != "chair-1" || dev["online"] != true || dev["rental"] != nil {
		t.Errorf("device state: got %v", dev)
	}

	stop()
	waitFor(t, 5*time.Second, "offline presence", func() bool {
		msgs := c.messages()
		last := msgs[len(msgs)-1]
		return last.topic == gatewayTopic && string(last.payload) == `{"online":false}`
	})
}

// TestOutage: while the link is cut, 10,000 events queue and 20 devices
// change 500 times each; after restore the cloud gets every event in seq
// order and exactly one, final, state per device.
func TestOutage(t *testing.T) {
	const devices, changes, events = 20, 500, 10000
	m := startMosquitto(t, "")
	p := newProxy(t, m.addr)
	c := newCloud(t, m.addr, "stations/st-1/#")
	s := newStation()
	for d := range devices {
		s.states.Set(edged.DeviceState{DeviceID: fmt.Sprintf("dev-%02d", d), Online: true})
	}
	u, err := New(s.config(t, "tcp://"+p.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 5*time.Second, "first states", func() bool { return countPrefix(c.messages(), deviceTopic) == devices })

	p.Cut()
	waitFor(t, 5*time.Second, "the cut noticed", func() bool { return u.Status().State == StateConnecting })
	waitFor(t, 5*time.Second, "the will", func() bool {
		msgs := c.messages()
		return string(msgs[len(msgs)-1].payload) == `{"online":false}`
	})
	mark := len(c.messages())
	s.outbox.Append(events, devices)
	final := map[string]edged.DeviceState{}
	for i := range changes {
		for d := range devices {
			id := fmt.Sprintf("dev-%02d", d)
			final[id] = s.states.Set(edged.DeviceState{DeviceID: id, Online: true, Status: edged.StatusInUse,
				Telemetry: map[string]any{"n": float64(i)}})
		}
	}
	if got := u.Status().Outbox.Events; got != events {
		t.Fatalf("outbox while cut: got %d events, want %d", got, events)
	}

	start := time.Now()
	p.Restore()
	waitFor(t, 60*time.Second, "every event at the cloud", func() bool {
		seqs, _ := c.events(eventsTopic)
		return len(seqs) > 0 && seqs[len(seqs)-1] == events
	})
	elapsed := time.Since(start)
	waitFor(t, 5*time.Second, "the outbox emptied", func() bool { return s.outbox.Len() == 0 })
	t.Logf("drained %d events in %v after restore: %.0f events/s (window %d, race detector %v)",
		events, elapsed.Round(time.Millisecond), events/elapsed.Seconds(), u.cfg.Window, raceEnabled)

	seqs, _ := c.events(eventsTopic)
	checkOrder(t, seqs, events, 0)
	if st := u.Status(); st.LastAckedSeq != events || st.Reconnects != 1 {
		t.Errorf("status: LastAckedSeq %d, Reconnects %d; want %d, 1", st.LastAckedSeq, st.Reconnects, events)
	}

	// Coalesced: one message per device after the outage, its final state.
	after := c.messages()[mark:]
	perDevice := map[string][]cloudMsg{}
	for _, msg := range after {
		if id, ok := strings.CutPrefix(msg.topic, deviceTopic); ok {
			perDevice[id] = append(perDevice[id], msg)
		}
	}
	for id, want := range final {
		msgs := perDevice[id]
		if len(msgs) != 1 {
			t.Errorf("%s: got %d state messages after the outage, want 1", id, len(msgs))
			continue
		}
		var got edged.DeviceState
		json.Unmarshal(msgs[0].payload, &got)
		if !got.UpdatedAt.Equal(want.UpdatedAt) || got.Telemetry["n"] != float64(changes-1) {
			t.Errorf("%s: got updated_at %v n %v, want %v n %d", id, got.UpdatedAt, got.Telemetry["n"], want.UpdatedAt, changes-1)
		}
	}
}

func countPrefix(msgs []cloudMsg, prefix string) int {
	n := 0
	for _, m := range msgs {
		if strings.HasPrefix(m.topic, prefix) {
			n++
		}
	}
	return n
}

// TestStall: a link that goes silent without a FIN, in the middle of a
// drain, is detected by the keepalive and the PUBACK watchdog; the events
// in flight are resent and nothing is lost.
func TestStall(t *testing.T) {
	const events = 5000
	m := startMosquitto(t, "")
	p := newProxy(t, m.addr)
	c := newCloud(t, m.addr, eventsTopic)
	s := newStation()
	u, err := New(s.config(t, "tcp://"+p.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })

	// Stall mid-drain.
	s.outbox.Append(events, 20)
	waitFor(t, 20*time.Second, "the drain under way", func() bool { return u.Status().LastAckedSeq >= 200 })
	p.Stall()
	stalled := time.Now()
	waitFor(t, 10*time.Second, "the stall detected", func() bool { return u.Status().State != StateConnected })
	t.Logf("stall with publishes in flight detected after %v (keepalive 1s)", time.Since(stalled).Round(time.Millisecond))
	if st := u.Status(); st.LastAckedSeq >= events {
		t.Fatalf("everything was delivered before the stall; the test proves nothing")
	}
	// The kernel would give up on the dead connection after its
	// retransmission timeout; cut it so its held bytes cannot arrive late.
	p.Cut()
	p.Restore()
	waitFor(t, 60*time.Second, "every event at the cloud", func() bool {
		seqs, _ := c.events(eventsTopic)
		return len(seqs) > 0 && seqs[len(seqs)-1] == events
	})
	seqs, _ := c.events(eventsTopic)
	repeats := checkOrder(t, seqs, events, 1)
	t.Logf("%d events, %d resent after the stall", events, repeats)

	// An idle link that stalls is detected by the keepalive alone.
	waitFor(t, 5*time.Second, "outbox empty", func() bool { return s.outbox.Len() == 0 })
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })
	p.Stall()
	stalled = time.Now()
	waitFor(t, 10*time.Second, "the idle stall detected", func() bool { return u.Status().State != StateConnected })
	t.Logf("idle stall detected after %v", time.Since(stalled).Round(time.Millisecond))
	p.Cut()
	p.Restore()
	s.outbox.Append(1, 1)
	waitFor(t, 10*time.Second, "an event after the stall", func() bool {
		seqs, _ := c.events(eventsTopic)
		return seqs[len(seqs)-1] == events+1
	})
}

// TestFlapping: the link is cut and restored every 0.5–3 s while events
// and state changes flow; nothing is lost and order is kept.
func TestFlapping(t *testing.T) {
	period := 60 * time.Second
	if testing.Short() {
		period = 10 * time.Second
	}
	m := startMosquitto(t, "")
	p := newProxy(t, m.addr)
	c := newCloud(t, m.addr, "stations/st-1/up/#")
	s := newStation()
	u, err := New(s.config(t, "tcp://"+p.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)

	ctx, cancel := context.WithTimeout(context.Background(), period)
	defer cancel()
	produced := make(chan uint64)
	go func() { // about 1000 events/s and 250 state changes/s
		var n uint64
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				produced <- n
				return
			case <-tick.C:
				s.outbox.Append(20, 5)
				n += 20
				for d := range 5 {
					s.states.Set(edged.DeviceState{DeviceID: fmt.Sprintf("dev-%02d", d), Telemetry: map[string]any{"n": float64(n)}})
				}
			}
		}
	}()
	cuts := 0
	for ctx.Err() == nil {
		sleep(ctx, time.Duration(500+rand.IntN(2500))*time.Millisecond)
		p.Cut()
		cuts++
		sleep(ctx, time.Duration(500+rand.IntN(2500))*time.Millisecond)
		p.Restore()
	}
	p.Restore()
	total := <-produced
	waitFor(t, 60*time.Second, "every event at the cloud", func() bool {
		seqs, _ := c.events(eventsTopic)
		return len(seqs) > 0 && seqs[len(seqs)-1] == total
	})
	seqs, _ := c.events(eventsTopic)
	repeats := checkOrder(t, seqs, total, p.Accepts())
	st := u.Status()
	t.Logf("%v of flapping: %d cuts, %d connections, %d events, %d resent", period, cuts, st.Reconnects+1, total, repeats)
	if st.Reconnects < 2 {
		t.Errorf("only %d reconnects: the link did not flap", st.Reconnects)
	}
	// The last state published for each device is its final state.
	waitFor(t, 10*time.Second, "final device states", func() bool {
		final := s.states.DeviceStates()
		last := map[string]edged.DeviceState{}
		for _, msg := range c.messages() {
			if id, ok := strings.CutPrefix(msg.topic, deviceTopic); ok {
				var st edged.DeviceState
				json.Unmarshal(msg.payload, &st)
				last[id] = st
			}
		}
		for _, f := range final {
			if !last[f.DeviceID].UpdatedAt.Equal(f.UpdatedAt) {
				return false
			}
		}
		return true
	})
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// TestRenterTopic: a rented device's state also goes to its renter, not
// retained; when the rental ends the renter gets the final state once.
func TestRenterTopic(t *testing.T) {
	m := startMosquitto(t, "")
	c := newCloud(t, m.addr, "renters/#")
	s := newStation()
	s.states.Set(edged.DeviceState{DeviceID: "chair-1"})
	s.states.Set(edged.DeviceState{DeviceID: "chair-2"})
	cfg := s.config(t, "tcp://"+m.addr)
	cfg.RenterTopic = "renters/{renter_id}/devices/{device_id}"
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })

	rental := &edged.DeviceRental{RentalID: "r1", RenterID: "alice", StartedAt: time.Now(), EndsAt: time.Now().Add(time.Hour)}
	s.states.Set(edged.DeviceState{DeviceID: "chair-1", Status: edged.StatusInUse, Rental: rental})
	waitFor(t, 5*time.Second, "state to the renter", func() bool { return len(c.messages()) == 1 })
	s.states.Set(edged.DeviceState{DeviceID: "chair-1", Status: edged.StatusIdle})
	waitFor(t, 5*time.Second, "final state to the renter", func() bool { return len(c.messages()) == 2 })
	time.Sleep(200 * time.Millisecond)
	msgs := c.messages()
	if len(msgs) != 2 {
		t.Fatalf("got %d renter messages, want 2", len(msgs))
	}
	for i, msg := range msgs {
		if msg.topic != "renters/alice/devices/chair-1" || msg.retained {
			t.Errorf("message %d: topic %s retained %v", i, msg.topic, msg.retained)
		}
	}
	var last edged.DeviceState
	json.Unmarshal(msgs[1].payload, &last)
	if last.Rental != nil || last.Status != edged.StatusIdle {
		t.Errorf("final renter state: got rental %v status %s", last.Rental, last.Status)
	}
}

// TestRunCleansUp: after Run returns, neither the uplink's goroutines nor
// paho's for any of its connections are left behind.
func TestRunCleansUp(t *testing.T) {
	m := startMosquitto(t, "")
	p := newProxy(t, m.addr)
	before := runtime.NumGoroutine()
	s := newStation()
	s.states.Set(edged.DeviceState{DeviceID: "chair-1"})
	u, err := New(s.config(t, "tcp://"+p.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	stop := runUplink(t, u)
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })
	s.outbox.Append(100, 1)
	p.Cut()
	waitFor(t, 5*time.Second, "the cut noticed", func() bool { return u.Status().State != StateConnected })
	p.Restore()
	waitFor(t, 5*time.Second, "reconnected", func() bool { return u.Status().State == StateConnected })
	waitFor(t, 5*time.Second, "drained", func() bool { return s.outbox.Len() == 0 })
	stop()
	waitFor(t, 5*time.Second, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}
