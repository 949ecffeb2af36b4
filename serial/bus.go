// Package serial connects RS-485 devices to edged: a Modbus RTU bus master
// on tarm/serial that polls each device's status and telemetry registers
// through its profile (§5 of the contract), carries out commands as
// register writes, and reports to the station through edged.DeviceReporter
// exactly as the local MQTT broker does, so a serial device is rented,
// stopped and shown like any other.
//
// One Bus owns one port. Its Run goroutine is the only one that touches
// the port: it polls the devices round robin at the bus's poll_interval,
// runs queued commands before the next poll, takes a device offline after
// three failed polls in a row and then polls it with backoff up to 30 s,
// and reopens a port that vanished with backoff while edged keeps running.
package serial

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/modbus"
)

// Config is what a Bus needs: the bus settings, its serial devices and the
// profiles they name, where to report, and how to open the port.
type Config struct {
	Bus      edged.Bus
	Devices  []edged.Device // the serial devices on this bus
	Profiles map[string]edged.Profile
	Reporter edged.DeviceReporter
	Logger   *slog.Logger
	// Open opens the port; nil means OpenTarm (tarm/serial). Tests and the
	// demo open a simulator's pty with it.
	Open func(edged.Bus) (Port, error)
}

// Bus behaviour fixed by the contract and by this package.
const (
	// OfflineAfter failed polls in a row take a device offline (§5).
	OfflineAfter = 3
	// MaxBackoff caps the poll interval of an offline device (§5).
	MaxBackoff = 30 * time.Second
	// PollRetries is how many times a poll request of an online device is
	// repeated after a timeout or a bad frame; offline and unknown devices
	// get one try, so a dead device costs one timeout per probe.
	PollRetries = 1
	// CommandRetries is how many times a command's write is repeated. A
	// repeated write of the same value has the same effect.
	CommandRetries = 2
	// ReportEvery is how often an unchanged state is reported again, so
	// the station's last_seen stays current.
	ReportEvery = 10 * time.Second
	// maxQueue bounds the commands waiting for the bus.
	maxQueue = 64
)

type onlineState int

const (
	stateUnknown onlineState = iota
	stateOnline
	stateOffline
)

func (s onlineState) String() string {
	return [...]string{"unknown", "online", "offline"}[s]
}

// Bus is the Modbus RTU master of one RS-485 port. It implements
// edged.Commander for its devices. Create it with NewBus and run it with
// Run; Send and Health are safe to call from any goroutine.
type Bus struct {
	cfg      Config
	log      *slog.Logger
	open     func(edged.Bus) (Port, error)
	devices  []*device
	byID     map[string]*device
	charTime time.Duration // one character on the wire
	silence  time.Duration // the 3.5-character gap between frames
	quiet    time.Duration // a silence that ends a reply

	// Timing knobs; tests shorten them before Run.
	maxBackoff  time.Duration
	reopenMin   time.Duration
	reopenMax   time.Duration
	reportEvery time.Duration

	running atomic.Bool
	wake    chan struct{}

	// applyMu serializes device list changes: devices.go.
	applyMu sync.Mutex

	mu       sync.Mutex // guards what follows, and devices and byID
	change   *listChange
	profiles map[string]edged.Profile
	queue    []*command
	portUp   bool
	health   edged.BusHealth
}

// device is one serial device. Fields above mu-guarded ones are owned by
// the Run goroutine.
type device struct {
	dev   edged.Device
	unit  byte
	plan  *plan
	reads []modbus.Request

	fails      int
	nextPoll   time.Time
	backoff    time.Duration
	lastStart  time.Time
	reported   bool
	lastStatus edged.Status
	lastFault  string
	lastTel    map[string]any
	lastReport time.Time

	// guarded by Bus.mu
	state  onlineState
	health edged.BusDeviceHealth
}

type command struct {
	d   *device
	cmd edged.DeviceCommand
	req modbus.Request
	err error // the template could not be filled in: ack false at once
}

// NewBus checks cfg and returns a bus ready to Run. Errors: EINVALID for a
// bus without a port or baud rate, a device not on this bus, a unit
// outside 1..247 or used twice, or a missing or broken profile.
func NewBus(cfg Config) (*Bus, error) {
	bad := func(format string, a ...any) error {
		return &edged.Error{Code: edged.EINVALID, Reason: edged.ReasonInvalid,
			Message: "serial bus " + cfg.Bus.Name + ": " + fmt.Sprintf(format, a...)}
	}
	bc := cfg.Bus
	if bc.Port == "" || bc.Baud <= 0 {
		return nil, bad("needs a port and a baud rate")
	}
	if cfg.Reporter == nil {
		return nil, bad("needs a reporter")
	}
	if bc.DataBits == 0 {
		bc.DataBits = 8
	}
	if bc.Parity == "" {
		bc.Parity = "none"
	}
	if bc.StopBits == 0 {
		bc.StopBits = 1
	}
	if bc.Timeout <= 0 {
		bc.Timeout = 300 * time.Millisecond
	}
	if bc.PollInterval <= 0 {
		bc.PollInterval = time.Second
	}
	cfg.Bus = bc
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &Bus{
		cfg:         cfg,
		log:         log.With("bus", bc.Name),
		open:        cfg.Open,
		byID:        map[string]*device{},
		maxBackoff:  MaxBackoff,
		reopenMin:   250 * time.Millisecond,
		reopenMax:   10 * time.Second,
		reportEvery: ReportEvery,
		wake:        make(chan struct{}, 1),
	}
	if b.open == nil {
		b.open = OpenTarm
	}
	b.charTime = CharTime(bc)
	b.silence = FrameGap(bc)
	// Ten characters, and 20 ms for USB adapters that hand over bytes in
	// batches (an FTDI chip's latency timer is 16 ms).
	b.quiet = 10*b.charTime + 20*time.Millisecond
	plans := map[string]*plan{}
	units := map[int]bool{}
	for _, d := range cfg.Devices {
		if d.Bus != "" && d.Bus != bc.Name {
			return nil, bad("device %s is on bus %q", d.ID, d.Bus)
		}
		if d.Unit < 1 || d.Unit > 247 {
			return nil, bad("device %s: unit %d is not in 1..247", d.ID, d.Unit)
		}
		if units[d.Unit] {
			return nil, bad("unit %d is used twice", d.Unit)
		}
		units[d.Unit] = true
		if b.byID[d.ID] != nil {
			return nil, bad("device %s appears twice", d.ID)
		}
		pl, ok := plans[d.Profile]
		if !ok {
			p, found := cfg.Profiles[d.Profile]
			if !found {
				return nil, bad("device %s: no profile named %q", d.ID, d.Profile)
			}
			var err error
			if pl, err = compile(p); err != nil {
				return nil, bad("profile %s: %v", d.Profile, err)
			}
			plans[d.Profile] = pl
		}
		dv := &device{dev: d, unit: byte(d.Unit), plan: pl}
		for _, r := range pl.reads {
			r.Unit = dv.unit
			dv.reads = append(dv.reads, r)
		}
		dv.health = edged.BusDeviceHealth{DeviceID: d.ID, Unit: d.Unit, State: stateUnknown.String()}
		b.devices = append(b.devices, dv)
		b.byID[d.ID] = dv
	}
	b.health = edged.BusHealth{Name: bc.Name, Port: bc.Port}
	return b, nil
}

// CharTime is how long one character takes on bus b's wire: a start bit,
// the data bits, the parity bit if any, and the stop bits.
func CharTime(b edged.Bus) time.Duration {
	return time.Duration(BitsPerChar(b)) * time.Second / time.Duration(b.Baud)
}

// BitsPerChar is the number of bits one byte takes on bus b's wire.
func BitsPerChar(b edged.Bus) int {
	bits := 1 + b.DataBits + b.StopBits
	if b.DataBits == 0 {
		bits += 8
	}
	if b.StopBits == 0 {
		bits++
	}
	if b.Parity == "even" || b.Parity == "odd" {
		bits++
	}
	return bits
}

// FrameGap is the silence that separates two frames: 3.5 characters, and
// a fixed 1.75 ms above 19200 baud (Modbus over Serial Line §2.5.1.1).
func FrameGap(b edged.Bus) time.Duration {
	if b.Baud > 19200 {
		return 1750 * time.Microsecond
	}
	return CharTime(b) * 7 / 2
}

// Send queues cmd for deviceID ahead of the polls and returns; the write's
// reply becomes Reporter.DeviceAck: OK, or OK false with "modbus exception
// N (name)" and Code N, or "timeout" when the device never answered. It
// implements edged.Commander. Errors, synchronous: ENOTFOUND
// (unknown_device) for a device not on this bus, EINVALID (unsupported)
// for an action its profile lacks, EUNAVAILABLE (device_offline) when the
// device is known offline or the port is not open, EUNAVAILABLE
// (device_busy) when too many commands wait.
func (b *Bus) Send(ctx context.Context, deviceID string, cmd edged.DeviceCommand) error {
	d := b.device(deviceID)
	if d == nil {
		return &edged.Error{Code: edged.ENOTFOUND, Reason: edged.ReasonUnknownDevice,
			Message: fmt.Sprintf("no device %q on serial bus %s", deviceID, b.cfg.Bus.Name)}
	}
	op, ok := d.plan.commands[cmd.Action]
	if !ok {
		return &edged.Error{Code: edged.EINVALID, Reason: edged.ReasonUnsupported,
			Message: fmt.Sprintf("device %s does not support action %q", deviceID, cmd.Action)}
	}
	c := &command{d: d, cmd: cmd}
	c.req, c.err = op.request(d.unit, cmd)
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case d.state == stateOffline:
		return &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonDeviceOffline,
			Message: fmt.Sprintf("device %s is offline", deviceID)}
	case !b.portUp:
		return &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonDeviceOffline,
			Message: fmt.Sprintf("serial port %s is not open", b.cfg.Bus.Port)}
	case len(b.queue) >= maxQueue:
		return &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonDeviceBusy,
			Message: fmt.Sprintf("serial bus %s has %d commands waiting", b.cfg.Bus.Name, len(b.queue))}
	}
	b.queue = append(b.queue, c)
	select {
	case b.wake <- struct{}{}:
	default:
	}
	return nil
}

// Run owns the port until ctx ends, then closes it and returns nil.
func (b *Bus) Run(ctx context.Context) error {
	if !b.running.CompareAndSwap(false, true) {
		return errors.New("serial: bus " + b.cfg.Bus.Name + " is already running")
	}
	defer b.running.Store(false)
	r := &runner{Bus: b, reopenDelay: b.reopenMin}
	defer r.closePort()
	now := time.Now()
	for i, d := range b.devices {
		// Spread the first polls over one interval.
		d.nextPoll = now.Add(b.cfg.Bus.PollInterval * time.Duration(i) / time.Duration(len(b.devices)))
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	next := 0 // round robin among devices due at the same time
	for ctx.Err() == nil {
		b.takeChange()
		now := time.Now()
		if r.port == nil && !now.Before(r.reopenAt) {
			r.openPort()
		}
		if c := b.popCommand(); c != nil {
			r.command(ctx, c)
			continue
		}
		var d *device
		di := 0
		for k := range b.devices {
			i := (next + k) % len(b.devices)
			if dv := b.devices[i]; d == nil || dv.nextPoll.Before(d.nextPoll) {
				d, di = dv, i
			}
		}
		wait := time.Hour
		if d != nil {
			wait = d.nextPoll.Sub(now)
		}
		if r.port == nil {
			wait = min(wait, r.reopenAt.Sub(now))
		}
		if wait > 0 {
			timer.Reset(wait)
			select {
			case <-ctx.Done():
			case <-b.wake:
			case <-timer.C:
			}
			timer.Stop()
			continue
		}
		next = di + 1
		r.poll(ctx, d)
	}
	return nil
}

func (b *Bus) popCommand() *command {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.queue) == 0 {
		return nil
	}
	c := b.queue[0]
	b.queue = b.queue[1:]
	return c
}

// runner is the state of one Run: the port and its reopening.
type runner struct {
	*Bus
	port        *reader
	reopenAt    time.Time
	reopenDelay time.Duration
	openFailed  bool
	lastIO      time.Time // when the wire last went quiet
}

func (r *runner) openPort() {
	p, err := r.open(r.cfg.Bus)
	if err != nil {
		if !r.openFailed {
			r.log.Warn("serial port unavailable, retrying with backoff", "port", r.cfg.Bus.Port, "err", err)
		}
		r.openFailed = true
		r.reopenAt = time.Now().Add(r.reopenDelay)
		r.reopenDelay = min(2*r.reopenDelay, r.reopenMax)
		r.mu.Lock()
		r.health.LastError, r.health.LastErrorAt = err.Error(), time.Now()
		r.mu.Unlock()
		return
	}
	r.log.Info("serial port open", "port", r.cfg.Bus.Port, "baud", r.cfg.Bus.Baud)
	r.openFailed = false
	r.port = newReader(p)
	_ = r.port.Flush()
	r.mu.Lock()
	r.portUp = true
	r.health.PortOpen = true
	r.health.Opens++
	r.mu.Unlock()
}

func (r *runner) closePort() {
	if r.port != nil {
		_ = r.port.Close()
		r.port = nil
	}
	r.mu.Lock()
	r.portUp = false
	r.health.PortOpen = false
	r.mu.Unlock()
}

// lost closes a port that failed and schedules its reopening.
func (r *runner) lost(err error) {
	r.log.Warn("serial port lost, reopening with backoff", "port", r.cfg.Bus.Port, "err", err)
	r.closePort()
	r.reopenAt = time.Now().Add(r.reopenDelay)
	r.reopenDelay = min(2*r.reopenDelay, r.reopenMax)
	r.mu.Lock()
	r.health.PortErrors++
	r.mu.Unlock()
}

var errPortClosed = errors.New("serial port is not open")

// exchange sends req and reads its reply, trying up to attempts times
// after a timeout or a bad frame. An exception reply is not retried.
func (r *runner) exchange(d *device, req modbus.Request, attempts int) (modbus.Response, error) {
	if r.port == nil {
		return modbus.Response{}, errPortClosed
	}
	frame, err := req.Encode()
	if err != nil {
		return modbus.Response{}, err
	}
	for a := 0; ; a++ {
		if wait := time.Until(r.lastIO.Add(r.silence)); wait > 0 {
			time.Sleep(wait)
		}
		var resp modbus.Response
		err = r.port.Flush()
		if err == nil {
			_, err = r.port.Write(frame)
		}
		if err != nil {
			err = &portError{err}
		} else {
			onWire := time.Duration(len(frame)+req.ResponseLen()) * r.charTime
			deadline := time.Now().Add(onWire + r.cfg.Bus.Timeout)
			var raw []byte
			raw, err = modbus.ReadFrame(r.port, req, deadline, r.quiet)
			switch {
			case err == nil:
				resp, err = modbus.DecodeResponse(req, raw)
			case !errors.Is(err, modbus.ErrTimeout) && !errors.Is(err, modbus.ErrCRC) && !errors.Is(err, modbus.ErrFrame):
				err = &portError{err}
			}
		}
		r.lastIO = time.Now()
		r.count(d, err)
		if isPortError(err) {
			r.lost(err)
			return resp, err
		}
		var exc *modbus.ExceptionError
		if err == nil || errors.As(err, &exc) || a+1 >= attempts {
			return resp, err
		}
	}
}

// poll reads d's registers and reports its state and online changes.
func (r *runner) poll(ctx context.Context, d *device) {
	start := time.Now()
	attempts := 1
	if d.state == stateOnline { // read without the lock: only Run writes it
		attempts += PollRetries
	}
	resps := make([]modbus.Response, len(d.reads))
	var err error
	for i, req := range d.reads {
		if resps[i], err = r.exchange(d, req, attempts); err != nil {
			break
		}
	}
	interval := r.cfg.Bus.PollInterval
	r.mu.Lock()
	h := &d.health
	if !d.lastStart.IsZero() {
		p := start.Sub(d.lastStart)
		if h.PollPeriod == 0 {
			h.PollPeriod = p
		} else {
			h.PollPeriod = (4*h.PollPeriod + p) / 5
		}
	}
	d.lastStart = start
	if err != nil {
		h.FailedPolls++
		r.health.FailedPolls++
	} else {
		h.Polls++
		r.health.Polls++
		h.LastPoll = time.Now()
	}
	r.mu.Unlock()

	if err != nil {
		if ctx.Err() != nil {
			return
		}
		d.fails++
		if d.fails >= OfflineAfter && d.state != stateOffline {
			r.setState(d, stateOffline)
			r.log.Warn("serial device offline", "device", d.dev.ID, "unit", d.unit, "err", err)
			if rerr := r.cfg.Reporter.DeviceOnline(ctx, d.dev.ID, false); rerr != nil {
				r.log.Warn("report offline", "device", d.dev.ID, "err", rerr)
			}
		}
		if d.state == stateOffline {
			if d.backoff == 0 {
				d.backoff = 2 * interval
			} else {
				d.backoff = min(2*d.backoff, r.maxBackoff)
			}
			d.nextPoll = time.Now().Add(d.backoff)
		} else {
			d.schedule(interval)
		}
		return
	}
	r.reopenDelay = r.reopenMin
	d.fails, d.backoff = 0, 0
	if d.state != stateOnline {
		r.setState(d, stateOnline)
		r.log.Info("serial device online", "device", d.dev.ID, "unit", d.unit)
		if rerr := r.cfg.Reporter.DeviceOnline(ctx, d.dev.ID, true); rerr != nil {
			r.log.Warn("report online", "device", d.dev.ID, "err", rerr)
		}
		d.reported = false // report the state at once
	}
	d.schedule(interval)
	st, fault, tel := d.plan.state(resps)
	now := time.Now()
	if d.reported && st == d.lastStatus && fault == d.lastFault && maps.Equal(tel, d.lastTel) &&
		now.Sub(d.lastReport) < r.reportEvery {
		return
	}
	rep := edged.StateReport{Status: st, Fault: fault, Extra: tel}
	if rerr := r.cfg.Reporter.DeviceState(ctx, d.dev.ID, rep); rerr != nil {
		r.log.Warn("report state", "device", d.dev.ID, "err", rerr)
		return
	}
	d.reported, d.lastStatus, d.lastFault, d.lastTel, d.lastReport = true, st, fault, tel, now
}

// schedule sets d's next poll one interval after the last one was due,
// or now when the bus has fallen behind.
func (d *device) schedule(interval time.Duration) {
	now := time.Now()
	d.nextPoll = d.nextPoll.Add(interval)
	if d.nextPoll.Before(now) {
		d.nextPoll = now
	} else if d.nextPoll.After(now.Add(interval)) {
		d.nextPoll = now.Add(interval)
	}
}

func (r *runner) setState(d *device, s onlineState) {
	r.mu.Lock()
	d.state = s
	d.health.State = s.String()
	r.mu.Unlock()
}

// command carries out c and reports its ack.
func (r *runner) command(ctx context.Context, c *command) {
	d := c.d
	ack := edged.CommandAck{CmdID: c.cmd.CmdID}
	err := c.err
	if err == nil {
		_, err = r.exchange(d, c.req, 1+CommandRetries)
	}
	var exc *modbus.ExceptionError
	switch {
	case err == nil:
		ack.OK = true
		d.nextPoll = time.Now() // read the new status at once
	case c.err != nil:
		ack.Error = c.err.Error()
	case errors.As(err, &exc):
		ack.Error, ack.Code = exc.Error(), int(exc.Code)
	case errors.Is(err, modbus.ErrTimeout):
		ack.Error = "timeout"
	case errors.Is(err, errPortClosed) || isPortError(err):
		ack.Error = "serial port unavailable"
	default:
		ack.Error = "no valid reply: " + err.Error()
	}
	r.log.Debug("serial command", "device", d.dev.ID, "action", c.cmd.Action, "cmd_id", c.cmd.CmdID, "ok", ack.OK, "error", ack.Error)
	if rerr := r.cfg.Reporter.DeviceAck(ctx, d.dev.ID, ack); rerr != nil {
		r.log.Warn("report ack", "device", d.dev.ID, "cmd_id", c.cmd.CmdID, "err", rerr)
	}
}
