// Package cloudemu runs in-process emulators of the MQTT services that
// stations connect to (contract §3.5): Alibaba Cloud IoT Platform
// ("aliyun"), AWS IoT Core ("aws") and any plain broker ("generic"). Each
// is a mochi broker on loopback that enforces its cloud's rules the way the
// cloud does: a client that breaks one is disconnected (or its CONNECT
// refused), and the rule is counted, so a test or a benchmark can show that
// edged never gets itself thrown off. The cloud's own back end is played by
// Publish and Subscribe, which bypass the rules as the real back end does.
//
// What a violation does, by rule name (the keys of Violations):
//
//   - "auth" (aliyun): client id not C|securemode=2,signmethod=...,timestamp=T|,
//     username not DN&PK, or password not the HMAC signature: CONNACK 5
//     (not authorized).
//   - "will" (aliyun): a CONNECT carrying a will: CONNACK 5.
//   - "keepalive" (aliyun): a keepalive outside 30–1200 s: CONNACK 5.
//   - "no_client_cert", "bad_client_cert" (aws): the TLS handshake without a
//     client certificate, or with one the emulator's CA did not sign: the
//     handshake fails, the client sees a TLS alert.
//   - "tls" (aws, aliyun): any other failed handshake, e.g. a client that
//     does not trust the emulator's CA.
//   - "qos", "retain", "topic", "slashes", "size", "rate": a PUBLISH that
//     breaks the rule: the connection is closed at once, the PUBLISH is
//     neither acknowledged nor delivered, and a will (aws, generic) is sent
//     as for any lost link.
//   - "subscribe" (aliyun: a filter outside /PK/DN/user/...; aws: more than
//     8 filters in one SUBSCRIBE or 50 subscriptions on a connection; a
//     filter with more than 7 slashes counts as "slashes"): the connection
//     is closed, not answered with a SUBACK failure, so that a wrong
//     subscription cannot go unnoticed.
//
// Each violation is counted exactly once and logged once at warn level;
// the connection it closed reads nothing more.
//
// Not emulated: AWS's 512 KiB/s per connection (the service delays, it
// does not disconnect), its one CONNECT per second per client id, and
// aliyun's /sys topics. Stats reports the peak bytes per second so a
// benchmark can show the first.
package cloudemu

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stationedge/edged"
)

// Profile names the cloud an emulator plays, as uplink.profile does.
type Profile string

// Profiles of contract §3.5.
const (
	Generic Profile = "generic"
	AWS     Profile = "aws"
	Aliyun  Profile = "aliyun"
)

// Rule names, the keys of Cloud.Violations.
const (
	RuleAuth          = "auth"
	RuleWill          = "will"
	RuleKeepalive     = "keepalive"
	RuleNoClientCert  = "no_client_cert"
	RuleBadClientCert = "bad_client_cert"
	RuleTLS           = "tls"
	RuleQoS           = "qos"
	RuleRetain        = "retain"
	RuleTopic         = "topic"
	RuleSlashes       = "slashes"
	RuleSize          = "size"
	RuleRate          = "rate"
	RuleSubscribe     = "subscribe"
)

// The clouds' limits (contract §3.5 and the vendors' quotas pages).
const (
	AWSMaxPublishRate     = 100
	AWSMaxMessageBytes    = 128 * 1024
	AWSMaxSlashes         = 7
	AWSMaxFiltersPerSub   = 8  // topic filters in one SUBSCRIBE
	AWSMaxSubscriptions   = 50 // subscriptions of one connection
	AliyunMaxPublishRate  = 30
	AliyunMaxMessageBytes = 256 * 1024
	AliyunMinKeepalive    = 30
	AliyunMaxKeepalive    = 1200
)

// Options configure an emulator.
type Options struct {
	// Profile is the cloud to play; "" means generic.
	Profile Profile
	// Dir is where the CA, its key and the thing's certificate are
	// written (required for aws and aliyun). An emulator started again on
	// the same Dir keeps the CA, so a station's ca_file stays valid.
	Dir string
	// Addr is the TCP address to listen on; "" means 127.0.0.1:0. Set it
	// to restart an emulator on the port a station already dials.
	Addr string

	// ProductKey, DeviceName and DeviceSecret are the station's device
	// triple on aliyun (required there).
	ProductKey, DeviceName, DeviceSecret string

	// MaxPublishRate is the most PUBLISH packets one connection may send
	// in any 1 s window; 0 means the cloud's limit (aws 100, aliyun 30,
	// generic none), a negative value means none. The window is measured
	// as the emulator reads each PUBLISH, so delays on the way can only
	// bunch publishes up: a sender ticking at exactly N/s is seen at N+1
	// in some window, which is why the profiles pace below the limit.
	MaxPublishRate int
	// MaxMessageBytes is the largest PUBLISH payload; 0 means the cloud's
	// limit (aws 128 KiB, aliyun 256 KiB, generic none), negative none.
	MaxMessageBytes int

	// Logger receives one line per violation; nil discards.
	Logger *slog.Logger
}

// Stats are counters of what clients sent, for benchmarks.
type Stats struct {
	Connects  int   // successful CONNECTs
	Publishes int   // PUBLISH packets read from clients, violating ones included
	Bytes     int64 // their payload bytes
	// PeakRate is the most PUBLISH packets read in any 1 s window on one
	// connection; PeakBytesPerSecond the most payload bytes.
	PeakRate           int
	PeakBytesPerSecond int64
}

// Cloud is a running emulator.
type Cloud struct {
	o     Options
	log   *slog.Logger
	srv   *mochi.Server
	ln    net.Listener
	hl    *handshakeListener // nil for generic
	pki   *pki               // nil for generic
	url   string
	rules rules

	mu         sync.Mutex
	violations map[string]int
	clientIDs  []string
	windows    map[*mochi.Client]*window
	stats      Stats

	// Observations for Subscribe, handed to one goroutine so callbacks run
	// in order of arrival and never block the broker.
	qmu    sync.Mutex
	queue  []observed
	notify chan struct{}
	subID  atomic.Int32

	closeOnce sync.Once
	closeErr  error
	done      chan struct{}
	wg        sync.WaitGroup
}

type observed struct {
	fn      func(topic string, payload []byte)
	topic   string
	payload []byte
}

// rules is what a profile enforces.
type rules struct {
	tls, clientCert bool
	aliyun          bool // signed login, user topics, no will, keepalive range
	noRetain        bool
	maxQoS          byte
	maxSlashes      int // 0: no limit
	maxFilters      int // per SUBSCRIBE; 0: no limit
	maxSubs         int // per connection; 0: no limit
	rate            int // 0: no limit
	size            int // 0: no limit
}

func rulesFor(o Options) (rules, error) {
	var r rules
	switch o.Profile {
	case Generic, "":
		r = rules{maxQoS: 2}
	case AWS:
		r = rules{tls: true, clientCert: true, maxQoS: 1, maxSlashes: AWSMaxSlashes,
			maxFilters: AWSMaxFiltersPerSub, maxSubs: AWSMaxSubscriptions,
			rate: AWSMaxPublishRate, size: AWSMaxMessageBytes}
	case Aliyun:
		if o.ProductKey == "" || o.DeviceName == "" || o.DeviceSecret == "" {
			return r, edged.Errorf(edged.EINVALID, "cloudemu: aliyun needs ProductKey, DeviceName and DeviceSecret")
		}
		r = rules{tls: true, aliyun: true, noRetain: true, maxQoS: 1,
			rate: AliyunMaxPublishRate, size: AliyunMaxMessageBytes}
	default:
		return r, edged.Errorf(edged.EINVALID, "cloudemu: unknown profile %q", o.Profile)
	}
	if o.MaxPublishRate != 0 {
		r.rate = max(o.MaxPublishRate, 0)
	}
	if o.MaxMessageBytes != 0 {
		r.size = max(o.MaxMessageBytes, 0)
	}
	return r, nil
}

// Start runs an emulator of o.Profile on loopback.
func Start(o Options) (*Cloud, error) {
	if o.Profile == "" {
		o.Profile = Generic
	}
	r, err := rulesFor(o)
	if err != nil {
		return nil, err
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Cloud{o: o, rules: r, log: log.With("system", "cloudemu", "profile", string(o.Profile)),
		violations: map[string]int{}, windows: map[*mochi.Client]*window{},
		notify: make(chan struct{}, 1), done: make(chan struct{})}

	if r.tls {
		if c.pki, err = newPKI(o.Dir, r.clientCert); err != nil {
			return nil, fmt.Errorf("cloudemu: %w", err)
		}
	}
	addr := o.Addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	if c.ln, err = net.Listen("tcp", addr); err != nil {
		return nil, fmt.Errorf("cloudemu: listen: %w", err)
	}
	ln := c.ln
	scheme := "tcp"
	if r.tls {
		cfg := &tls.Config{Certificates: []tls.Certificate{c.pki.server}, MinVersion: tls.VersionTLS12}
		if r.clientCert {
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
			cfg.ClientCAs = c.pki.pool
			// What AWS IoT Core negotiates on port 443; a client that
			// offers no ALPN is served as on 8883.
			cfg.NextProtos = []string{"x-amzn-mqtt-ca"}
		}
		c.hl = newHandshakeListener(c.ln, cfg, func(rule string, err error) { c.count(rule, "", err.Error()) })
		ln = c.hl
		scheme = "tls"
	}
	c.url = scheme + "://" + c.ln.Addr().String()

	caps := mochi.NewDefaultServerCapabilities()
	caps.MaximumQos = r.maxQoS
	if o.Profile == AWS {
		caps.MaximumSessionExpiryInterval = 3600 // AWS keeps a persistent session 1 h by default
	}
	c.srv = mochi.New(&mochi.Options{InlineClient: true, Capabilities: caps,
		Logger: slog.New(slog.DiscardHandler)})
	if err := c.srv.AddHook(&hook{c: c}, nil); err != nil {
		c.ln.Close()
		return nil, fmt.Errorf("cloudemu: %w", err)
	}
	if err := c.srv.AddListener(listeners.NewNet("cloud", ln)); err != nil {
		ln.Close()
		return nil, fmt.Errorf("cloudemu: %w", err)
	}
	if err := c.srv.Serve(); err != nil {
		c.srv.Close()
		return nil, fmt.Errorf("cloudemu: %w", err)
	}
	c.wg.Add(1)
	go c.dispatch()
	return c, nil
}

// URL is the address a station dials: tls://127.0.0.1:PORT for aws and
// aliyun, tcp://127.0.0.1:PORT for generic.
func (c *Cloud) URL() string { return c.url }

// Addr is the host:port the emulator listens on (for a proxy in front).
func (c *Cloud) Addr() string { return c.ln.Addr().String() }

// CAFile is the PEM file of the CA that signed the server certificate (a
// station's uplink.ca_file); "" for generic.
func (c *Cloud) CAFile() string {
	if c.pki == nil {
		return ""
	}
	return c.pki.caFile
}

// ClientCertFile is the PEM certificate of the thing, signed by the
// emulator's CA (aws only; "" otherwise).
func (c *Cloud) ClientCertFile() string {
	if c.pki == nil {
		return ""
	}
	return c.pki.clientCertFile
}

// ClientKeyFile is the PEM private key of ClientCertFile (aws only).
func (c *Cloud) ClientKeyFile() string {
	if c.pki == nil {
		return ""
	}
	return c.pki.clientKeyFile
}

// Violations returns, by rule name, how many connections were refused or
// closed for breaking that rule. A well-behaved station leaves it empty.
func (c *Cloud) Violations() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int, len(c.violations))
	for k, v := range c.violations {
		out[k] = v
	}
	return out
}

// Connects is the number of successful CONNECTs so far.
func (c *Cloud) Connects() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats.Connects
}

// ClientIDs are the client ids of the successful CONNECTs, as sent, in
// order (on aliyun each carries its timestamp, so a test can see that
// every connect signed afresh).
func (c *Cloud) ClientIDs() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.clientIDs)
}

// Stats returns the counters of what clients sent.
func (c *Cloud) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}

// Publish sends payload on topic to the subscribed clients at QoS 1, as
// the cloud's back end does (not retained, no rule applies).
func (c *Cloud) Publish(topic string, payload []byte) error {
	select {
	case <-c.done:
		return edged.Errorf(edged.EUNAVAILABLE, "cloudemu: closed")
	default:
	}
	if err := c.srv.Publish(topic, payload, false, 1); err != nil {
		return fmt.Errorf("cloudemu: publish %s: %w", topic, err)
	}
	return nil
}

// Subscribe calls fn with every message that clients publish on a topic
// matching filter, including retained messages already held and wills,
// but not the cloud's own Publish.
// All callbacks of a Cloud run on one goroutine in order of arrival, so fn
// may block briefly or call Publish without stalling the broker.
func (c *Cloud) Subscribe(filter string, fn func(topic string, payload []byte)) error {
	id := int(c.subID.Add(1))
	err := c.srv.Subscribe(filter, id, func(_ *mochi.Client, _ packets.Subscription, pk packets.Packet) {
		if pk.Origin == mochi.InlineClientId {
			return // the cloud's own Publish, not the station's
		}
		c.qmu.Lock()
		c.queue = append(c.queue, observed{fn: fn, topic: pk.TopicName, payload: slices.Clone(pk.Payload)})
		c.qmu.Unlock()
		select {
		case c.notify <- struct{}{}:
		default:
		}
	})
	if err != nil {
		return fmt.Errorf("cloudemu: subscribe %s: %w", filter, err)
	}
	return nil
}

// dispatch runs the Subscribe callbacks. Once Close has stopped the
// broker it delivers what is still queued and returns: every message the
// emulator acknowledged reaches the subscribers, as a real cloud's rules
// engine gets every message its broker acknowledged.
func (c *Cloud) dispatch() {
	defer c.wg.Done()
	for {
		closed := false
		select {
		case <-c.done:
			closed = true
		case <-c.notify:
		}
		for {
			c.qmu.Lock()
			batch := c.queue
			c.queue = nil
			c.qmu.Unlock()
			if len(batch) == 0 {
				break
			}
			for _, m := range batch {
				m.fn(m.topic, m.payload)
			}
		}
		if closed {
			return
		}
	}
}

// Retained returns the retained message on topic, if the cloud holds one
// (aws and generic; aliyun never does).
func (c *Cloud) Retained(topic string) ([]byte, bool) {
	for _, pk := range c.srv.Topics.Messages(topic) {
		if pk.TopicName == topic {
			return slices.Clone(pk.Payload), true
		}
	}
	return nil, false
}

// Kick closes every client connection as a lost link would, without
// counting a violation: wills are sent and persistent sessions kept. It
// returns how many connections it closed.
func (c *Cloud) Kick() int {
	n := 0
	for _, cl := range c.srv.Clients.GetAll() {
		if cl.Net.Inline || cl.Closed() {
			continue
		}
		cl.Stop(errKicked)
		n++
	}
	return n
}

var (
	errKicked  = errors.New("kicked by the cloud")
	errClosing = errors.New("the cloud is closing")
)

// Close stops the emulator and closes every connection (without wills).
// Subscribe callbacks get every message acknowledged before it, then no
// more.
func (c *Cloud) Close() error {
	c.closeOnce.Do(func() {
		// mochi's Close stops the clients registered when it begins,
		// then waits for every client: one whose CONNECT was still
		// being processed then (a station reconnecting just as the
		// cloud goes away) would be waited for forever, its connection
		// open. So latecomers are stopped until Close returns.
		closed := make(chan error, 1)
		go func() { closed <- c.srv.Close() }()
		tick := time.NewTicker(10 * time.Millisecond)
		for waiting := true; waiting; {
			select {
			case c.closeErr = <-closed:
				waiting = false
			case <-tick.C:
				for _, cl := range c.srv.Clients.GetAll() {
					if !cl.Net.Inline && !cl.Closed() {
						cl.Stop(errClosing)
					}
				}
			}
		}
		tick.Stop()
		if c.hl != nil {
			c.hl.Close()
		} else {
			c.ln.Close()
		}
		close(c.done)
		c.wg.Wait()
	})
	return c.closeErr
}

// count records one violation of rule and logs it once.
func (c *Cloud) count(rule, client, detail string) {
	c.mu.Lock()
	c.violations[rule]++
	c.mu.Unlock()
	c.log.Warn("client broke a cloud rule", "rule", rule, "client", client, "detail", detail)
}

// window holds one connection's publishes of the last second.
type window struct {
	times []time.Time
	sizes []int
	bytes int64
}

// add records a publish of n bytes at now and returns how many publishes
// and bytes the last second holds, this one included.
func (w *window) add(now time.Time, n int) (int, int64) {
	cut := now.Add(-time.Second)
	i := 0
	for i < len(w.times) && !w.times[i].After(cut) {
		w.bytes -= int64(w.sizes[i])
		i++
	}
	w.times = append(w.times[i:], now)
	w.sizes = append(w.sizes[i:], n)
	w.bytes += int64(n)
	return len(w.times), w.bytes
}

// hook enforces the profile's rules inside mochi.
type hook struct {
	mochi.HookBase
	c *Cloud
}

func (h *hook) ID() string { return "cloudemu" }

func (h *hook) Provides(b byte) bool {
	switch b {
	case mochi.OnConnectAuthenticate, mochi.OnACLCheck, mochi.OnPacketRead,
		mochi.OnSessionEstablished, mochi.OnDisconnect:
		return true
	}
	return false
}

// OnConnectAuthenticate refuses a CONNECT that breaks a connect rule; it is
// the only auth hook, so its answer is final.
func (h *hook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	c, r := h.c, h.c.rules
	id := pk.Connect.ClientIdentifier
	if r.aliyun {
		if err := checkAliyunLogin(c.o.ProductKey, c.o.DeviceName, c.o.DeviceSecret,
			id, string(pk.Connect.Username), pk.Connect.Password); err != nil {
			c.count(RuleAuth, id, err.Error())
			return false
		}
		if pk.Connect.WillFlag {
			c.count(RuleWill, id, "the service has no will on mqtt 3.1.1")
			return false
		}
		if ka := pk.Connect.Keepalive; ka < AliyunMinKeepalive || ka > AliyunMaxKeepalive {
			c.count(RuleKeepalive, id, fmt.Sprintf("keepalive %d s outside 30-1200 s", ka))
			return false
		}
		// The service allows one connection per device: a new one
		// takes over whatever client id it carries (the timestamp
		// changes at every connect anyway).
		cl.ID = c.o.ProductKey + "&" + c.o.DeviceName
	}
	c.mu.Lock()
	c.clientIDs = append(c.clientIDs, id)
	c.mu.Unlock()
	return true
}

// OnACLCheck allows everything: the rules are enforced in OnPacketRead,
// where a violation can close the connection deterministically.
func (h *hook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool { return true }

func (h *hook) OnSessionEstablished(cl *mochi.Client, pk packets.Packet) {
	h.c.mu.Lock()
	h.c.stats.Connects++
	h.c.windows[cl] = &window{}
	h.c.mu.Unlock()
}

func (h *hook) OnDisconnect(cl *mochi.Client, err error, expire bool) {
	h.c.mu.Lock()
	delete(h.c.windows, cl)
	h.c.mu.Unlock()
}

// errViolation is the stop cause of a connection closed for a rule.
var errViolation = errors.New("cloud rule broken")

// OnPacketRead checks each PUBLISH and SUBSCRIBE before mochi processes
// it. On a violation it counts, closes the connection and rejects the
// packet, so it is neither acknowledged nor delivered and the client's
// read loop ends: one count per violation.
func (h *hook) OnPacketRead(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	var rule, detail string
	switch pk.FixedHeader.Type {
	case packets.Publish:
		rule, detail = h.checkPublish(cl, pk)
	case packets.Subscribe:
		rule, detail = h.checkSubscribe(cl, pk)
	}
	if rule == "" {
		return pk, nil
	}
	h.c.count(rule, cl.ID, detail)
	cl.Stop(fmt.Errorf("%w: %s", errViolation, rule))
	return pk, packets.ErrRejectPacket
}

func (h *hook) checkPublish(cl *mochi.Client, pk packets.Packet) (string, string) {
	c, r := h.c, h.c.rules
	n := len(pk.Payload)
	c.mu.Lock()
	w := c.windows[cl]
	if w == nil { // not yet seen by OnSessionEstablished: cannot happen, but never crash
		w = &window{}
		c.windows[cl] = w
	}
	count, bytes := w.add(time.Now(), n)
	c.stats.Publishes++
	c.stats.Bytes += int64(n)
	c.stats.PeakRate = max(c.stats.PeakRate, count)
	c.stats.PeakBytesPerSecond = max(c.stats.PeakBytesPerSecond, bytes)
	c.mu.Unlock()

	topic := pk.TopicName
	switch {
	case pk.FixedHeader.Qos > r.maxQoS:
		return RuleQoS, fmt.Sprintf("qos %d on %s", pk.FixedHeader.Qos, topic)
	case r.noRetain && pk.FixedHeader.Retain:
		return RuleRetain, "retained publish on " + topic
	case r.aliyun && !aliyunTopicOK(c.o.ProductKey, c.o.DeviceName, topic, false):
		return RuleTopic, "publish on " + topic
	case r.maxSlashes > 0 && strings.Count(topic, "/") > r.maxSlashes:
		return RuleSlashes, "publish on " + topic
	case r.size > 0 && n > r.size:
		return RuleSize, fmt.Sprintf("payload of %d bytes on %s, limit %d", n, topic, r.size)
	case r.rate > 0 && count > r.rate:
		return RuleRate, fmt.Sprintf("%d publishes within 1 s, limit %d", count, r.rate)
	}
	return "", ""
}

func (h *hook) checkSubscribe(cl *mochi.Client, pk packets.Packet) (string, string) {
	c, r := h.c, h.c.rules
	if r.maxFilters > 0 && len(pk.Filters) > r.maxFilters {
		return RuleSubscribe, fmt.Sprintf("%d filters in one subscribe, limit %d", len(pk.Filters), r.maxFilters)
	}
	if r.maxSubs > 0 {
		n := cl.State.Subscriptions.Len()
		for _, f := range pk.Filters {
			if _, ok := cl.State.Subscriptions.Get(f.Filter); !ok {
				n++
			}
		}
		if n > r.maxSubs {
			return RuleSubscribe, fmt.Sprintf("%d subscriptions, limit %d", n, r.maxSubs)
		}
	}
	for _, f := range pk.Filters {
		if r.aliyun && !aliyunTopicOK(c.o.ProductKey, c.o.DeviceName, f.Filter, true) {
			return RuleSubscribe, "subscribe to " + f.Filter
		}
		if r.maxSlashes > 0 && strings.Count(f.Filter, "/") > r.maxSlashes {
			return RuleSlashes, "subscribe to " + f.Filter
		}
	}
	return "", ""
}
