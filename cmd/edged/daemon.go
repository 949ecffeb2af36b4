package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/local"
	"github.com/stationedge/edged/local/web"
	"github.com/stationedge/edged/serial"
	"github.com/stationedge/edged/store"
	"github.com/stationedge/edged/systemd"
	"github.com/stationedge/edged/uplink"
)

// Main is the running daemon: it builds the pieces from the config,
// connects them, and closes them in reverse order of start.
type Main struct {
	Config edged.Config
	Logger *slog.Logger
	// Clock, when set, replaces the system clock (tests).
	Clock edged.Clock
	// LocalListener and HTTPListener, when set, replace local.listen and
	// http.listen (tests use :0).
	LocalListener net.Listener
	HTTPListener  net.Listener
	// ConfigPath is the file Reload reads (SIGHUP).
	ConfigPath string

	StartedAt time.Time
	Store     *store.DB
	Station   *edged.Station
	Broker    *local.Broker
	Buses     []*serial.Bus
	Uplink    *uplink.Uplink
	HTTP      *web.Server

	router *commandRouter
	devs   deviceLists // reloads and registries: devicelist.go

	cancel  context.CancelFunc
	loopsAt time.Time // when the rental loop was started
	wg      sync.WaitGroup
	closed  sync.Once
}

// NewMain returns a daemon for cfg.
func NewMain(cfg edged.Config, logger *slog.Logger) *Main {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Main{Config: cfg, Logger: logger}
}

// Run opens the store, restores the station, starts the local broker, the
// serial buses and the rental clock, and tells systemd it is ready. It
// returns once edged is serving; Close stops it.
func (m *Main) Run(ctx context.Context) error {
	cfg := m.Config
	log := m.Logger
	m.StartedAt = time.Now()
	if m.Clock == nil {
		m.Clock = edged.SystemClock{AssumeSynced: cfg.Clock.AssumeSynced, Sync: kernelClockSynced}
	}
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	db, err := store.Open(filepath.Join(cfg.DataDir, "edged.db"), store.Options{
		OutboxMaxBytes: int64(cfg.Uplink.OutboxMaxMB) << 20,
		Logger:         log.With("system", "store"),
	})
	if err != nil {
		return fmt.Errorf("open store: %w", err)
	}
	m.Store = db
	cfg.Devices = m.startDevices(ctx, cfg)

	var verifyKey []byte
	if cfg.Rentals.VerifyKey != "" {
		k, err := edged.ParseVerifyKey(cfg.Rentals.VerifyKey)
		if err != nil {
			return fmt.Errorf("rentals.verify_key: %w", err)
		}
		verifyKey = k
	}
	router := &commandRouter{links: map[string]edged.Commander{}}
	m.router = router
	st, err := edged.NewStation(edged.StationOptions{
		ID: cfg.Station.ID, Devices: cfg.Devices, Store: db, Commander: router, Clock: m.Clock,
		VerifyKey: verifyKey, StartTimeout: cfg.Rentals.StartTimeout,
		Logger: log.With("system", "rentals"),
	})
	if err != nil {
		return err
	}
	if err := st.Open(ctx); err != nil {
		return fmt.Errorf("restore station: %w", err)
	}
	m.Station = st

	broker, err := local.New(local.Config{
		Listen: cfg.Local.Listen, TLSListen: cfg.Local.TLSListen,
		TLSCertFile: cfg.Local.TLSCertFile, TLSKeyFile: cfg.Local.TLSKeyFile,
		WSListen: cfg.Local.WSListen, Listener: m.LocalListener,
		MaxPacketKB: cfg.Local.MaxPacketKB, MaxClients: cfg.Local.MaxClients,
		MaxPublishRate: cfg.Local.MaxPublishRate,
		Devices:        cfg.Devices, Reporter: st, Logger: log.With("system", "local"),
		DataDir: cfg.DataDir, // login verifiers, so a restart costs no bcrypt per device
	})
	if err != nil {
		return fmt.Errorf("local broker: %w", err)
	}
	m.Broker = broker
	for _, d := range cfg.Devices {
		if d.Transport == edged.TransportMQTT {
			router.links[d.ID] = broker
		}
	}

	runCtx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	for _, b := range cfg.Serial.Buses {
		var devs []edged.Device
		for _, d := range cfg.Devices {
			if d.Transport == edged.TransportSerial && d.Bus == b.Name {
				devs = append(devs, d)
			}
		}
		bus, err := serial.NewBus(serial.Config{
			Bus: b, Devices: devs, Profiles: cfg.Profiles, Reporter: st,
			Logger: log.With("system", "serial", "bus", b.Name),
		})
		if err != nil {
			return fmt.Errorf("serial bus %s: %w", b.Name, err)
		}
		m.Buses = append(m.Buses, bus)
		for _, d := range devs {
			router.links[d.ID] = bus
		}
		m.goRun(runCtx, "serial "+b.Name, bus.Run)
	}
	m.settleDevices(ctx)
	if err := broker.Start(runCtx); err != nil {
		return fmt.Errorf("local broker: %w", err)
	}
	m.loopsAt = time.Now()
	m.goRun(runCtx, "rentals", st.Run)

	up, err := uplink.New(uplink.Config{
		UplinkConfig: cfg.Uplink, StationID: cfg.Station.ID, StationName: cfg.Station.Name,
		StationLocation: cfg.Station.Location, Outbox: db, States: st, Handler: st, Registry: registryHandler{m},
		Clock: m.Clock, Logger: log, StartedAt: m.StartedAt, // the uplink scopes its logger itself
	})
	if err != nil {
		return fmt.Errorf("uplink: %w", err)
	}
	m.Uplink = up
	if cfg.Uplink.URL != "" {
		m.goRun(runCtx, "uplink", up.Run)
	} else {
		// Offline-only: there is no cloud to deliver to. Events stay in the
		// log for the status page, but not in a queue that would grow
		// past its quota with rental events it may never drop.
		m.goRun(runCtx, "outbox", func(ctx context.Context) error { return releaseOutbox(ctx, db) })
	}
	if cfg.HTTP.Listen != "" {
		srv, err := web.New(web.Config{
			Listen: cfg.HTTP.Listen, Listener: m.HTTPListener, Users: cfg.HTTP.Users,
			Station: st, Store: db, Clock: m.Clock,
			Uplink: up.Status,
			Buses: func() []edged.BusHealth {
				out := make([]edged.BusHealth, 0, len(m.Buses))
				for _, b := range m.Buses {
					out = append(out, b.Health())
				}
				return out
			},
			Broker:     broker.Stats,
			DeviceList: m.deviceListView,
			Healthy:    m.Healthy,
			StationID:  cfg.Station.ID, StationName: cfg.Station.Name, Version: edged.Version,
			StartedAt: m.StartedAt, Logger: log.With("system", "http"),
		})
		if err != nil {
			return fmt.Errorf("http: %w", err)
		}
		if err := srv.Start(runCtx); err != nil {
			return err // web says "http: listen: ..."
		}
		m.HTTP = srv
	}
	m.goRun(runCtx, "systemd", func(ctx context.Context) error {
		systemd.Watchdog(ctx, m.Alive)
		return nil
	})
	m.goRun(runCtx, "status", m.reportStatus)
	m.goRun(runCtx, "devices", m.retireLoop)
	m.goRun(runCtx, "gc", m.tuneGC)

	log.Info("edged serving", "version", edged.Version, "station", cfg.Station.ID,
		"devices", len(cfg.Devices), "local", broker.Addr().String(), "data_dir", cfg.DataDir,
		"uplink", cfg.Uplink.URL != "", "http", m.httpAddr())
	if err := systemd.Ready(); err != nil {
		log.Warn("notify systemd", "err", err)
	}
	return nil
}

// The GC's target (GOGC) follows what edged does. Go's default, 100, lets
// the heap grow to what is live plus as much again, goroutine stacks
// counted, before it collects: with 5,000 idle devices (40 MB of heap, 6
// KiB of stack each) that is about 70 MB more that stays resident. An idle
// station allocates little (about 20 KB/s with 5,000 devices), so while
// it does edged runs lean (gcLeanPercent): a collection every few
// minutes, or every few seconds at the lean threshold. While it allocates
// fast (ingest, a reconnect storm) it runs at Go's default, which keeps
// ingest's CPU for ingest (docs/decisions.md).
const (
	gcLeanPercent = 10
	gcBusyPercent = 100
	// gcCheck is how often the allocation rate is looked at.
	gcCheck = 2 * time.Second
	// Above gcBusyRate bytes allocated per second edged is busy; below
	// gcLeanRate it is lean again (apart, so it does not flap).
	gcBusyRate = 8 << 20
	gcLeanRate = 2 << 20
	// gcReturnEvery spaces the full GCs that return a burst's garbage.
	gcReturnEvery = time.Minute
)

// tuneGC sets GOGC from the allocation rate until ctx ends, unless the
// environment sets GOGC (an operator's choice, in the unit, wins). When
// edged turns lean it also hands the garbage of the burst that ended back
// to the kernel at once (a full GC), at most once per gcReturnEvery:
// otherwise those pages stay resident until the next GC, which idle
// devices take a while to trigger.
func (m *Main) tuneGC(ctx context.Context) error {
	if _, ok := os.LookupEnv("GOGC"); ok {
		return nil
	}
	defer debug.SetGCPercent(gcBusyPercent)
	allocs := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(allocs)
	last, lastAt := allocs[0].Value.Uint64(), time.Now()
	var lean bool
	var returned time.Time
	t := time.NewTicker(gcCheck)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			metrics.Read(allocs)
			n := allocs[0].Value.Uint64()
			rate := float64(n-last) / now.Sub(lastAt).Seconds()
			last, lastAt = n, now
			next := gcLean(lean, rate)
			if next == lean {
				continue
			}
			lean = next
			if !lean {
				debug.SetGCPercent(gcBusyPercent)
			} else {
				debug.SetGCPercent(gcLeanPercent)
				if now.Sub(returned) >= gcReturnEvery {
					returned = now
					debug.FreeOSMemory()
				}
			}
			m.Logger.Debug("gc target changed", "lean", lean, "alloc_bytes_per_s", int64(rate))
		}
	}
}

// gcLean decides whether the GC runs lean, from whether it does and the
// allocation rate in bytes per second: lean below gcLeanRate, busy above
// gcBusyRate, unchanged between them so it does not flap.
func gcLean(lean bool, rate float64) bool {
	switch {
	case rate < gcLeanRate:
		return true
	case rate > gcBusyRate:
		return false
	}
	return lean
}

// stuckAfter is how long the rental loop may go without a pass before
// edged reports itself unhealthy and stops the watchdog pings (it passes
// at least once a second).
const stuckAfter = 15 * time.Second

// goRun runs fn in a goroutine Close waits for.
func (m *Main) goRun(ctx context.Context, name string, fn func(context.Context) error) {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		if err := fn(ctx); err != nil && !errors.Is(err, context.Canceled) {
			m.Logger.Error("subsystem stopped", "system", name, "err", err)
		}
	}()
}

// Healthy is what /healthz answers (§7): nil while the store is writable,
// the broker is serving and the rental loop is turning.
func (m *Main) Healthy() error {
	return m.health().ready()
}

// Alive is what the systemd watchdog checks: nil while the rental loop is
// turning and the broker is serving. It does not ask the store: a full
// disk is survived (§4), and a restart would not free space, so only a
// hung process stops the pings.
func (m *Main) Alive() error {
	return m.health().alive()
}

// health gathers what the two checks look at.
func (m *Main) health() health {
	h := health{now: time.Now(), startedAt: m.loopsAt}
	if m.Store == nil || m.Broker == nil || m.Station == nil {
		h.starting = true
		return h
	}
	h.lastTick = m.Station.LastTick()
	h.store = m.Store.Healthy()
	if n := m.Station.Unrecorded(); n > 0 && h.store == nil {
		// The store may answer again while the station still holds
		// records it could not write: not healthy until they are down.
		h.store = fmt.Errorf("%d records waiting to be written", n)
	}
	h.serving = m.Broker.Serving()
	return h
}

// health is the daemon's state at one moment, for Healthy and Alive.
type health struct {
	starting  bool      // the pieces are not all built yet
	now       time.Time // when it was taken
	startedAt time.Time // when the rental loop was started
	lastTick  time.Time // the rental loop's last pass; zero before the first
	store     error     // the store's health: nil while it can write
	serving   bool      // the local broker accepts devices
}

// alive decides the watchdog ping: the loops turn. A rental loop that has
// not passed since startedAt for stuckAfter counts as stuck too.
func (h health) alive() error {
	if h.starting {
		return errors.New("starting")
	}
	last := h.lastTick
	if last.IsZero() {
		last = h.startedAt
	}
	if !last.IsZero() && h.now.Sub(last) > stuckAfter {
		return fmt.Errorf("rental loop stuck since %s", last.UTC().Format(time.RFC3339))
	}
	if !h.serving {
		return errors.New("local broker is not serving")
	}
	return nil
}

// ready decides /healthz: alive, and the store can write.
func (h health) ready() error {
	if err := h.alive(); err != nil {
		return err
	}
	if h.store != nil {
		return fmt.Errorf("store: %w", h.store)
	}
	return nil
}

// reportStatus keeps systemd's STATUS= line current.
func (m *Main) reportStatus(ctx context.Context) error {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	last := ""
	for {
		s := m.statusLine()
		if s != last {
			_ = systemd.Status(s)
			last = s
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (m *Main) uplinkState() string {
	if m.Uplink == nil {
		return uplink.StateDisabled
	}
	return m.Uplink.Status().State
}

// Close stops everything in reverse order of start; it may be called more
// than once.
func (m *Main) Close() error {
	var errs []error
	m.closed.Do(func() {
		if m.HTTP != nil {
			if err := m.HTTP.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close http: %w", err))
			}
		}
		if m.cancel != nil {
			m.cancel()
		}
		if m.Broker != nil {
			if err := m.Broker.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close local broker: %w", err))
			}
		}
		m.wg.Wait()
		if m.Store != nil {
			if err := m.Store.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close store: %w", err))
			}
		}
	})
	return errors.Join(errs...)
}

// releaseOutbox acknowledges every queued event as it is appended: what
// offline-only operation does with the outbox.
func releaseOutbox(ctx context.Context, o edged.Outbox) error {
	var after uint64
	for {
		evs, err := o.Pending(ctx, after, 1000)
		if err != nil {
			return err
		}
		if len(evs) > 0 {
			seqs := make([]uint64, len(evs))
			for i, e := range evs {
				seqs[i] = e.Seq
			}
			if err := o.Ack(ctx, seqs...); err != nil {
				return err
			}
			after = seqs[len(seqs)-1]
			continue
		}
		select {
		case <-ctx.Done():
			return nil
		case <-o.Notify():
		case <-time.After(10 * time.Second):
		}
	}
}

// commandRouter sends each device's commands over its own link.
type commandRouter struct {
	mu    sync.RWMutex // a device list change writes links while the station sends
	links map[string]edged.Commander
}

// apply routes added and changed devices to their link and forgets gone
// ones.
func (r *commandRouter) apply(d edged.DeviceDiff, m *Main) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, g := range d.Gone() {
		delete(r.links, g.ID)
	}
	for _, dev := range append(append([]edged.Device{}, d.Added...), d.Changed...) {
		delete(r.links, dev.ID)
		if dev.Transport == edged.TransportMQTT {
			r.links[dev.ID] = m.Broker
			continue
		}
		for _, b := range m.Buses {
			if b.Name() == dev.Bus {
				r.links[dev.ID] = b
			}
		}
	}
}

func (r *commandRouter) Send(ctx context.Context, id string, c edged.DeviceCommand) error {
	r.mu.RLock()
	l, ok := r.links[id]
	r.mu.RUnlock()
	if !ok {
		return &edged.Error{Code: edged.ENOTFOUND, Reason: edged.ReasonUnknownDevice, Message: "no link to device " + id}
	}
	return l.Send(ctx, id, c)
}

// httpAddr is where the status page listens, or "" without one.
func (m *Main) httpAddr() string {
	if m.HTTP == nil {
		return ""
	}
	return m.HTTP.Addr().String()
}
