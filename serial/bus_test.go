package serial

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/sim"
)

// fakeReporter records what the bus reports to the station.
type fakeReporter struct {
	mu     sync.Mutex
	online []onlineChange
	states map[string][]edged.StateReport
	acks   map[string][]edged.CommandAck
	// onState, when set, runs on every state report (outside the lock).
	onState func(id string, r edged.StateReport)
}

type onlineChange struct {
	id     string
	online bool
}

func newFakeReporter() *fakeReporter {
	return &fakeReporter{states: map[string][]edged.StateReport{}, acks: map[string][]edged.CommandAck{}}
}

func (f *fakeReporter) DeviceOnline(_ context.Context, id string, online bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.online = append(f.online, onlineChange{id, online})
	return nil
}

func (f *fakeReporter) DeviceState(_ context.Context, id string, r edged.StateReport) error {
	f.mu.Lock()
	f.states[id] = append(f.states[id], r)
	fn := f.onState
	f.mu.Unlock()
	if fn != nil {
		fn(id, r)
	}
	return nil
}

func (f *fakeReporter) DeviceAck(_ context.Context, id string, a edged.CommandAck) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.acks[id] = append(f.acks[id], a)
	return nil
}

func (f *fakeReporter) DeviceTelemetry(context.Context, string, map[string]any) error { return nil }
func (f *fakeReporter) DeviceLocation(context.Context, string, edged.Location) error  { return nil }
func (f *fakeReporter) DeviceEvent(context.Context, string, []byte) error             { return nil }

// last returns the latest state reported for id.
func (f *fakeReporter) last(id string) (edged.StateReport, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.states[id]
	if len(s) == 0 {
		return edged.StateReport{}, false
	}
	return s[len(s)-1], true
}

func (f *fakeReporter) ack(id, cmdID string) (edged.CommandAck, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range f.acks[id] {
		if a.CmdID == cmdID {
			return a, true
		}
	}
	return edged.CommandAck{}, false
}

// isOnline returns the latest online report for id, and whether any came.
func (f *fakeReporter) isOnline(id string) (online, known bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.online {
		if c.id == id {
			online, known = c.online, true
		}
	}
	return online, known
}

func (f *fakeReporter) onlineChanges() []onlineChange {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]onlineChange(nil), f.online...)
}

// waitFor polls cond every 5 ms for at most d.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: still waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testProfile is §5's charger-v1 with a signed temperature, a discrete
// door switch and a coil relay, so every read function is used, and a
// custom action with an argument.
var testProfile = edged.Profile{
	Status: &edged.StatusRegister{Table: "holding", Address: 0,
		Values: map[int]edged.Status{0: edged.StatusIdle, 1: edged.StatusInUse, 2: edged.StatusFault}},
	Telemetry: []edged.TelemetryRegister{
		{Name: "power_w", Table: "input", Address: 2},
		{Name: "temp_c", Table: "input", Address: 3, Scale: 0.1, Signed: true},
		{Name: "door_open", Table: "discrete", Address: 5},
		{Name: "relay", Table: "coil", Address: 1},
	},
	Commands: map[string]edged.CommandRegister{
		"start": {Table: "holding", Address: 16, Value: "{duration_s}"},
		"stop":  {Table: "holding", Address: 17, Value: "1"},
		"limit": {Table: "holding", Address: 18, Value: "{args.amps}"},
		"lamp":  {Table: "coil", Address: 1, Value: "1"},
	},
}

// unitState is what a test unit holds and what the bus must report.
type unitState struct {
	status uint16
	power  uint16
	temp   int16 // tenths of a degree
	door   bool
}

func (s unitState) want() edged.StateReport {
	r := edged.StateReport{Extra: map[string]any{
		"power_w": float64(s.power), "temp_c": roundScaled(float64(s.temp) * 0.1),
		"door_open": 0.0, "relay": 0.0,
	}}
	if s.door {
		r.Extra["door_open"] = 1.0
	}
	switch s.status {
	case 0:
		r.Status = edged.StatusIdle
	case 1:
		r.Status = edged.StatusInUse
	case 2:
		r.Status = edged.StatusFault
	default:
		r.Status, r.Fault = edged.StatusFault, fmt.Sprintf("status_%d", s.status)
	}
	return r
}

// stateOf is the distinct state of unit n in the tests.
func stateOf(n int) unitState {
	return unitState{status: uint16(n % 4), power: uint16(100 * n), temp: int16(-50 + 37*n), door: n%2 == 0}
}

func testUnit(s unitState) *sim.Unit {
	u := sim.Charger()
	u.Holding[0], u.Holding[18] = s.status, 0
	u.Input[2], u.Input[3] = s.power, uint16(s.temp)
	u.Discrete[5] = s.door
	u.Coils[1] = false
	return u
}

func devID(n int) string { return fmt.Sprintf("charger-%02d", n) }

type rig struct {
	bus *Bus
	sim *sim.Sim
	rep *fakeReporter
	// stop ends the bus's Run and waits for it: no request is in flight
	// after it returns.
	stop func()
}

type rigOptions struct {
	baud, units  int
	timeout      time.Duration
	pollInterval time.Duration
	tune         func(b *Bus)
	setup        func(s *sim.Sim)
}

// startRig starts a simulator with units 1..n and a bus polling them
// through tarm/serial on the pty. Everything stops at the test's end.
func startRig(t testing.TB, o rigOptions) *rig {
	t.Helper()
	if o.timeout == 0 {
		o.timeout = 200 * time.Millisecond
	}
	if o.pollInterval == 0 {
		o.pollInterval = 50 * time.Millisecond
	}
	s, err := sim.Start(sim.Options{Dir: t.TempDir(), Baud: o.baud, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	var devs []edged.Device
	for n := 1; n <= o.units; n++ {
		s.Add(byte(n), testUnit(stateOf(n)))
		devs = append(devs, edged.Device{ID: devID(n), Kind: "charger", Transport: edged.TransportSerial,
			Bus: "bus0", Unit: n, Profile: "charger-v1"})
	}
	if o.setup != nil {
		o.setup(s)
	}
	rep := newFakeReporter()
	level := slog.LevelWarn
	if testing.Verbose() {
		level = slog.LevelDebug
	}
	b, err := NewBus(Config{
		Bus: edged.Bus{Name: "bus0", Port: s.Path(), Baud: o.baud, DataBits: 8, Parity: "none", StopBits: 1,
			Timeout: o.timeout, PollInterval: o.pollInterval},
		Devices:  devs,
		Profiles: map[string]edged.Profile{"charger-v1": testProfile},
		Reporter: rep,
		Logger:   slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	})
	if err != nil {
		t.Fatal(err)
	}
	if o.tune != nil {
		o.tune(b)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Errorf("Run did not return within 5s of cancel")
			}
		})
	}
	t.Cleanup(stop)
	return &rig{bus: b, sim: s, rep: rep, stop: stop}
}

// TestEightDevices polls eight devices on one pty bus and checks that each
// one's status and telemetry arrive as its registers say, with no error
// on the clean bus. The timeout is generous: a reply the simulator writes
// late on a loaded machine is not a fault of the bus.
func TestEightDevices(t *testing.T) {
	for _, baud := range []int{9600, 115200} {
		t.Run(fmt.Sprint(baud), func(t *testing.T) {
			r := startRig(t, rigOptions{baud: baud, units: 8, timeout: 3 * time.Second})
			for n := 1; n <= 8; n++ {
				id := devID(n)
				waitFor(t, 10*time.Second, id+" state", func() bool { _, ok := r.rep.last(id); return ok })
				got, _ := r.rep.last(id)
				if diff := cmp.Diff(stateOf(n).want(), got); diff != "" {
					t.Errorf("%s state (-want +got):\n%s", id, diff)
				}
				if on, _ := r.rep.isOnline(id); !on {
					t.Errorf("%s not reported online", id)
				}
			}
			// A change in the registers reaches the station.
			r.sim.Update(3, func(u *sim.Unit) { u.Holding[0], u.Input[2] = 7, 4321 })
			want := stateOf(3)
			want.status, want.power = 7, 4321
			waitFor(t, 10*time.Second, "changed state of unit 3", func() bool {
				got, _ := r.rep.last(devID(3))
				return cmp.Equal(got, want.want())
			})
			h := r.bus.Health()
			if h.Requests == 0 || h.Timeouts+h.CRCErrors+h.FrameErrors+h.Exceptions != 0 {
				t.Errorf("health on a clean bus: %+v", h.BusCounters)
			}
		})
	}
}

// TestRentalCommands shows the Commander side of a rental: Send start
// writes the duration into the charger's start register, the write's
// reply becomes an ack, the charger's new status is reported; stop
// likewise.
func TestRentalCommands(t *testing.T) {
	r := startRig(t, rigOptions{baud: 19200, units: 2})
	id := devID(1)
	r.sim.Update(1, func(u *sim.Unit) { u.Holding[0] = 0 })
	waitFor(t, 10*time.Second, "charger idle", func() bool {
		s, _ := r.rep.last(id)
		return s.Status == edged.StatusIdle
	})
	ctx := context.Background()
	start := edged.DeviceCommand{CmdID: "c-start", Action: edged.ActionStart, RentalID: "r1", RenterID: "u1", DurationS: 1800}
	if err := r.bus.Send(ctx, id, start); err != nil {
		t.Fatalf("Send start: %v", err)
	}
	waitFor(t, 10*time.Second, "start ack", func() bool { _, ok := r.rep.ack(id, "c-start"); return ok })
	if a, _ := r.rep.ack(id, "c-start"); !a.OK {
		t.Errorf("start ack = %+v, want ok", a)
	}
	if got := r.sim.Holding(1, 16); got != 1800 {
		t.Errorf("start register = %d, want 1800", got)
	}
	waitFor(t, 10*time.Second, "in_use reported", func() bool {
		s, _ := r.rep.last(id)
		return s.Status == edged.StatusInUse && s.Extra["power_w"] == 7200.0
	})
	if err := r.bus.Send(ctx, id, edged.DeviceCommand{CmdID: "c-stop", Action: edged.ActionStop}); err != nil {
		t.Fatalf("Send stop: %v", err)
	}
	waitFor(t, 10*time.Second, "stop ack", func() bool { _, ok := r.rep.ack(id, "c-stop"); return ok })
	if a, _ := r.rep.ack(id, "c-stop"); !a.OK {
		t.Errorf("stop ack = %+v, want ok", a)
	}
	waitFor(t, 10*time.Second, "idle reported", func() bool {
		s, _ := r.rep.last(id)
		return s.Status == edged.StatusIdle
	})
	want := []sim.Write{{Unit: 1, Table: sim.Holding, Addr: 16, Value: 1800}, {Unit: 1, Table: sim.Holding, Addr: 17, Value: 1}}
	if diff := cmp.Diff(want, r.sim.Writes()); diff != "" {
		t.Errorf("writes on the wire (-want +got):\n%s", diff)
	}
}

// TestUnrentedUseStopped: a device reporting in_use is stopped by the
// station the same way as an MQTT device: the station's stop goes through
// Send, and the charger goes back to idle.
func TestUnrentedUseStopped(t *testing.T) {
	var r *rig
	var once sync.Once
	stopped := make(chan error, 1)
	r = startRig(t, rigOptions{baud: 115200, units: 1, setup: func(s *sim.Sim) {
		s.Update(1, func(u *sim.Unit) { u.Holding[0] = 1 }) // in use, no rental
	}})
	// The station's rule, in miniature: in_use without a rental -> stop.
	r.rep.mu.Lock()
	r.rep.onState = func(id string, s edged.StateReport) {
		if s.Status == edged.StatusInUse {
			once.Do(func() {
				stopped <- r.bus.Send(context.Background(), id, edged.DeviceCommand{CmdID: "unrented", Action: edged.ActionStop})
			})
		}
	}
	r.rep.mu.Unlock()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Send stop from the reporter: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no in_use report")
	}
	waitFor(t, 10*time.Second, "idle after stop", func() bool {
		s, _ := r.rep.last(devID(1))
		return s.Status == edged.StatusIdle
	})
}

func TestCommandErrors(t *testing.T) {
	r := startRig(t, rigOptions{baud: 115200, units: 3, timeout: 100 * time.Millisecond, setup: func(s *sim.Sim) {
		s.Update(2, func(u *sim.Unit) { u.WriteException = 4 })
	}})
	ctx := context.Background()
	for n := 1; n <= 3; n++ {
		waitFor(t, 10*time.Second, "online", func() bool { on, _ := r.rep.isOnline(devID(n)); return on })
	}

	t.Run("sync", func(t *testing.T) {
		tests := []struct {
			name   string
			id     string
			cmd    edged.DeviceCommand
			code   string
			reason edged.Reason
		}{
			{"unsupported action", devID(1), edged.DeviceCommand{CmdID: "x", Action: "fly"}, edged.EINVALID, edged.ReasonUnsupported},
			{"unknown device", "nope", edged.DeviceCommand{CmdID: "x", Action: "stop"}, edged.ENOTFOUND, edged.ReasonUnknownDevice},
		}
		for _, tt := range tests {
			err := r.bus.Send(ctx, tt.id, tt.cmd)
			if edged.ErrorCode(err) != tt.code || edged.ErrorReason(err) != tt.reason {
				t.Errorf("%s: err = %v (%s, %s), want %s, %s", tt.name, err, edged.ErrorCode(err), edged.ErrorReason(err), tt.code, tt.reason)
			}
		}
	})

	t.Run("acks", func(t *testing.T) {
		tests := []struct {
			name string
			id   string
			cmd  edged.DeviceCommand
			want edged.CommandAck
		}{
			{"exception", devID(2), edged.DeviceCommand{CmdID: "a1", Action: "stop"},
				edged.CommandAck{CmdID: "a1", Error: "modbus exception 4 (server device failure)", Code: 4}},
			{"arg in range", devID(1), edged.DeviceCommand{CmdID: "a2", Action: "limit", Args: []byte(`{"amps": 16}`)},
				edged.CommandAck{CmdID: "a2", OK: true}},
			{"arg too big", devID(1), edged.DeviceCommand{CmdID: "a3", Action: "limit", Args: []byte(`{"amps": 70000}`)},
				edged.CommandAck{CmdID: "a3", Error: "value 70000 does not fit a 16-bit register"}},
			{"arg missing", devID(1), edged.DeviceCommand{CmdID: "a4", Action: "limit"},
				edged.CommandAck{CmdID: "a4", Error: "args.amps is missing (args is not an object)"}},
			{"coil", devID(3), edged.DeviceCommand{CmdID: "a5", Action: "lamp"}, edged.CommandAck{CmdID: "a5", OK: true}},
			{"duration clamped", devID(3), edged.DeviceCommand{CmdID: "a6", Action: "start", DurationS: 100000},
				edged.CommandAck{CmdID: "a6", OK: true}},
		}
		for _, tt := range tests {
			if err := r.bus.Send(ctx, tt.id, tt.cmd); err != nil {
				t.Errorf("%s: Send: %v", tt.name, err)
				continue
			}
			waitFor(t, 10*time.Second, tt.name+" ack", func() bool { _, ok := r.rep.ack(tt.id, tt.cmd.CmdID); return ok })
			got, _ := r.rep.ack(tt.id, tt.cmd.CmdID)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("%s: ack (-want +got):\n%s", tt.name, diff)
			}
		}
		if got := r.sim.Holding(1, 18); got != 16 {
			t.Errorf("limit register = %d, want 16", got)
		}
		if got := r.sim.Holding(3, 16); got != 65535 {
			t.Errorf("start register = %d, want 65535 (clamped)", got)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		// The device stops answering just as the command is queued:
		// it is not yet known offline, so the write is tried and times out.
		r.sim.Update(3, func(u *sim.Unit) { u.Dead = true })
		if err := r.bus.Send(ctx, devID(3), edged.DeviceCommand{CmdID: "t1", Action: "stop"}); err != nil {
			t.Fatalf("Send: %v", err)
		}
		waitFor(t, 10*time.Second, "timeout ack", func() bool { _, ok := r.rep.ack(devID(3), "t1"); return ok })
		if got, _ := r.rep.ack(devID(3), "t1"); got != (edged.CommandAck{CmdID: "t1", Error: "timeout"}) {
			t.Errorf("ack = %+v, want timeout", got)
		}
	})

	t.Run("offline", func(t *testing.T) {
		waitFor(t, 10*time.Second, "unit 3 offline", func() bool { on, known := r.rep.isOnline(devID(3)); return known && !on })
		err := r.bus.Send(ctx, devID(3), edged.DeviceCommand{CmdID: "o1", Action: "start", DurationS: 60})
		if edged.ErrorCode(err) != edged.EUNAVAILABLE || edged.ErrorReason(err) != edged.ReasonDeviceOffline {
			t.Errorf("Send to an offline device: %v, want unavailable/device_offline", err)
		}
	})
}

func TestNewBusRefuses(t *testing.T) {
	bc := edged.Bus{Name: "bus0", Port: "/dev/null", Baud: 9600}
	profiles := map[string]edged.Profile{"charger-v1": testProfile, "broken": {}}
	dev := func(id string, unit int, profile string) edged.Device {
		return edged.Device{ID: id, Transport: edged.TransportSerial, Bus: "bus0", Unit: unit, Profile: profile}
	}
	tests := []struct {
		name    string
		bus     edged.Bus
		devices []edged.Device
	}{
		{"no port", edged.Bus{Name: "bus0", Baud: 9600}, nil},
		{"broadcast unit", bc, []edged.Device{dev("a", 0, "charger-v1")}},
		{"unit 248", bc, []edged.Device{dev("a", 248, "charger-v1")}},
		{"unit twice", bc, []edged.Device{dev("a", 1, "charger-v1"), dev("b", 1, "charger-v1")}},
		{"no such profile", bc, []edged.Device{dev("a", 1, "charger-v2")}},
		{"broken profile", bc, []edged.Device{dev("a", 1, "broken")}},
		{"other bus", bc, []edged.Device{{ID: "a", Bus: "bus1", Unit: 1, Profile: "charger-v1"}}},
	}
	for _, tt := range tests {
		_, err := NewBus(Config{Bus: tt.bus, Devices: tt.devices, Profiles: profiles, Reporter: newFakeReporter()})
		if edged.ErrorCode(err) != edged.EINVALID {
			t.Errorf("%s: err = %v, want invalid", tt.name, err)
		}
	}
}

// TestOpenHook: Config.Open replaces tarm/serial, and is called again
// when the port is lost.
func TestOpenHook(t *testing.T) {
	s, err := sim.Start(sim.Options{Dir: t.TempDir(), Baud: 115200})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Add(1, testUnit(stateOf(1)))
	var mu sync.Mutex
	opens := 0
	rep := newFakeReporter()
	b, err := NewBus(Config{
		Bus:      edged.Bus{Name: "bus0", Port: s.Path(), Baud: 115200, Timeout: 100 * time.Millisecond, PollInterval: 20 * time.Millisecond},
		Devices:  []edged.Device{{ID: devID(1), Transport: edged.TransportSerial, Bus: "bus0", Unit: 1, Profile: "p"}},
		Profiles: map[string]edged.Profile{"p": testProfile},
		Reporter: rep,
		Open: func(bc edged.Bus) (Port, error) {
			mu.Lock()
			opens++
			mu.Unlock()
			return OpenTarm(bc)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	b.reopenMin = 10 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, 10*time.Second, "state", func() bool { _, ok := rep.last(devID(1)); return ok })
	s.Unplug()
	s.Replug()
	waitFor(t, 10*time.Second, "reopened through the hook", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return opens >= 2 && b.Health().PortOpen
	})
	if err := b.Run(ctx); err == nil {
		t.Error("a second Run on the same bus did not fail")
	}
}
