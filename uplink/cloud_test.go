package uplink

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/cloudemu"
	"github.com/stationedge/edged/internal/faultproxy"
	"github.com/stationedge/edged/store"
)

// Tests against the cloud emulators (internal/cloudemu): each enforces its
// cloud's rules and counts every rule a client breaks.

const (
	emuPK, emuDN, emuSecret = "a1pk", "st01", "emu-secret-1"
	aliyunUp                = "/" + emuPK + "/" + emuDN + "/user/"
)

// startCloud runs an emulator of profile in dir (kept across restarts).
func startCloud(t *testing.T, profile, dir, addr string, o cloudemu.Options) *cloudemu.Cloud {
	t.Helper()
	o.Profile, o.Dir, o.Addr = cloudemu.Profile(profile), dir, addr
	if profile == edged.ProfileAliyun {
		o.ProductKey, o.DeviceName, o.DeviceSecret = emuPK, emuDN, emuSecret
	}
	c, err := cloudemu.Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// cloudConfig is the uplink configuration for an emulator: the profile,
// its credentials and a keepalive the profile accepts.
func cloudConfig(t *testing.T, s *station, c *cloudemu.Cloud, profile, url string) Config {
	cfg := s.config(t, url)
	cfg.Profile = profile
	// These tests count connections and refusals: a keepalive that a loaded
	// machine cannot miss, rather than the package's usual 1 s.
	cfg.KeepAlive = 5 * time.Second
	switch profile {
	case edged.ProfileAWS:
		cfg.KeepAlive = 30 * time.Second
		cfg.ClientID = "st01"
		cfg.CAFile, cfg.CertFile, cfg.KeyFile = c.CAFile(), c.ClientCertFile(), c.ClientKeyFile()
	case edged.ProfileAliyun:
		cfg.KeepAlive = 30 * time.Second
		cfg.CAFile = c.CAFile()
		cfg.Aliyun = edged.AliyunConfig{ProductKey: emuPK, DeviceName: emuDN, DeviceSecret: emuSecret}
	}
	return cfg
}

// upTopics are a profile's up topics in the tests.
func upTopics(profile string) (events, gateway, devices string) {
	if profile == edged.ProfileAliyun {
		return aliyunUp + "events", aliyunUp + "gateway", aliyunUp + "devices"
	}
	return eventsTopic, "stations/st-1/gateway", "stations/st-1/up/devices/"
}

// recorder keeps what the station published on the cloud.
type recorder struct {
	mu   sync.Mutex
	msgs []cloudMsg
	at   []time.Time // arrival of each of msgs
}

func record(t *testing.T, c *cloudemu.Cloud, filter string) *recorder {
	t.Helper()
	r := &recorder{}
	if err := c.Subscribe(filter, func(topic string, payload []byte) {
		r.mu.Lock()
		r.msgs = append(r.msgs, cloudMsg{topic: topic, payload: payload})
		r.at = append(r.at, time.Now())
		r.mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *recorder) messages(topic string) []cloudMsg {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []cloudMsg
	for _, m := range r.msgs {
		if topic == "" || m.topic == topic || (strings.HasSuffix(topic, "/") && strings.HasPrefix(m.topic, topic)) {
			out = append(out, m)
		}
	}
	return out
}

// eventSeqs flattens the events messages on topic into seqs in arrival
// order, checking each message's form: a batch {"station","events"} of at
// most batch envelopes in seq order, or (batch 1) a bare envelope.
func (r *recorder) eventSeqs(t *testing.T, topic string, batch, maxBytes int) (seqs []uint64, types map[uint64]string) {
	t.Helper()
	types = map[uint64]string{}
	for _, m := range r.messages(topic) {
		if len(m.payload) > maxBytes {
			t.Fatalf("message of %d bytes, over %d", len(m.payload), maxBytes)
		}
		var envs []edged.Event
		if batch > 1 {
			var b struct {
				Station string        `json:"station"`
				Events  []edged.Event `json:"events"`
			}
			if err := json.Unmarshal(m.payload, &b); err != nil || b.Station != "st-1" || len(b.Events) == 0 || len(b.Events) > batch {
				t.Fatalf("not a batch of 1..%d: %.200s (%v)", batch, m.payload, err)
			}
			envs = b.Events
		} else {
			var e edged.Event
			if err := json.Unmarshal(m.payload, &e); err != nil || e.Seq == 0 {
				t.Fatalf("not an envelope: %.200s", m.payload)
			}
			envs = []edged.Event{e}
		}
		for i, e := range envs {
			if i > 0 && e.Seq <= envs[i-1].Seq {
				t.Fatalf("batch out of order: %d after %d", e.Seq, envs[i-1].Seq)
			}
			seqs = append(seqs, e.Seq)
			types[e.Seq] = string(e.Type)
		}
	}
	return seqs, types
}

// highest is the highest seq received in order from 1 with no gap.
func highest(seqs []uint64) uint64 {
	var high uint64
	for _, s := range seqs {
		if s == high+1 {
			high = s
		}
	}
	return high
}

// fillStore commits n device events to the store, some rental results
// among them, as the station does while the cloud is away.
func fillStore(t *testing.T, db *store.DB, n int) {
	t.Helper()
	ctx := context.Background()
	for i := 0; i < n; i += 100 {
		var evs []edged.Event
		for j := i; j < min(i+100, n); j++ {
			e := edged.Event{Station: "st-1", TS: time.Now(), ClockSynced: true, Type: edged.EventDeviceEvent,
				Data: json.RawMessage(fmt.Sprintf(`{"device_id":"dev-%02d","event":{"type":"tick","n":%d,"pad":%q}}`, j%20, j, strings.Repeat("x", 100)))}
			if j%50 == 0 {
				e.Type = edged.EventRentalResult
				e.Data = json.RawMessage(fmt.Sprintf(`{"rental_id":"r%d","device_id":"dev-01","op":"grant","ok":true}`, j))
			}
			evs = append(evs, e)
		}
		if _, err := db.Commit(ctx, edged.Change{Events: evs}); err != nil {
			t.Fatal(err)
		}
	}
}

func openStore(t *testing.T, path string) *store.DB {
	t.Helper()
	db, err := store.Open(path, store.Options{OutboxMaxBytes: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	return db
}

func noViolations(t *testing.T, c *cloudemu.Cloud) {
	t.Helper()
	if v := c.Violations(); len(v) > 0 {
		t.Errorf("cloud rules broken: %v", v)
	}
}

// TestAliyunRental: a signed aliyun connect is accepted; a grant and a
// renter command on the aliyun down topics reach the station; the result
// goes up as a batch on the events topic; states and presence on aliyun's
// topics, nothing retained; and no rule is broken.
func TestAliyunRental(t *testing.T) {
	c := startCloud(t, edged.ProfileAliyun, t.TempDir(), "", cloudemu.Options{})
	rec := record(t, c, "/"+emuPK+"/"+emuDN+"/user/#")
	s := newStation()
	s.states.Set(edged.DeviceState{DeviceID: "chair-1"})
	cfg := cloudConfig(t, s, c, edged.ProfileAliyun, c.URL())
	cfg.RenterTopic = "renters/{renter_id}" // ignored on aliyun
	logs := &lockedBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 10*time.Second, "connected", func() bool { return u.Status().State == StateConnected })
	waitFor(t, 10*time.Second, "presence and state", func() bool {
		return len(rec.messages(aliyunUp+"gateway")) == 1 && len(rec.messages(aliyunUp+"devices")) == 1
	})
	if ids := c.ClientIDs(); len(ids) != 1 || !strings.HasPrefix(ids[0], emuPK+"."+emuDN+"|securemode=2,signmethod=hmacsha256,timestamp=") {
		t.Errorf("client ids %q", ids)
	}

	grant := `{"op":"grant","rental_id":"r1","device_id":"chair-1","renter_id":"alice","duration_s":600}`
	if err := c.Publish(aliyunUp+"rentals", []byte(grant)); err != nil {
		t.Fatal(err)
	}
	if err := c.Publish(aliyunUp+"commands", []byte(`{"cmd_id":"c1","device_id":"chair-1","renter_id":"alice","action":"end"}`)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "grant and command stored", func() bool {
		r, cmds, _ := s.handler.snapshot()
		return len(r) == 1 && r[0] == grant && len(cmds) == 1
	})
	// The station answers: a result event and the rented state.
	s.outbox.Append(1, 1)
	s.states.Set(edged.DeviceState{DeviceID: "chair-1", Status: edged.StatusInUse,
		Rental: &edged.DeviceRental{RentalID: "r1", RenterID: "alice", StartedAt: time.Now(), EndsAt: time.Now().Add(10 * time.Minute)}})
	waitFor(t, 10*time.Second, "result and renter state", func() bool {
		return len(rec.messages(aliyunUp+"events")) == 1 && len(rec.messages(aliyunUp+"renter")) == 1 && s.outbox.Len() == 0
	})
	seqs, _ := rec.eventSeqs(t, aliyunUp+"events", 200, 256<<10)
	if len(seqs) != 1 || seqs[0] != 1 {
		t.Errorf("events %v", seqs)
	}
	var states struct {
		Station string              `json:"station"`
		Devices []edged.DeviceState `json:"devices"`
	}
	msgs := rec.messages(aliyunUp + "devices")
	if err := json.Unmarshal(msgs[len(msgs)-1].payload, &states); err != nil || states.Station != "st-1" || len(states.Devices) != 1 || states.Devices[0].Rental == nil {
		t.Errorf("state batch %s (%v)", msgs[len(msgs)-1].payload, err)
	}
	var renter edged.DeviceState
	json.Unmarshal(rec.messages(aliyunUp + "renter")[0].payload, &renter)
	if renter.DeviceID != "chair-1" || renter.Rental == nil || renter.Rental.RenterID != "alice" {
		t.Errorf("renter state %+v", renter)
	}
	// The rental ends: the final state goes to the renter topic once.
	s.states.Set(edged.DeviceState{DeviceID: "chair-1", Status: edged.StatusIdle})
	waitFor(t, 10*time.Second, "final renter state", func() bool { return len(rec.messages(aliyunUp+"renter")) == 2 })
	var final edged.DeviceState
	json.Unmarshal(rec.messages(aliyunUp + "renter")[1].payload, &final)
	if final.DeviceID != "chair-1" || final.Rental != nil {
		t.Errorf("final renter state %+v", final)
	}
	if _, ok := c.Retained(aliyunUp + "gateway"); ok {
		t.Error("aliyun holds a retained message")
	}
	noViolations(t, c)
	st := u.Status()
	js, _ := json.Marshal(st)
	if strings.Contains(logs.String()+string(js)+fmt.Sprintf("%+v", cfg), emuSecret) {
		t.Error("the device secret shows in the logs, the status or the printed config")
	}
	if !strings.Contains(logs.String(), "uplink connected") {
		t.Error("logs not captured")
	}
	if st.Profile != "aliyun" || st.Identity != emuPK+"/"+emuDN || st.EventsSent != 1 || st.Batches != 1 || st.Refused != 0 || st.MessagesSent < 4 {
		t.Errorf("status %+v", st)
	}
}

// TestCloudBacklog: 3,000 events queued in the real store while the
// uplink is stopped are drained through each cloud's rules in seq order,
// with no gap, no rule broken, in batches.
func TestCloudBacklog(t *testing.T) {
	for _, profile := range []string{edged.ProfileAWS, edged.ProfileAliyun, edged.ProfileGeneric} {
		t.Run(profile, func(t *testing.T) {
			const n = 3000
			c := startCloud(t, profile, t.TempDir(), "", cloudemu.Options{})
			events, _, _ := upTopics(profile)
			rec := record(t, c, events)
			db := openStore(t, filepath.Join(t.TempDir(), "edged.db"))
			defer db.Close()
			fillStore(t, db, n)
			s := newStation()
			for i := 0; i < 20; i++ {
				s.states.Set(edged.DeviceState{DeviceID: fmt.Sprintf("dev-%02d", i)})
			}
			cfg := cloudConfig(t, s, c, profile, c.URL())
			cfg.Outbox = db
			cfg.Window = 256
			u, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			runUplink(t, u)
			waitFor(t, 60*time.Second, "backlog drained", func() bool {
				seqs, _ := rec.eventSeqs(t, events, u.batch, u.maxBytes)
				return highest(seqs) == n
			})
			took := time.Since(start)
			seqs, types := rec.eventSeqs(t, events, u.batch, u.maxBytes)
			checkOrder(t, seqs, n, 0)
			if types[1] != string(edged.EventRentalResult) {
				t.Errorf("seq 1 is %s", types[1])
			}
			waitFor(t, 10*time.Second, "outbox released", func() bool { return db.OutboxStats(time.Now()).Events == 0 })
			noViolations(t, c)
			st := u.Status()
			if st.EventsSent < n || st.Refused != 0 || st.Connects != 1 {
				t.Errorf("status %+v", st)
			}
			if u.batch > 1 && st.Batches == 0 {
				t.Errorf("no batches counted: %+v", st)
			}
			t.Logf("%s: %d events drained in %v: %d messages (%d batches), %d pacing waits, rate limit %d/s",
				profile, n, took.Round(time.Millisecond), st.MessagesSent, st.Batches, st.PacingWaits, cfg.Effective().MaxPublishRate)
		})
	}
}

// TestCloudPacing: with small batches the drain needs many messages; the
// pacer and the in-flight bound keep them under the cloud's rate even as
// the race detector slows the writer, and the waits are counted.
func TestCloudPacing(t *testing.T) {
	const n = 1500
	c := startCloud(t, edged.ProfileAWS, t.TempDir(), "", cloudemu.Options{MaxPublishRate: 40})
	rec := record(t, c, eventsTopic)
	s := newStation()
	s.outbox.Append(n, 10)
	cfg := cloudConfig(t, s, c, edged.ProfileAWS, c.URL())
	// 36/s and 36/9 = 4 in flight: at most 40 arrivals in any second.
	cfg.BatchEvents, cfg.MaxPublishRate = 10, 36
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 60*time.Second, "drained", func() bool {
		seqs, _ := rec.eventSeqs(t, eventsTopic, 10, 128<<10)
		return highest(seqs) == n
	})
	seqs, _ := rec.eventSeqs(t, eventsTopic, 10, 128<<10)
	checkOrder(t, seqs, n, 0)
	noViolations(t, c)
	st := u.Status()
	if st.PacingWaits == 0 || st.Batches < n/10 {
		t.Errorf("status %+v", st)
	}
	if peak := c.Stats().PeakRate; peak > 40 {
		t.Errorf("peak rate %d/s, over the cloud's 40", peak)
	}
}

// TestCloudRestart: an uplink stopped mid-drain and a new one on the same
// store resume without loss, for aws and aliyun.
func TestCloudRestart(t *testing.T) {
	for _, profile := range []string{edged.ProfileAWS, edged.ProfileAliyun} {
		t.Run(profile, func(t *testing.T) {
			const n = 3000
			c := startCloud(t, profile, t.TempDir(), "", cloudemu.Options{})
			events, _, _ := upTopics(profile)
			rec := record(t, c, events)
			path := filepath.Join(t.TempDir(), "edged.db")
			db := openStore(t, path)
			defer db.Close()
			fillStore(t, db, n)
			s := newStation()
			cfg := cloudConfig(t, s, c, profile, c.URL())
			cfg.Outbox = db
			cfg.BatchEvents = 20 // a drain of some seconds, to stop in the middle
			u, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			stop := runUplink(t, u)
			waitFor(t, 60*time.Second, "part drained", func() bool {
				seqs, _ := rec.eventSeqs(t, events, 20, 256<<10)
				return highest(seqs) >= 500
			})
			stop()
			before, _ := rec.eventSeqs(t, events, 20, 256<<10)
			if highest(before) == n {
				t.Fatal("drained before the restart; the test shows nothing")
			}
			u2, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			runUplink(t, u2)
			waitFor(t, 60*time.Second, "drained after restart", func() bool {
				seqs, _ := rec.eventSeqs(t, events, 20, 256<<10)
				return highest(seqs) == n
			})
			seqs, _ := rec.eventSeqs(t, events, 20, 256<<10)
			repeats := checkOrder(t, seqs, n, 1)
			if repeats > cfg.Window*20 {
				t.Errorf("%d events repeated, more than the window of %d messages", repeats, cfg.Window)
			}
			noViolations(t, c)
			t.Logf("%s: stopped at seq %d, %d events repeated after the restart", profile, highest(before), repeats)
		})
	}
}

// TestAliyunReconnect: aliyun keeps no retained state, so after a
// reconnect every device's state arrives again, before the backlog; a
// clean stop says {"online": false}.
func TestAliyunReconnect(t *testing.T) {
	dir := t.TempDir()
	c := startCloud(t, edged.ProfileAliyun, dir, "", cloudemu.Options{})
	addr := strings.TrimPrefix(c.URL(), "tls://")
	rec := record(t, c, "/"+emuPK+"/"+emuDN+"/user/#")
	s := newStation()
	const devices = 30
	for i := 0; i < devices; i++ {
		s.states.Set(edged.DeviceState{DeviceID: fmt.Sprintf("dev-%02d", i)})
	}
	cfg := cloudConfig(t, s, c, edged.ProfileAliyun, c.URL())
	cfg.BatchEvents = 8 // states go in batches of 8
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := runUplink(t, u)
	seen := func(r *recorder) map[string]int {
		got := map[string]int{}
		for _, m := range r.messages(aliyunUp + "devices") {
			var b struct {
				Devices []edged.DeviceState `json:"devices"`
			}
			if err := json.Unmarshal(m.payload, &b); err != nil || len(b.Devices) == 0 || len(b.Devices) > 8 {
				t.Fatalf("state batch %s", m.payload)
			}
			once := map[string]bool{}
			for _, d := range b.Devices {
				if once[d.DeviceID] {
					t.Fatalf("device %s twice in one message", d.DeviceID)
				}
				once[d.DeviceID] = true
				got[d.DeviceID]++
			}
		}
		return got
	}
	waitFor(t, 10*time.Second, "every state", func() bool { return len(seen(rec)) == devices })

	// The cloud goes away and comes back on the same address; meanwhile
	// events queue.
	c.Close()
	waitFor(t, 10*time.Second, "disconnected", func() bool { return u.Status().State != StateConnected })
	s.outbox.Append(50, 5)
	c2 := startCloud(t, edged.ProfileAliyun, dir, addr, cloudemu.Options{})
	rec2 := record(t, c2, "/"+emuPK+"/"+emuDN+"/user/#")
	waitFor(t, 20*time.Second, "every state again and the backlog", func() bool {
		return len(seen(rec2)) == devices && s.outbox.Len() == 0
	})
	// Presence, then every state, then the backlog.
	all := rec2.messages("")
	if all[0].topic != aliyunUp+"gateway" || !strings.Contains(string(all[0].payload), `"online":true`) {
		t.Errorf("first message after reconnect: %s %s", all[0].topic, all[0].payload)
	}
	statesDone := false
	n := 0
	for _, m := range all[1:] {
		if m.topic == aliyunUp+"devices" && !statesDone {
			var b struct {
				Devices []edged.DeviceState `json:"devices"`
			}
			json.Unmarshal(m.payload, &b)
			n += len(b.Devices)
			statesDone = n >= devices
		}
		if m.topic == aliyunUp+"events" && !statesDone {
			t.Errorf("events sent before every device's state (%d of %d)", n, devices)
			break
		}
	}
	stop()
	waitFor(t, 5*time.Second, "offline on clean stop", func() bool {
		msgs := rec2.messages(aliyunUp + "gateway")
		return len(msgs) >= 2 && string(msgs[len(msgs)-1].payload) == `{"online":false}`
	})
	noViolations(t, c2)
}

// TestAWSWill: on aws the gateway's presence is retained and the will,
// also retained, reads {"online": false} after the link is lost without a
// DISCONNECT (what a SIGKILL or a power cut does).
func TestAWSWill(t *testing.T) {
	c := startCloud(t, edged.ProfileAWS, t.TempDir(), "", cloudemu.Options{})
	p, err := faultproxy.New(strings.TrimPrefix(c.URL(), "tls://"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	s := newStation()
	s.states.Set(edged.DeviceState{DeviceID: "chair-1"})
	cfg := cloudConfig(t, s, c, edged.ProfileAWS, "tls://"+p.Addr())
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	gateway := "stations/st-1/gateway"
	waitFor(t, 10*time.Second, "retained presence and state", func() bool {
		g, ok := c.Retained(gateway)
		_, sok := c.Retained("stations/st-1/up/devices/chair-1")
		return ok && strings.Contains(string(g), `"online":true`) && sok
	})
	p.Cut()
	waitFor(t, 10*time.Second, "retained will", func() bool {
		g, _ := c.Retained(gateway)
		return string(g) == `{"online":false}`
	})
	noViolations(t, c)
}

// TestOversizeAndRefusedEvents: an event larger than max_message_kb on its
// own is never sent; one the cloud refuses anyway (its limit lower than
// edged was told) is singled out by halving the batch and given up after
// refuseAfter connections; both are counted and every other event
// arrives in order.
func TestOversizeAndRefusedEvents(t *testing.T) {
	c := startCloud(t, edged.ProfileGeneric, t.TempDir(), "", cloudemu.Options{MaxMessageBytes: 3000})
	rec := record(t, c, eventsTopic)
	s := newStation()
	s.outbox.Append(30, 3)
	big := func(pad int) {
		s.outbox.mu.Lock()
		seq := s.outbox.nextSeq
		s.outbox.nextSeq++
		s.outbox.events = append(s.outbox.events, edged.Event{Seq: seq, Station: "st-1", Type: edged.EventDeviceEvent,
			TS: time.Now(), Data: json.RawMessage(fmt.Sprintf(`{"device_id":"dev-01","event":{"pad":%q}}`, strings.Repeat("y", pad)))})
		s.outbox.mu.Unlock()
	}
	big(9000) // seq 31: over max_message_kb on its own
	s.outbox.Append(20, 3)
	big(5000) // seq 52: fits max_message_kb, but the cloud takes 3000 bytes at most
	s.outbox.Append(30, 3)
	cfg := cloudConfig(t, s, c, edged.ProfileGeneric, c.URL())
	cfg.BatchEvents, cfg.MaxMessageKB = 16, 8
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 60*time.Second, "drained", func() bool { return s.outbox.Len() == 0 })
	seqs, _ := rec.eventSeqs(t, eventsTopic, 16, 8<<10)
	got := map[uint64]bool{}
	for _, q := range seqs {
		got[q] = true
	}
	for q := uint64(1); q <= 82; q++ {
		if q == 31 || q == 52 {
			if got[q] {
				t.Errorf("seq %d arrived", q)
			}
			continue
		}
		if !got[q] {
			t.Errorf("seq %d missing", q)
		}
	}
	st := u.Status()
	t.Logf("status %+v, violations %v", st, c.Violations())
	if st.Refused != 2 {
		t.Errorf("refused = %d, want 2", st.Refused)
	}
	if v := c.Violations(); v[cloudemu.RuleSize] < refuseAfter || len(v) != 1 {
		t.Errorf("violations %v: want only size, at least %d times", v, refuseAfter)
	}
}

// lockedBuffer is a bytes.Buffer safe for a logger's concurrent writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
