package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/devicesim"
	"github.com/stationedge/edged/internal/faultproxy"
	"github.com/stationedge/edged/serial/sim"
	"golang.org/x/crypto/bcrypt"
)

// demoOptions shape the simulated station.
type demoOptions struct {
	HTTP        string
	Chairs      int
	Chargers    int
	GrantEvery  time.Duration
	OutageEvery time.Duration
	OutageFor   time.Duration
	Seed        uint64
}

func parseDemoFlags(args []string, stderr io.Writer) (demoOptions, error) {
	o := demoOptions{}
	fs := flag.NewFlagSet("edged demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.HTTP, "http", "127.0.0.1:8080", "status page address (loopback)")
	fs.IntVar(&o.Chairs, "chairs", 12, "simulated MQTT chairs")
	fs.IntVar(&o.Chargers, "chargers", 4, "simulated RS-485 chargers")
	fs.DurationVar(&o.GrantEvery, "grant-every", 3*time.Second, "how often the stand-in cloud acts")
	fs.DurationVar(&o.OutageEvery, "outage-every", 3*time.Minute, "how often the uplink is cut")
	fs.DurationVar(&o.OutageFor, "outage-for", 30*time.Second, "how long each outage lasts")
	fs.Uint64Var(&o.Seed, "seed", uint64(time.Now().UnixNano()), "seed of the scripted cloud")
	err := fs.Parse(args)
	if err == nil && !edged.LoopbackAddr(o.HTTP) {
		err = errors.New("the demo serves its status page on loopback only")
	}
	if err == nil && (o.Chairs < 1 || o.Chairs > 200 || o.Chargers < 0 || o.Chargers > 32) {
		err = errors.New("chairs must be 1 to 200 and chargers 0 to 32")
	}
	return o, err
}

// demo is a running simulated station: edged itself, its devices, a
// stand-in cloud and the script that drives them.
type demo struct {
	opts    demoOptions
	out     io.Writer
	dir     string
	key     ed25519.PrivateKey
	main    *Main
	cloud   *mochi.Server
	cloudAt string
	proxy   *faultproxy.Proxy
	bus     *sim.Sim
	chairs  []*devicesim.Device
	// walkUp is the chair the scripted cloud never grants, kept for the
	// renter who relays a grant during an outage (relayOne).
	walkUp  string
	station string
	user    string
	pass    string

	mu      sync.Mutex
	rng     *mrand.Rand
	rentals map[string]demoRental // active, by device
	nextID  int
	outMu   sync.Mutex
}

type demoRental struct {
	ID, Renter string
	Duration   int
}

// runDemo runs a whole simulated station in one process, on loopback,
// until ctx ends.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	opts, err := parseDemoFlags(args, stderr)
	if err != nil {
		return err
	}
	d := &demo{opts: opts, out: stdout, station: "demo-mall", user: "tech",
		rng: mrand.New(mrand.NewPCG(opts.Seed, 1)), rentals: map[string]demoRental{}}
	defer d.close()
	if err := d.start(ctx, stderr); err != nil {
		return err
	}
	d.banner()
	var wg sync.WaitGroup
	for _, f := range []func(context.Context){d.cloudScript, d.outages, d.chairLife} {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx) }()
	}
	<-ctx.Done()
	wg.Wait()
	d.say("demo stopping")
	return nil
}

func (d *demo) say(format string, args ...any) {
	d.outMu.Lock()
	defer d.outMu.Unlock()
	fmt.Fprintf(d.out, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (d *demo) start(ctx context.Context, stderr io.Writer) error {
	var err error
	if d.dir, err = os.MkdirTemp("", "edged-demo-"); err != nil {
		return err
	}
	// The stand-in cloud: an MQTT broker behind a proxy that the script
	// cuts to simulate the station's internet going down.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	d.cloud = mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	_ = d.cloud.AddHook(new(auth.AllowHook), nil)
	if err := d.cloud.AddListener(listeners.NewNet("cloud", ln)); err != nil {
		return err
	}
	if err := d.cloud.Serve(); err != nil {
		return err
	}
	d.cloudAt = ln.Addr().String()
	if d.proxy, err = faultproxy.New(d.cloudAt); err != nil {
		return err
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	d.key = priv

	cfg := edged.DefaultConfig()
	cfg.Station = edged.StationConfig{ID: d.station, Name: "Demo mall, level 2", Location: &edged.Location{Lat: 48.1374, Lon: 11.5755}}
	cfg.DataDir = filepath.Join(d.dir, "data")
	cfg.Clock.AssumeSynced = true
	cfg.Uplink.URL = "tcp://" + d.proxy.Addr()
	cfg.Uplink.ReconnectMax = 5 * time.Second
	cfg.Uplink.KeepAlive = 5 * time.Second
	cfg.Uplink.RenterTopic = "renters/{renter_id}/devices/{device_id}"
	cfg.Rentals.VerifyKey = base64.StdEncoding.EncodeToString(pub)
	cfg.HTTP.Listen = d.opts.HTTP
	d.pass = randomHex(6)
	ph, err := bcrypt.GenerateFromPassword([]byte(d.pass), bcrypt.DefaultCost)
	if err != nil {
		return err
	}
	cfg.HTTP.Users = []edged.HTTPUser{{Name: d.user, PasswordHash: string(ph)}}

	secrets := map[string]string{}
	for i := 1; i <= d.opts.Chairs; i++ {
		id := fmt.Sprintf("chair-%02d", i)
		secrets[id] = randomHex(12)
		h, err := bcrypt.GenerateFromPassword([]byte(secrets[id]), bcrypt.MinCost)
		if err != nil {
			return err
		}
		loc := &edged.Location{Lat: 48.1374 + float64(i)*0.00001, Lon: 11.5755}
		cfg.Devices = append(cfg.Devices, edged.Device{ID: id, Kind: "chair", Transport: edged.TransportMQTT, SecretHash: string(h), Location: loc})
	}
	if d.opts.Chargers > 0 {
		if d.bus, err = sim.Start(sim.Options{Dir: d.dir, Baud: 19200, Seed: d.opts.Seed}); err != nil {
			return fmt.Errorf("serial simulator: %w", err)
		}
		cfg.Serial.Buses = []edged.Bus{{Name: "bus0", Port: d.bus.Path(), Baud: 19200, DataBits: 8, Parity: "none",
			StopBits: 1, Timeout: 300 * time.Millisecond, PollInterval: time.Second}}
		cfg.Profiles = map[string]edged.Profile{"charger-v1": {
			Status: &edged.StatusRegister{Table: "holding", Address: 0, Values: map[int]edged.Status{0: edged.StatusIdle, 1: edged.StatusInUse, 2: edged.StatusFault}},
			Telemetry: []edged.TelemetryRegister{
				{Name: "power_w", Table: "input", Address: 2},
				{Name: "temp_c", Table: "input", Address: 3, Scale: 0.1},
			},
			Commands: map[string]edged.CommandRegister{
				"start": {Table: "holding", Address: 16, Value: "{duration_s}"},
				"stop":  {Table: "holding", Address: 17, Value: "1"},
			},
		}}
		for i := 1; i <= d.opts.Chargers; i++ {
			d.bus.Add(byte(i), sim.Charger())
			cfg.Devices = append(cfg.Devices, edged.Device{ID: fmt.Sprintf("charger-%02d", i), Kind: "charger",
				Transport: edged.TransportSerial, Bus: "bus0", Unit: i, Profile: "charger-v1"})
		}
	}
	if err := cfg.Validate(nil); err != nil {
		return fmt.Errorf("demo config: %w", err)
	}

	local, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	d.main = NewMain(cfg, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	d.main.LocalListener = local
	if err := d.main.Run(ctx); err != nil {
		return err
	}
	for i := 1; i <= d.opts.Chairs; i++ {
		id := fmt.Sprintf("chair-%02d", i)
		c := &devicesim.Device{ID: id, Secret: secrets[id], Broker: "tcp://" + local.Addr().String()}
		if i == d.opts.Chairs && d.opts.Chairs > 2 {
			continue // one chair stays unplugged: the page shows it offline
		}
		if err := c.Connect(5 * time.Second); err != nil {
			return err
		}
		d.chairs = append(d.chairs, c)
	}
	d.walkUp = d.chairs[0].ID
	return nil
}

func (d *demo) banner() {
	d.outMu.Lock()
	defer d.outMu.Unlock()
	fmt.Fprintf(d.out, `
edged demo: station %q with %d chairs (MQTT) and %d chargers (RS-485), all simulated
  status page   http://%s/   user %q, password %q
  local broker  %s
  cloud broker  %s (stand-in; cut for %v every %v)
  data          %s (removed on exit)
Ctrl-C stops it.

`, d.station, d.opts.Chairs, d.opts.Chargers, d.main.httpAddr(), d.user, d.pass,
		d.main.Broker.Addr(), d.proxy.Addr(), d.opts.OutageFor, d.opts.OutageEvery, d.dir)
}

// cloudScript plays the cloud: signed grants, renter commands, extends and
// cancels, and a summary of what comes back.
func (d *demo) cloudScript(ctx context.Context) {
	// The script talks to the cloud broker itself, not through the proxy:
	// only the station's link goes down.
	addr := d.cloudAt
	o := mqtt.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("demo-cloud").
		SetProtocolVersion(4).SetAutoReconnect(true).SetConnectRetry(true)
	c := mqtt.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		d.say("cloud script: %v", tok.Error())
		return
	}
	defer c.Disconnect(100)
	root := "stations/" + d.station
	c.Subscribe(root+"/up/events", 1, func(_ mqtt.Client, m mqtt.Message) { d.onEvent(m.Payload()) })
	t := time.NewTicker(d.opts.GrantEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		topic, msg := d.nextAction()
		if msg == nil {
			continue
		}
		b, _ := json.Marshal(msg)
		c.Publish(topic, 1, false, b)
	}
}

// nextAction picks the cloud's next message.
func (d *demo) nextAction() (string, map[string]any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	root := "stations/" + d.station + "/down/"
	devices := d.main.Station.DeviceStates()
	var idle, rented []edged.DeviceState
	for _, s := range devices {
		if s.Rental != nil {
			rented = append(rented, s)
		} else if s.Online && s.Status == edged.StatusIdle && !s.Maintenance && s.DeviceID != d.walkUp {
			idle = append(idle, s)
		}
	}
	sort.Slice(idle, func(i, j int) bool { return idle[i].DeviceID < idle[j].DeviceID })
	roll := d.rng.IntN(20)
	switch {
	case len(rented) > 0 && roll == 0:
		r := rented[d.rng.IntN(len(rented))]
		return root + "rentals", d.signed(map[string]any{"op": "cancel", "rental_id": r.Rental.RentalID,
			"device_id": r.DeviceID, "renter_id": r.Rental.RenterID})
	case len(rented) > 0 && roll == 1:
		r := rented[d.rng.IntN(len(rented))]
		return root + "rentals", d.signed(map[string]any{"op": "extend", "rental_id": r.Rental.RentalID,
			"device_id": r.DeviceID, "renter_id": r.Rental.RenterID, "duration_s": 300 + d.rng.IntN(300)})
	case len(rented) > 0 && roll <= 5:
		r := rented[d.rng.IntN(len(rented))]
		d.nextID++
		action := []string{"massage_program", "heat", "intensity", "massage_program", "heat", "end"}[d.rng.IntN(6)]
		return root + "commands", map[string]any{"cmd_id": fmt.Sprintf("cmd-%d", d.nextID), "device_id": r.DeviceID,
			"renter_id": r.Rental.RenterID, "action": action, "args": map[string]any{"level": 1 + d.rng.IntN(5)}}
	case len(idle) > 0:
		s := idle[d.rng.IntN(len(idle))]
		d.nextID++
		return root + "rentals", d.signed(map[string]any{"op": "grant", "rental_id": fmt.Sprintf("rent-%d-%s", d.nextID, randomHex(3)),
			"device_id": s.DeviceID, "renter_id": fmt.Sprintf("user-%03d", d.rng.IntN(500)), "duration_s": 60 + d.rng.IntN(240)})
	}
	return "", nil
}

func (d *demo) signed(m map[string]any) map[string]any {
	rm := edged.RentalMessage{Op: m["op"].(string), RentalID: m["rental_id"].(string), DeviceID: m["device_id"].(string), RenterID: m["renter_id"].(string)}
	if v, ok := m["duration_s"].(int); ok {
		rm.DurationS = int64(v)
	}
	m["sig"] = edged.SignRental(d.key, d.station, rm)
	return m
}

func (d *demo) onEvent(payload []byte) {
	var e edged.Event
	if json.Unmarshal(payload, &e) != nil {
		return
	}
	var data map[string]any
	_ = json.Unmarshal(e.Data, &data)
	switch e.Type {
	case edged.EventRentalStarted:
		d.say("cloud got #%d rental.started   %v on %v for %v s", e.Seq, data["rental_id"], data["device_id"], data["duration_s"])
	case edged.EventRentalEnded:
		d.say("cloud got #%d rental.ended     %v on %v: %v after %v s", e.Seq, data["rental_id"], data["device_id"], data["reason"], data["used_s"])
	case edged.EventRentalResult, edged.EventCommandResult:
		if data["via"] == edged.ViaDevice {
			d.say("cloud got #%d rental.result    %v relayed by %v while offline: ok %v %v", e.Seq, data["rental_id"], data["device_id"], data["ok"], data["reason"])
		} else if data["ok"] == false {
			d.say("cloud got #%d %s refused: %v", e.Seq, e.Type, data["reason"])
		}
	case edged.EventUnrentedUse, edged.EventOutboxDropped:
		d.say("cloud got #%d %s %v", e.Seq, e.Type, data)
	}
}

// outages cuts the station's link to the cloud now and then, so the queue
// fills and drains on the status page.
func (d *demo) outages(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(d.opts.OutageEvery):
		}
		d.proxy.Cut()
		restore := time.After(d.opts.OutageFor)
		d.say("uplink cut for %v: events queue in the store, rentals keep running", d.opts.OutageFor)
		d.relayOne(ctx)
		select {
		case <-ctx.Done():
			return
		case <-restore:
		}
		d.proxy.Restore()
		st := d.main.Store.OutboxStats(time.Now())
		d.say("uplink restored: %d events queued, draining", st.Events)
	}
}

// relayOne plays a renter at an offline station (docs/relay.md): the cloud
// gave the phone a signed grant, the phone hands it to an idle chair, and
// the chair relays it to edged, which starts it and answers.
func (d *demo) relayOne(ctx context.Context) {
	var chair *devicesim.Device
	for _, c := range d.chairs { // the walk-up chair first
		s, err := d.main.Station.Device(c.ID)
		if err == nil && s.Online && s.Status == edged.StatusIdle && s.Rental == nil && !s.Maintenance && c.Status() == "idle" {
			chair = c
			break
		}
	}
	if chair == nil {
		d.say("no idle chair for a relayed rental this time")
		return
	}
	d.mu.Lock()
	d.nextID++
	id := fmt.Sprintf("relay-%d-%s", d.nextID, randomHex(3))
	renter := fmt.Sprintf("user-%03d", d.rng.IntN(500))
	dur := 60 + d.rng.IntN(120)
	d.mu.Unlock()
	// A grant meant for a phone carries a short not_after.
	m := map[string]any{"op": "grant", "rental_id": id, "device_id": chair.ID, "renter_id": renter, "duration_s": dur,
		"not_after": time.Now().Add(5 * time.Minute).UTC().Format(time.RFC3339)}
	rm := edged.RentalMessage{Op: "grant", RentalID: id, DeviceID: chair.ID, RenterID: renter, DurationS: int64(dur), NotAfter: m["not_after"].(string)}
	m["sig"] = edged.SignRental(d.key, d.station, rm)
	b, _ := json.Marshal(m)
	if err := chair.Relay(b); err != nil {
		d.say("relay through %s failed: %v", chair.ID, err)
		return
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && ctx.Err() == nil; time.Sleep(50 * time.Millisecond) {
		for _, c := range chair.Commands() {
			var a edged.RentalResultArgs
			if c.Action != edged.ActionRentalResult || json.Unmarshal(c.Args, &a) != nil || a.RentalID != id {
				continue
			}
			if a.OK {
				d.say("renter's phone relayed %s through %s while the cloud is cut: started for %d s", id, chair.ID, dur)
			} else {
				d.say("renter's phone relayed %s through %s while the cloud is cut: refused, %s", id, chair.ID, a.Reason)
			}
			return
		}
	}
	d.say("relayed %s through %s: no answer", id, chair.ID)
}

// chairLife makes the chairs report like real ones: telemetry, the odd
// event, a fault now and then that a technician clears.
func (d *demo) chairLife(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	faulted := ""
	for n := 0; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, c := range d.chairs {
			d.mu.Lock()
			temp := 30 + d.rng.Float64()*8
			d.mu.Unlock()
			_ = c.Publish("telemetry", map[string]any{"motor_temp_c": float64(int(temp*10)) / 10, "fw": "2.4.1"})
		}
		if n%6 == 3 && len(d.chairs) > 1 {
			c := d.chairs[n%len(d.chairs)]
			_ = c.Publish("events", map[string]any{"type": "door_opened"})
		}
		if n%24 == 10 && faulted == "" && len(d.chairs) > 2 {
			c := d.chairs[1]
			if c.Status() == "idle" {
				faulted = c.ID
				_ = c.Publish("state", map[string]any{"status": "fault", "fault": "E42_motor_overheat"})
				d.say("%s reports a fault", c.ID)
			}
		} else if n%24 == 20 && faulted != "" {
			_ = d.chairs[1].Publish("state", map[string]any{"status": "idle"})
			d.say("%s fault cleared", faulted)
			faulted = ""
		}
	}
}

func (d *demo) close() {
	for _, c := range d.chairs {
		c.Disconnect()
	}
	if d.main != nil {
		d.main.Close()
	}
	if d.bus != nil {
		d.bus.Close()
	}
	if d.proxy != nil {
		d.proxy.Close()
	}
	if d.cloud != nil {
		d.cloud.Close()
	}
	if d.dir != "" {
		os.RemoveAll(d.dir)
	}
}
