// Package uplink is edged's link to the cloud MQTT broker (contract §3): it
// drains the event log upstream in seq order, at least once; publishes the
// latest state of each device, coalesced; keeps the gateway's presence
// retained; and hands rental messages and renter commands from the cloud to
// the station, acknowledging each only once the station has made it
// durable.
//
// The station's store is the source of truth, never paho's in-memory
// queue: every connection gets a fresh paho client with AutoReconnect off,
// and after any loss the uplink resends from the oldest event whose PUBACK
// it has not seen. docs/uplink.md explains the decisions.
package uplink

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stationedge/edged"
)

// Config is what the uplink needs: the uplink section of the configuration
// file, the station's identity and the station-side interfaces it drains
// and feeds.
type Config struct {
	edged.UplinkConfig
	StationID, StationName string
	StationLocation        *edged.Location

	// Outbox is the event log to drain; States the device states to
	// publish; Handler receives the cloud's rentals and renter commands.
	// All three are required when URL is set.
	Outbox  edged.Outbox
	States  edged.StateSource
	Handler edged.CloudHandler
	// Registry, when set, receives the device registries of
	// R/S/down/registry (§3.6), acknowledged as Handler's messages are.
	Registry edged.RegistryHandler

	// Clock gives started_at and the outbox's oldest age; nil means
	// edged.SystemClock{}.
	Clock edged.Clock
	// Logger is scoped by the uplink ("system"="uplink"); nil discards.
	Logger *slog.Logger
	// StartedAt is when edged started, for the gateway's presence; zero
	// means when New is called.
	StartedAt time.Time
}

// States of the uplink, as on the status page (§7).
const (
	StateConnected  = "connected"
	StateConnecting = "connecting"
	StateDisabled   = "disabled"
)

// Status describes the uplink for the status page and /api/v1/status:
// edged.UplinkStatus, defined once in the root so the page reads it
// without importing the uplink.
type Status = edged.UplinkStatus

// Defaults for zero values of edged.UplinkConfig, as in edged.DefaultConfig.
const (
	defaultTopicRoot    = "stations"
	defaultKeepAlive    = 30 * time.Second
	defaultReconnectMax = 60 * time.Second
	defaultWindow       = 256
)

// Uplink is the cloud connection. Create it with New, run it with Run;
// Status may be called from any goroutine.
type Uplink struct {
	cfg      Config
	log      *slog.Logger
	clock    edged.Clock
	broker   string      // URL with a default port filled in
	tls      *tls.Config // nil for tcp:// and ws://
	clientID string
	topics   topics

	// Profile settings (§3.5), from cfg with the profile's defaults.
	aliyun   bool // no retain, no will; signed login; states on one topic
	retain   bool // states and presence retained, will set
	batch    int  // events per message
	maxBytes int  // largest payload
	pacer    *pacer
	// inflightCap bounds publishes awaiting their PUBACK when the rate is
	// limited (0: only the window bounds them). The cloud counts arrivals,
	// and messages queued on the way (a stalled writer, a slow link)
	// arrive together: in any second it sees at most the rate plus those
	// in flight at its start. rate/9 keeps that within the clouds' limits
	// (aws 90+10 ≤ 100, aliyun 25+2 ≤ 30).
	inflightCap int

	runMu sync.Mutex // held by Run: one Run at a time

	// released is signalled when the acker frees room in the window.
	released chan struct{}

	// Owned by Run's goroutine (sessions run one after another).
	pubacked      uint64 // highest seq PUBACKed: the next session resends after it
	hadConnection bool
	refusal       refusal

	sent counters // atomics, for Status

	mu             sync.Mutex
	state          string
	connectedSince time.Time
	lastAcked      uint64
	reconnects     int
	connects       int
	lastErr        string
}

// topics are the uplink's MQTT topics, R/S/... or /PK/DN/user/... (aliyun).
type topics struct {
	gateway, events, downRentals, downCommands string
	// downRegistry is "" when no Registry handler is set: not subscribed.
	downRegistry string
	// devicePrefix+D is a device's state topic; in aliyun devicePrefix is
	// empty and every state goes to devices.
	devicePrefix, devices string
	renter                string // aliyun's fixed renter topic
}

// counters are the uplink's figures for Status.
type counters struct {
	messages, events, batches, waits, refused, live, downHeld atomic.Uint64
}

// refusal tracks connections that ended with nothing of theirs
// acknowledged, to find a message the cloud refuses by dropping the
// connection (docs/uplink.md, "Refused publishes"). Owned by Run.
type refusal struct {
	// capEvents, when > 0, bounds batches that start at or before capUntil:
	// the batch that failed is sent in halves until the refused event is
	// alone.
	capEvents int
	capUntil  uint64
	// head is the event that was sent alone first on fails connections in
	// a row; at refuseAfter it is given up.
	head  uint64
	fails int
}

// refuseAfter is how many connections in a row must end with a lone event
// unacknowledged before that event is taken for refused: a flaky link
// rarely drops so many connections before their first PUBACK.
const refuseAfter = 5

// New checks cfg (the URL and its scheme, the TLS files) and returns an
// uplink ready to Run. With no URL the uplink is disabled: Run only waits
// (offline-only operation is a supported mode).
func New(cfg Config) (*Uplink, error) {
	u := &Uplink{cfg: cfg, state: StateConnecting, released: make(chan struct{}, 1)}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	u.log = cfg.Logger.With("system", "uplink")
	u.clock = cfg.Clock
	if u.clock == nil {
		u.clock = edged.SystemClock{}
	}
	if u.cfg.StartedAt.IsZero() {
		u.cfg.StartedAt = u.clock.Now()
	}
	u.cfg.UplinkConfig = u.cfg.UplinkConfig.Effective()
	c := &u.cfg.UplinkConfig
	if _, ok := edged.CloudProfile(c.Profile); !ok {
		return nil, edged.Errorf(edged.EINVALID, "uplink: %q is not a profile (generic, aws or aliyun)", c.Profile)
	}
	u.aliyun = c.Profile == edged.ProfileAliyun
	u.retain = !u.aliyun
	u.batch = min(max(c.BatchEvents, 1), edged.MaxBatchEvents)
	u.maxBytes = c.MaxMessageKB * 1024
	u.pacer = newPacer(c.MaxPublishRate)
	if c.MaxPublishRate > 0 {
		u.inflightCap = max(1, c.MaxPublishRate/9)
	}
	if c.URL == "" {
		u.state = StateDisabled
		return u, nil
	}
	if !edged.ValidStationID(cfg.StationID) {
		return nil, edged.Errorf(edged.EINVALID, "uplink: %q is not a station id", cfg.StationID)
	}
	if cfg.Outbox == nil || cfg.States == nil || cfg.Handler == nil {
		return nil, edged.Errorf(edged.EINVALID, "uplink: Outbox, States and Handler are required")
	}
	if c.TopicRoot == "" {
		c.TopicRoot = defaultTopicRoot
	}
	if c.KeepAlive <= 0 {
		c.KeepAlive = defaultKeepAlive
	}
	if c.KeepAlive < time.Second {
		return nil, edged.Errorf(edged.EINVALID, "uplink: keepalive must be at least 1s")
	}
	if c.ReconnectMax <= 0 {
		c.ReconnectMax = defaultReconnectMax
	}
	if c.Window <= 0 {
		c.Window = defaultWindow
	}
	if c.Window > 65535 {
		return nil, edged.Errorf(edged.EINVALID, "uplink: window must be at most 65535")
	}
	u.clientID = c.ClientID
	if u.clientID == "" {
		u.clientID = "edged-" + cfg.StationID
	}
	pk, dn := c.Aliyun.ProductKey, c.Aliyun.DeviceName
	if u.aliyun {
		if pk == "" || dn == "" || c.Aliyun.DeviceSecret == "" {
			return nil, edged.Errorf(edged.EINVALID, "uplink: profile aliyun needs aliyun.product_key, device_name and device_secret")
		}
		if c.ClientID == "" {
			u.clientID = pk + "." + dn
		}
	}

	broker, secure, err := brokerURL(c.URL)
	if err != nil {
		return nil, err
	}
	u.broker = broker
	if c.Profile != edged.ProfileGeneric {
		if !secure {
			return nil, edged.Errorf(edged.EINVALID, "uplink: profile %s needs a TLS url (ssl://, tls:// or wss://)", c.Profile)
		}
		if c.KeepAlive < 30*time.Second || c.KeepAlive > 1200*time.Second {
			return nil, edged.Errorf(edged.EINVALID, "uplink: profile %s needs a keepalive between 30s and 1200s", c.Profile)
		}
	}
	if c.Profile == edged.ProfileAWS {
		if c.CertFile == "" {
			return nil, edged.Errorf(edged.EINVALID, "uplink: profile aws needs a client certificate (cert_file, key_file)")
		}
		if strings.Count(c.TopicRoot, "/") > edged.AWSMaxSlashes-4 || strings.Count(c.RenterTopic, "/") > edged.AWSMaxSlashes {
			return nil, edged.Errorf(edged.EINVALID, "uplink: profile aws allows at most %d slashes in a topic", edged.AWSMaxSlashes)
		}
	}
	if secure {
		if u.tls, err = tlsConfig(c); err != nil {
			return nil, err
		}
		if wantsALPN(c.Profile, broker) {
			u.tls.NextProtos = []string{alpnAWS}
		}
		if c.InsecureSkipVerify {
			u.log.Warn("server certificate verification is off (uplink.insecure_skip_verify)", "url", redact(broker))
		}
	} else if c.CAFile != "" || c.CertFile != "" {
		return nil, edged.Errorf(edged.EINVALID, "uplink: ca_file, cert_file and key_file need a tls://, ssl:// or wss:// url")
	}

	if u.aliyun {
		r := "/" + pk + "/" + dn + "/user/"
		u.topics = topics{
			gateway:      r + "gateway",
			events:       r + "events",
			devices:      r + "devices",
			renter:       r + "renter",
			downRentals:  r + "rentals",
			downCommands: r + "commands",
		}
		u.setRegistryTopic(r + "registry")
		if c.TopicRoot != defaultTopicRoot || c.RenterTopic != "" {
			u.log.Info("topic_root and renter_topic do not apply to profile aliyun", "topics", r+"...")
		}
		return u, nil
	}
	r := c.TopicRoot + "/" + cfg.StationID
	u.topics = topics{
		gateway:      r + "/gateway",
		events:       r + "/up/events",
		devicePrefix: r + "/up/devices/",
		downRentals:  r + "/down/rentals",
		downCommands: r + "/down/commands",
	}
	u.setRegistryTopic(r + "/down/registry")
	return u, nil
}

// brokerURL checks the scheme and fills in the default port, so an operator
// may write tls://mqtt.example.com.
func brokerURL(raw string) (broker string, secure bool, err error) {
	p, err := url.Parse(raw)
	if err != nil || p.Host == "" {
		return "", false, edged.Errorf(edged.EINVALID, "uplink: url %q is not scheme://host[:port]", redact(raw))
	}
	ports := map[string]string{
		"tcp": "1883", "mqtt": "1883", "ws": "80",
		"ssl": "8883", "tls": "8883", "mqtts": "8883", "wss": "443",
	}
	port, ok := ports[p.Scheme]
	if !ok {
		return "", false, edged.Errorf(edged.EINVALID, "uplink: url scheme must be tcp, ssl, tls, ws or wss")
	}
	if p.User != nil {
		return "", false, edged.Errorf(edged.EINVALID, "uplink: put credentials in uplink.username and uplink.password, not the url")
	}
	if p.Port() == "" {
		p.Host = net.JoinHostPort(p.Hostname(), port)
	}
	secure = p.Scheme == "ssl" || p.Scheme == "tls" || p.Scheme == "mqtts" || p.Scheme == "wss"
	return p.String(), secure, nil
}

// redact drops anything after the host, in case a path carries a token.
func redact(raw string) string {
	if p, err := url.Parse(raw); err == nil {
		return p.Scheme + "://" + p.Host
	}
	return "(unparsable url)"
}

// tlsConfig builds the client's TLS settings: system roots unless ca_file,
// a client certificate when cert_file and key_file are set.
func tlsConfig(c *edged.UplinkConfig) (*tls.Config, error) {
	t := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: c.InsecureSkipVerify}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, edged.Errorf(edged.EINVALID, "uplink: ca_file: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, edged.Errorf(edged.EINVALID, "uplink: ca_file %s holds no PEM certificate", c.CAFile)
		}
		t.RootCAs = pool
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		return nil, edged.Errorf(edged.EINVALID, "uplink: cert_file and key_file go together")
	}
	if c.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, edged.Errorf(edged.EINVALID, "uplink: client certificate: %v", err)
		}
		t.Certificates = []tls.Certificate{cert}
	}
	return t, nil
}

// Status returns the uplink's state for the status page.
func (u *Uplink) Status() Status {
	u.mu.Lock()
	s := Status{
		State:          u.state,
		ConnectedSince: u.connectedSince,
		LastAckedSeq:   u.lastAcked,
		Reconnects:     u.reconnects,
		Connects:       u.connects,
		LastError:      u.lastErr,
		Profile:        u.cfg.Profile,
		Identity:       u.identity(),
		MessagesSent:   u.sent.messages.Load(),
		EventsSent:     u.sent.events.Load(),
		Batches:        u.sent.batches.Load(),
		PacingWaits:    u.sent.waits.Load(),
		Refused:        u.sent.refused.Load(),
		LiveEvents:     u.sent.live.Load(),
		DownHeld:       u.sent.downHeld.Load(),
	}
	u.mu.Unlock()
	if u.cfg.Outbox != nil {
		s.Outbox = u.cfg.Outbox.OutboxStats(u.clock.Now())
	}
	return s
}

// identity is the station's name at the cloud, for the status page.
func (u *Uplink) identity() string {
	if u.aliyun {
		return u.cfg.Aliyun.ProductKey + "/" + u.cfg.Aliyun.DeviceName
	}
	if u.cfg.URL == "" {
		return ""
	}
	return u.clientID
}

// Run keeps the uplink connected until ctx ends, reconnecting with
// exponential backoff and jitter (capped at ReconnectMax). It returns nil
// when ctx is cancelled; it never gives up on its own.
func (u *Uplink) Run(ctx context.Context) error {
	if !u.runMu.TryLock() {
		return edged.Errorf(edged.ECONFLICT, "uplink: already running")
	}
	defer u.runMu.Unlock()
	if u.cfg.URL == "" {
		u.log.Info("no uplink url: offline-only operation")
		<-ctx.Done()
		return nil
	}

	acks := newAcker(u)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); acks.run(ctx) }()
	defer wg.Wait()

	attempt := 0
	for {
		s := newSession(u, acks)
		up, err := s.run(ctx)
		if ctx.Err() != nil {
			u.setDisconnected()
			return nil
		}
		u.judgeRefusal(s, up, err)
		u.setDisconnected()
		u.setError(err)
		if up >= stableAfter {
			attempt = 0
		}
		delay := backoff(attempt, u.cfg.ReconnectMax)
		attempt++
		if up > 0 {
			u.log.Warn("uplink lost", "err", err, "was_up", up.Round(time.Millisecond), "retry_in", delay.Round(time.Millisecond))
		} else {
			u.log.Warn("uplink connect failed", "err", err, "retry_in", delay.Round(time.Millisecond))
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// judgeRefusal looks at a connection that ended. When it was up and sent
// events but none of its messages was acknowledged, the cloud may be
// refusing its first events message by dropping the connection (or by never
// answering it); a connection edged ended itself says nothing about that.
// Then a batch is sent in halves on the next connections, to
// single out the event; an event that still gets no PUBACK when sent alone
// on refuseAfter connections in a row is given up (counted, logged,
// released), so a drain can never turn into a reconnect loop.
func (u *Uplink) judgeRefusal(s *session, up time.Duration, err error) {
	r := &u.refusal
	if up == 0 || s.firstCount == 0 {
		return
	}
	if u.pubacked == s.startPubacked && !endedByCloud(err) {
		return // edged ended it (a store that failed a grant): no verdict
	}
	if u.pubacked != s.startPubacked {
		if r.capEvents > 0 && u.pubacked >= r.capUntil {
			r.capEvents, r.capUntil = 0, 0
		}
		if u.pubacked >= r.head {
			r.head, r.fails = 0, 0
		}
		return
	}
	if s.firstCount > 1 {
		r.capEvents, r.capUntil = s.firstCount/2, s.firstLast
		u.log.Warn("no message of the connection was acknowledged: sending the batch in halves",
			"from_seq", s.firstHead, "events", r.capEvents)
		return
	}
	if r.head == s.firstHead {
		r.fails++
	} else {
		r.head, r.fails = s.firstHead, 1
	}
	u.log.Warn("no message of the connection was acknowledged", "first_seq", s.firstHead, "times", r.fails)
}

// stableAfter is how long a connection must last for the backoff to start
// again from its first step; a broker that accepts and then drops us at
// once (say, another gateway with our client id) is not hammered.
const stableAfter = 10 * time.Second

// backoff returns the delay before reconnect attempt n (from 0): 500 ms
// doubling up to max, with jitter so that stations that lost the same broker
// do not return together.
func backoff(n int, max time.Duration) time.Duration {
	d := 500 * time.Millisecond
	for i := 0; i < n && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	return d/2 + rand.N(d/2+1)
}

func (u *Uplink) setConnected(since time.Time, reconnect bool) {
	u.mu.Lock()
	u.state = StateConnected
	u.connectedSince = since
	u.connects++
	if reconnect {
		u.reconnects++
	}
	u.mu.Unlock()
}

func (u *Uplink) setDisconnected() {
	u.mu.Lock()
	u.state = StateConnecting
	u.connectedSince = time.Time{}
	u.mu.Unlock()
}

func (u *Uplink) setError(err error) {
	if err == nil {
		return
	}
	u.mu.Lock()
	u.lastErr = err.Error()
	u.mu.Unlock()
}

func (u *Uplink) setAcked(seq uint64) {
	u.mu.Lock()
	if seq > u.lastAcked {
		u.lastAcked = seq
	}
	u.mu.Unlock()
}

// acker releases PUBACKed events from the outbox in batches, off the
// publishing path: a bbolt commit per PUBACK would cap the drain at a few
// hundred events a second. An event PUBACKed but not yet released is sent
// again after a restart, which at-least-once allows.
type acker struct {
	u       *Uplink
	mu      sync.Mutex
	pending []uint64
	// pendingMsgs is how many messages the pending seqs came in.
	pendingMsgs int
	// held counts messages PUBACKed whose events the outbox has not yet
	// released, queued or in a release commit. They count against the
	// window: a crash resends them, so the window bounds what a crash
	// repeats.
	held int
	wake chan struct{}
}

// unreleased is how many PUBACKed messages the outbox still holds events of.
func (a *acker) unreleased() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.held
}

func newAcker(u *Uplink) *acker {
	return &acker{u: u, wake: make(chan struct{}, 1)}
}

// add queues the seqs of msgs PUBACKed messages for release; it never
// blocks.
func (a *acker) add(msgs int, seqs ...uint64) {
	a.mu.Lock()
	a.pending = append(a.pending, seqs...)
	a.pendingMsgs += msgs
	a.held += msgs
	a.mu.Unlock()
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

func (a *acker) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			// Release what the broker has acknowledged, briefly, so a
			// clean stop does not resend it.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			a.flush(fctx)
			cancel()
			return
		case <-a.wake:
		}
		if err := a.flush(ctx); err != nil && ctx.Err() == nil {
			a.u.log.Error("outbox ack failed", "err", err)
			a.u.setError(fmt.Errorf("outbox ack: %w", err))
			t := time.NewTimer(time.Second)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
			select { // retry
			case a.wake <- struct{}{}:
			default:
			}
		}
	}
}

func (a *acker) flush(ctx context.Context) error {
	a.mu.Lock()
	seqs, msgs := a.pending, a.pendingMsgs
	a.pending, a.pendingMsgs = nil, 0
	a.mu.Unlock()
	if len(seqs) == 0 {
		return nil
	}
	if err := a.u.cfg.Outbox.Ack(ctx, seqs...); err != nil {
		a.mu.Lock()
		a.pending = append(seqs, a.pending...)
		a.pendingMsgs += msgs
		a.mu.Unlock()
		return err
	}
	a.mu.Lock()
	a.held -= msgs
	a.mu.Unlock()
	a.u.kickSession()
	max := uint64(0)
	for _, s := range seqs {
		max = maxU(max, s)
	}
	a.u.setAcked(max)
	return nil
}

// kickSession wakes the publishing loop after the outbox released events,
// since their room in the window is free again.
func (u *Uplink) kickSession() {
	select {
	case u.released <- struct{}{}:
	default:
	}
}

func maxU(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}
