// Package local is the LAN side of edged: the embedded MQTT broker (mochi)
// that the station's devices connect to (contract §2), MQTT 3.1.1 and 5.
//
// Every device authenticates as itself: username = client id = device id,
// password = its secret, checked with bcrypt. A refused CONNECT (unknown
// device, wrong secret, other client id, a will on a foreign topic) gets
// CONNACK "not authorized" (5 in 3.1.1, 0x87 in 5), is counted and logged
// with the device id and remote address, never the secret. Once bcrypt has
// accepted a device's secret, the device's later logins are checked with a
// keyed HMAC kept in Config.DataDir (microseconds, also after a restart);
// refused secrets are remembered for a minute; bcrypt runs on at most half
// the cores, one at a time per device, on worker goroutines. So reconnect
// storms are quick and floods of wrong secrets stay cheap and cannot delay
// a device whose secret is already verified.
//
// A device may publish only on its six up topics and subscribe only to
// devices/D/commands. What it publishes is checked with the domain's
// parsers and handed to the edged.DeviceReporter synchronously, before the
// broker acknowledges it, so a device event is durable before the device
// is told so. Broker implements edged.Commander.
//
// Refusals never disconnect a device (a refused QoS 1 publish that closes
// the connection makes an MQTT 3.1.1 client resend it forever):
//
//   - A publish outside the device's own up topics (an ACL denial), or one
//     whose payload is over 64 KiB or not what the topic needs (bad input,
//     also when the reporter says EINVALID), is dropped and counted. An
//     MQTT 5 client publishing at QoS 1 gets a negative PUBACK (0x87 not
//     authorized, 0x99 payload format invalid); everybody else gets a
//     normal acknowledgement, as MQTT 3.1.1 has no negative PUBACK (and a
//     negative PUBREC at QoS 2 is out of a hook's reach).
//   - A subscription other than exactly devices/D/commands (wildcards and
//     shared subscriptions included) gets a SUBACK failure: 0x80 in 3.1.1,
//     0x87 in 5.
//   - A packet over Config.MaxPacketKB closes the connection, as do MQTT
//     protocol violations (a wildcard in a topic name, say).
//   - A rental message relayed on devices/D/grants goes to the reporter's
//     edged.GrantRelay, at most edged.MaxRelaysPerMinute per device in any
//     minute. Over the limit, or when the reporter takes no relays, it is
//     dropped and counted (Stats.RelayDropped); MQTT 5 at QoS 1 gets 0x97
//     quota exceeded or 0x83. The station answers a relay it takes with a
//     rental_result command.
//
// When the reporter fails otherwise (the store cannot write), the message
// is not acknowledged as a success: MQTT 5 at QoS 1 gets PUBACK 0x80, so the
// device knows it was not taken; MQTT 3.1.1 at QoS 1 or 2 has its
// connection closed with no acknowledgement, so the client resends the
// message after reconnecting (with backoff, its own); MQTT 5 at QoS 2 gets
// DISCONNECT 0x80. QoS 0 messages are dropped and logged.
//
// A will is accepted only on the device's own up topics but grants (a will
// would relay past the limit) with a payload that
// passes the same checks; it is never retained, and is reported like a
// publish when mochi sends it (also when the session is taken over by a
// reconnect of the same device). Any other will refuses the CONNECT.
//
// A device is online from its session's start to its end. A reconnect of
// the same device takes the old session over; the old session's end is
// ignored when it comes after the new session's start, so the device stays
// online (the station hears online again, which it treats as no change). Commands sent while the device is connected but not yet
// subscribed (the station sends them when a device comes back) are held
// for up to 10 s and delivered once it subscribes.
package local

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/stationedge/edged"
	"golang.org/x/crypto/bcrypt"
)

// DefaultMaxPacketKB is local.max_packet_kb's default (contract §8).
const DefaultMaxPacketKB = 4096

const (
	// reportTimeout bounds one call to the reporter, so a stuck store
	// cannot hold a device's connection forever.
	reportTimeout = 10 * time.Second
	// closeGrace is how long Close lets mochi disconnect clients politely
	// before it closes their sockets.
	closeGrace = 2 * time.Second
	// maxPendingCommands bounds the commands held for a device that is
	// connected but not yet subscribed to its commands topic.
	maxPendingCommands = 16
	// pendingCommandTTL is how long such a command stays deliverable.
	pendingCommandTTL = 10 * time.Second
	// At most authLogBurst refused logins of configured devices, and as
	// many of unknown ids, are logged per authLogWindow; one line at the
	// window's end counts the rest, so a flood of bad CONNECTs cannot fill
	// the journal.
	authLogWindow = 10 * time.Second
	authLogBurst  = 10
	// Per-client buffers sized for the contract's small messages; see New.
	clientWritesPending = 32
	clientReadBuffer    = 512
	clientWriteBuffer   = 1024
)

// Config configures a Broker.
type Config struct {
	// Listen is the plain TCP address (local.listen), e.g. ":1883".
	Listen string
	// TLSListen, with TLSCertFile and TLSKeyFile, adds an MQTT over TLS
	// listener.
	TLSListen, TLSCertFile, TLSKeyFile string
	// WSListen adds an MQTT over WebSocket listener. It accepts any origin
	// and path, and its address cannot be a :0 port (a mochi limit).
	WSListen string
	// Listener, when set, is used instead of Listen (tests pass one on
	// 127.0.0.1:0). The broker closes it.
	Listener net.Listener
	// MaxPacketKB: a packet over this many KiB closes the connection
	// (0: DefaultMaxPacketKB).
	MaxPacketKB int
	// MaxClients bounds the connected clients (0: unbounded).
	MaxClients int
	// MaxPublishRate is each device's sustained publishes per second
	// (local.max_publish_rate); a faster device is slowed by holding its
	// publishes, never by dropping them (0: unlimited).
	MaxPublishRate float64
	// Devices are the station's devices; only those with Transport mqtt
	// may connect.
	Devices []edged.Device
	// Reporter receives what devices publish, and their presence.
	Reporter edged.DeviceReporter
	// Logger is the subsystem's logger (nil: discard).
	Logger *slog.Logger
	// DataDir is where the broker keeps its login verifiers (the file
	// VerifierFile, mode 0600), so devices log in without bcrypt after a
	// restart. Empty: kept in memory only.
	DataDir string
}

// Stats are the broker's counters since New.
type Stats = edged.BrokerStats

// Broker is the devices' MQTT broker. It is safe for concurrent use.
type Broker struct {
	cfg      Config
	log      *slog.Logger
	srv      *mqtt.Server
	reporter edged.DeviceReporter
	// devices are the configured MQTT devices, replaced whole (copy on
	// write) when the device list changes: read on every packet, written
	// on a reload.
	devices atomic.Pointer[map[string]*device]
	secrets *secrets
	// applyMu serializes device list changes; drops counts the sessions
	// they closed (removed devices, changed secrets).
	applyMu sync.Mutex
	drops   atomic.Uint64

	// ctx is cancelled by Close; reporter calls derive from it.
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex // guards the fields below
	started bool
	tracked []*trackedListener
	tcp     net.Listener

	serving   atomic.Bool
	closeOnce sync.Once

	authFailures, aclDenials, badInput, messagesIn, messagesOut, throttled atomic.Uint64
	connected                                                              atomic.Int64

	relays       relayLimit
	relayDropped atomic.Uint64

	warnMu   sync.Mutex
	lastWarn map[string]time.Time
	// authLog bounds the lines of refused logins; inputLog, each device's
	// lines of bad input (§2: once per device per minute).
	authLog, inputLog *logGate
}

// device is the broker's record of one configured MQTT device.
type device struct {
	id string

	// mu serializes the device's online/offline transitions and their
	// reports, so the station sees them in order.
	mu sync.Mutex
	// current is the client whose session is the device's live one; a
	// disconnect of any other (a session taken over) is stale.
	current atomic.Pointer[mqtt.Client]

	// limit is the device's publish rate limit, nil when unlimited.
	limit *rateLimit

	// qmu guards pending and orders command publishes to the device.
	qmu     sync.Mutex
	pending []pendingCommand
}

type pendingCommand struct {
	payload []byte
	at      time.Time
}

// New checks cfg and builds a Broker; Start serves it.
func New(cfg Config) (*Broker, error) {
	if cfg.Reporter == nil {
		return nil, errors.New("local: no device reporter")
	}
	if cfg.Listener == nil && cfg.Listen == "" && cfg.TLSListen == "" && cfg.WSListen == "" {
		return nil, errors.New("local: no listen address")
	}
	if (cfg.TLSListen != "") && (cfg.TLSCertFile == "" || cfg.TLSKeyFile == "") {
		return nil, errors.New("local: tls_listen needs tls_cert_file and tls_key_file")
	}
	if cfg.MaxPacketKB <= 0 {
		cfg.MaxPacketKB = DefaultMaxPacketKB
	}
	if cfg.MaxPacketKB > 256<<10 { // the MQTT remaining length tops out at 256 MiB
		return nil, fmt.Errorf("local: max_packet_kb %d is over %d", cfg.MaxPacketKB, 256<<10)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	devices := make(map[string]*device)
	hashes := make(map[string][]byte)
	for _, d := range cfg.Devices {
		if d.Transport != edged.TransportMQTT {
			continue
		}
		if !edged.ValidDeviceID(d.ID) {
			return nil, fmt.Errorf("local: invalid device id %q", d.ID)
		}
		if _, dup := devices[d.ID]; dup {
			return nil, fmt.Errorf("local: device %q declared twice", d.ID)
		}
		h, err := joinHashes(d)
		if err != nil {
			return nil, err
		}
		devices[d.ID] = &device{id: d.ID, limit: newRateLimit(cfg.MaxPublishRate)}
		hashes[d.ID] = h
	}

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = uint32(cfg.MaxPacketKB) << 10
	// A device is sent only commands (its PUBACKs and SUBACKs are written
	// directly, not queued), a few at a time: 32 pending writes per client
	// instead of 8192 keep a channel of 256 bytes per device instead of
	// 64 KiB. A command that overflows it is dropped by mochi (logged as a
	// dropped message, Send still succeeds); the station resends start and
	// stop until the device acknowledges them, so none is lost for good.
	caps.MaximumClientWritesPending = clientWritesPending
	// A command queued for a device that went away is stale after five
	// minutes: the station resends what matters when the device returns.
	caps.MaximumMessageExpiryInterval = 300
	// Sessions of disconnected devices (persistent ones) live a day.
	caps.MaximumSessionExpiryInterval = 24 * 60 * 60
	// Few topic aliases: each holds a topic string per client.
	caps.TopicAliasMaximum = 8
	caps.MaximumInflight = 256
	caps.MinimumProtocolVersion = 4 // 3.1.1 and 5 only
	caps.MaximumClients = math.MaxInt64
	if cfg.MaxClients > 0 {
		caps.MaximumClients = int64(cfg.MaxClients)
	}

	ctx, cancel := context.WithCancel(context.Background())
	b := &Broker{
		cfg:      cfg,
		log:      log,
		reporter: cfg.Reporter,
		secrets:  newSecrets(hashes, max(1, runtime.NumCPU()/2), cfg.DataDir, log),
		ctx:      ctx,
		cancel:   cancel,
		lastWarn: make(map[string]time.Time),
		authLog:  newLogGate(log, authLogWindow, authLogBurst, "device refusals not logged"),
		inputLog: newLogGate(log, time.Minute, 1, ""),
	}
	b.devices.Store(&devices)
	b.srv = mqtt.New(&mqtt.Options{
		Capabilities:           caps,
		InlineClient:           true,
		Logger:                 slog.New(mochiHandler{log.Handler()}).With("component", "mochi"),
		SysTopicResendInterval: 3600, // nobody may read $SYS: spare the per-second ReadMemStats
		// Device messages are small (commands under 1 KiB, state and
		// events a few hundred bytes): a larger packet is still read
		// whole, past the buffer. The read buffer is allocated per
		// client; the write size only decides when queued writes flush.
		ClientNetReadBufferSize:  clientReadBuffer,
		ClientNetWriteBufferSize: clientWriteBuffer,
	})
	if err := b.srv.AddHook(&hook{b: b}, nil); err != nil {
		b.secrets.close()
		cancel()
		return nil, fmt.Errorf("local: add hook: %w", err)
	}
	return b, nil
}

// Start binds the listeners and serves; it returns once they listen.
func (b *Broker) Start(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.started {
		return errors.New("local: already started")
	}
	b.started = true

	var opened []net.Listener
	fail := func(err error) error {
		for _, ln := range opened {
			_ = ln.Close()
		}
		return err
	}
	if ln := b.cfg.Listener; ln != nil || b.cfg.Listen != "" {
		if ln == nil {
			var err error
			if ln, err = net.Listen("tcp", b.cfg.Listen); err != nil {
				return fail(fmt.Errorf("local: listen: %w", err))
			}
		}
		opened = append(opened, ln)
		b.tcp = ln
		tl := b.track(ln)
		if err := b.srv.AddListener(listeners.NewNet("tcp", tl)); err != nil {
			return fail(fmt.Errorf("local: tcp listener: %w", err))
		}
	}
	if b.cfg.TLSListen != "" {
		cert, err := tls.LoadX509KeyPair(b.cfg.TLSCertFile, b.cfg.TLSKeyFile)
		if err != nil {
			return fail(fmt.Errorf("local: tls certificate: %w", err))
		}
		ln, err := net.Listen("tcp", b.cfg.TLSListen)
		if err != nil {
			return fail(fmt.Errorf("local: tls listen: %w", err))
		}
		opened = append(opened, ln)
		tl := b.track(ln)
		tlsLn := tls.NewListener(tl, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
		if err := b.srv.AddListener(listeners.NewNet("tls", tlsLn)); err != nil {
			return fail(fmt.Errorf("local: tls listener: %w", err))
		}
	}
	if b.cfg.WSListen != "" {
		ws := listeners.NewWebsocket(listeners.Config{Type: listeners.TypeWS, ID: "ws", Address: b.cfg.WSListen})
		if err := b.srv.AddListener(ws); err != nil {
			return fail(fmt.Errorf("local: websocket listener: %w", err))
		}
	}
	if err := b.srv.Serve(); err != nil {
		return fail(fmt.Errorf("local: serve: %w", err))
	}
	b.serving.Store(true)
	b.log.Info("local broker listening", "addr", b.addrString(), "tls", b.cfg.TLSListen, "ws", b.cfg.WSListen)
	return nil
}

// track wraps a listener so Close can end its connections. b.mu is held.
func (b *Broker) track(ln net.Listener) *trackedListener {
	tl := newTrackedListener(ln)
	tl.onError = func(err error) { b.warn("accept", "accept failed, retrying", "addr", ln.Addr().String(), "err", err) }
	b.tracked = append(b.tracked, tl)
	return tl
}

func (b *Broker) addrString() string {
	if b.tcp == nil {
		return ""
	}
	return b.tcp.Addr().String()
}

// Addr returns the TCP listener's address, or nil before Start or when
// there is none.
func (b *Broker) Addr() net.Addr {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.tcp == nil {
		return nil
	}
	return b.tcp.Addr()
}

// Serving reports whether the broker is accepting devices (for /healthz).
func (b *Broker) Serving() bool { return b.serving.Load() }

// Close disconnects every device and stops the listeners. Devices still
// connected are reported offline. It waits for the broker's goroutines.
func (b *Broker) Close() error {
	b.closeOnce.Do(func() {
		b.serving.Store(false)
		b.mu.Lock()
		started, tracked := b.started, b.tracked
		b.mu.Unlock()
		if !started {
			b.cancel()
			return
		}
		// Connections that never sent CONNECT are unknown to mochi, which
		// would wait for them: close them (and stop accepting) first.
		for _, tl := range tracked {
			_ = tl.Close()
			tl.closeConns(true)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = b.srv.Close()
		}()
		select {
		case <-done:
		case <-time.After(closeGrace):
			for _, tl := range tracked {
				tl.closeConns(false)
			}
			<-done
		}
		b.cancel()
	})
	b.secrets.close()
	b.authLog.close()
	b.inputLog.close()
	return nil
}

// SetSecrets replaces the devices' secret hashes (device id -> bcrypt
// hash) for the devices the broker was built with; a device left out can
// no longer log in. A device whose hash changed needs bcrypt again: its
// verifier covered the old hash.
func (b *Broker) SetSecrets(hashes map[string]string) error {
	next := make(map[string][]byte, len(hashes))
	for id, h := range hashes {
		if b.device(id) == nil {
			return fmt.Errorf("local: set secrets: unknown mqtt device %q", id)
		}
		if _, err := bcrypt.Cost([]byte(h)); err != nil {
			return fmt.Errorf("local: set secrets: device %q: secret_hash is not a bcrypt hash", id)
		}
		next[id] = []byte(h)
	}
	b.secrets.setHashes(next)
	return nil
}

// offload runs a report to the station on a goroutine of its own and waits
// for it: the station's commit path is deep, and run on mochi's client
// goroutine it would leave that goroutine's stack grown for as long as
// the device stays connected. Waiting keeps the order of the device's
// messages and the PUBACK after the report.
func offload(f func() error) error {
	done := make(chan error, 1)
	go func() { done <- f() }()
	return <-done
}

// Stats returns the broker's counters.
func (b *Broker) Stats() Stats {
	return Stats{
		AuthFailures: b.authFailures.Load(),
		ACLDenials:   b.aclDenials.Load(),
		BadInput:     b.badInput.Load(),
		MessagesIn:   b.messagesIn.Load(),
		MessagesOut:  b.messagesOut.Load(),
		Connected:    int(b.connected.Load()),
		Throttled:    b.throttled.Load(),
		RelayDropped: b.relayDropped.Load(),
	}
}

// Send publishes cmd as JSON on devices/D/commands at QoS 1. A device that
// is connected but has not subscribed yet (it just connected) gets the
// command as soon as it subscribes, if within 10 s. Errors: ENOTFOUND for a
// device that is not an MQTT device of this station, EINVALID for a
// command without a valid cmd_id or action, EUNAVAILABLE when the device is
// not connected or the broker is not serving.
func (b *Broker) Send(ctx context.Context, deviceID string, cmd edged.DeviceCommand) error {
	d := b.device(deviceID)
	if d == nil {
		return &edged.Error{Code: edged.ENOTFOUND, Reason: edged.ReasonUnknownDevice, Message: fmt.Sprintf("unknown mqtt device %q", deviceID)}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if !edged.ValidToken(cmd.CmdID) || cmd.Action == "" {
		return edged.Errorf(edged.EINVALID, "command needs a valid cmd_id and an action")
	}
	if !b.serving.Load() {
		return &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonDeviceOffline, Message: "local broker not serving"}
	}
	if d.current.Load() == nil {
		return &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonDeviceOffline, Message: fmt.Sprintf("device %q is not connected", deviceID)}
	}
	payload, err := json.Marshal(cmd)
	if err != nil {
		return edged.Errorf(edged.EINVALID, "encode command: %v", err)
	}

	d.qmu.Lock()
	defer d.qmu.Unlock()
	if !b.subscribed(deviceID) {
		if len(d.pending) >= maxPendingCommands {
			return &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonDeviceOffline, Message: fmt.Sprintf("device %q is not subscribed to its commands", deviceID)}
		}
		d.pending = append(d.pending, pendingCommand{payload: payload, at: time.Now()})
		return nil
	}
	return b.publishCommand(deviceID, payload)
}

// subscribed reports whether the device has its commands subscription.
func (b *Broker) subscribed(id string) bool {
	_, ok := b.srv.Topics.Subscribers(commandsTopic(id)).Subscriptions[id]
	return ok
}

func (b *Broker) publishCommand(id string, payload []byte) error {
	if err := b.srv.Publish(commandsTopic(id), payload, false, 1); err != nil {
		return &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonDeviceOffline, Message: "publish command", Err: err}
	}
	b.messagesOut.Add(1)
	return nil
}

// flushPending publishes the commands held while the device was not yet
// subscribed, dropping stale ones.
func (b *Broker) flushPending(d *device) {
	d.qmu.Lock()
	defer d.qmu.Unlock()
	if len(d.pending) == 0 || !b.subscribed(d.id) {
		return
	}
	now := time.Now()
	for _, p := range d.pending {
		if now.Sub(p.at) > pendingCommandTTL {
			b.log.Warn("stale command dropped", "device", d.id)
			continue
		}
		if err := b.publishCommand(d.id, p.payload); err != nil {
			b.log.Warn("held command not delivered", "device", d.id, "err", err)
		}
	}
	d.pending = nil
}

// inputWarn logs a device's bad input at most once a minute per device
// (§2), with how many lines were held back since the last.
func (b *Broker) inputWarn(id, msg string, args ...any) {
	ok, held := b.inputLog.allow(id)
	if !ok {
		return
	}
	args = append([]any{"device", id}, args...)
	if held > 0 {
		args = append(args, "not_logged", held)
	}
	b.log.Warn(msg, args...)
}

// warn logs at Warn at most once a second per kind, else at Debug, so a
// misbehaving device cannot flood the journal.
func (b *Broker) warn(kind, msg string, args ...any) {
	now := time.Now()
	b.warnMu.Lock()
	last := b.lastWarn[kind]
	quiet := now.Sub(last) < time.Second
	if !quiet {
		b.lastWarn[kind] = now
	}
	b.warnMu.Unlock()
	level := slog.LevelWarn
	if quiet {
		level = slog.LevelDebug
	}
	b.log.Log(context.Background(), level, msg, args...)
}
