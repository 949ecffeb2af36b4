package uplink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stationedge/edged"
)

// session is one connection to the cloud broker, with its own paho client.
// It ends at the first sign of trouble; Run then starts a fresh one, which
// resends from the oldest event not yet PUBACKed.
type session struct {
	u     *Uplink
	acks  *acker
	ctx   context.Context // cancelled when the session ends
	lost  chan error      // connection lost (paho) or a down message failed
	down  chan mqtt.Message
	since time.Time

	// failedAt is the arrival index of the first down message that could
	// not be made durable: later messages of this connection are left
	// unacknowledged too, so the broker redelivers them in their original
	// order. heldAt is the first one the store could not take now: from it
	// on the connection's down messages are handled serially.
	failedAt, heldAt atomic.Int64

	window []inflight

	// published is the Version of each device's state as last published on
	// this connection; due holds devices whose state moved since.
	published map[string]uint64
	// statesAt is the StateSource version the states read so far are
	// current as of; zero until every state was read once.
	statesAt uint64
	renterOf map[string]string // device -> renter topic last published to
	due      []edged.DeviceState
	buf      []edged.Event // events read from the outbox, not yet sent
	sentUpTo uint64        // highest seq handed to paho on this connection

	// startPubacked is u.pubacked when the connection came up; first is
	// the first events message of the connection (head seq, last seq,
	// count), for judging a refusal when it ends.
	startPubacked        uint64
	firstHead, firstLast uint64
	firstCount           int
	statesFirst          bool // aliyun: every state before the backlog

	// The live lane (docs/uplink.md, "Live traffic first"). liveOn while
	// the drain is behind the backlog the connection found (the outbox's
	// last seq then, liveFrom); liveSeen is the highest seq the lane has
	// looked at, liveScan set when the outbox grew since; live holds the
	// fresh rental and command events still to send ahead.
	liveOn, liveScan   bool
	liveFrom, liveSeen uint64
	live               []edged.Event
}

// inflight is a QoS 1 publish awaiting its PUBACK. seqs are the events it
// carries (none for a state or presence).
type inflight struct {
	tok  mqtt.Token
	seqs []uint64
	sent time.Time
}

func newSession(u *Uplink, acks *acker) *session {
	return &session{
		u: u, acks: acks,
		lost:      make(chan error, 1),
		down:      make(chan mqtt.Message, 64),
		published: map[string]uint64{},
		renterOf:  map[string]string{},
	}
}

// Timings derived from the keepalive. paho only detects a dead link by a
// missing PINGRESP; when the link stalls with a full send buffer its ping
// write blocks forever, so the session also gives up when the oldest
// PUBACK is overdue.
func (u *Uplink) pingTimeout() time.Duration {
	return max(u.cfg.KeepAlive/2, time.Second)
}

func (u *Uplink) ackTimeout() time.Duration {
	return u.cfg.KeepAlive + u.pingTimeout() + time.Second
}

// writeTimeout bounds a blocked Publish and a blocked socket write. Our
// messages are small and the window bounds what is in flight, so a write
// that waits this long means the link is gone; it is short because a
// Publish racing a connection loss waits for it in full.
func (u *Uplink) writeTimeout() time.Duration {
	return min(u.ackTimeout(), 5*time.Second)
}

func (u *Uplink) connectTimeout() time.Duration {
	return max(2*u.cfg.KeepAlive, 10*time.Second)
}

// signal reports a reason for the session to end; the first one wins.
func (s *session) signal(err error) {
	select {
	case s.lost <- err:
	default:
	}
}

// run connects and serves until the connection fails or ctx ends. It
// returns how long the connection was up (0: never connected) and why it
// ended.
func (s *session) run(parent context.Context) (time.Duration, error) {
	u := s.u
	ctx, cancel := context.WithCancel(parent)
	s.ctx = ctx
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); s.handleDown() }()
	defer wg.Wait() // after cancel, below

	l := login{clientID: u.clientID, username: u.cfg.Username, password: u.cfg.Password}
	if u.aliyun {
		a := u.cfg.Aliyun
		l = aliyunLogin(u.clientID, a.ProductKey, a.DeviceName, a.DeviceSecret, time.Now())
	}
	opts := mqtt.NewClientOptions().
		AddBroker(u.broker).
		SetClientID(l.clientID).
		SetUsername(l.username).
		SetPassword(l.password).
		SetProtocolVersion(4).
		SetCleanSession(false).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(u.cfg.KeepAlive).
		SetPingTimeout(u.pingTimeout()).
		SetConnectTimeout(u.connectTimeout()).
		SetWriteTimeout(u.writeTimeout()).
		SetOrderMatters(true).
		SetAutoAckDisabled(true).
		SetDefaultPublishHandler(s.onMessage).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			s.signal(&lostError{err})
		})
	if u.retain {
		// aliyun has no will; its own device status messages report a
		// lost link.
		opts.SetBinaryWill(u.topics.gateway, []byte(`{"online":false}`), 1, true)
	}
	if u.tls != nil {
		opts.SetTLSConfig(u.tls)
	}
	if quickAckDial(u.broker) {
		opts.SetCustomOpenConnectionFn(openConn)
	}
	client := mqtt.NewClient(opts)

	defer cancel() // before wg.Wait: the down worker returns
	if err := wait(ctx, client.Connect(), u.connectTimeout()+time.Second); err != nil {
		client.Disconnect(0)
		return 0, fmt.Errorf("connect: %w", err)
	}
	s.since = u.clock.Now()
	start := time.Now()
	err := s.serve(ctx, client)
	up := time.Since(start)
	cancel() // a handler still running returns; its message stays unacked
	if parent.Err() != nil {
		s.goodbye(client)
		return up, nil
	}
	client.Disconnect(0)
	return up, err
}

// goodbye marks the gateway offline on a clean stop: a DISCONNECT
// suppresses the will, so the retained presence is replaced explicitly;
// aliyun has neither, so there it is the only offline message. It waits
// briefly for the PUBACK, and for a token of the pacer.
func (s *session) goodbye(client mqtt.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if s.pace(ctx) == nil {
		tok := client.Publish(s.u.topics.gateway, 1, s.u.retain, []byte(`{"online":false}`))
		s.u.sent.messages.Add(1)
		_ = wait(ctx, tok, 2*time.Second)
	}
	client.Disconnect(250)
}

// lostError is a connection paho reports lost.
type lostError struct{ err error }

func (e *lostError) Error() string { return "connection lost: " + e.err.Error() }
func (e *lostError) Unwrap() error { return e.err }

// publishError is a publish that failed (paho gave up on it).
type publishError struct{ err error }

func (e *publishError) Error() string { return "publish: " + e.err.Error() }
func (e *publishError) Unwrap() error { return e.err }

// errStalled is a PUBACK overdue.
var errStalled = errors.New("link stalled")

// endedByCloud reports whether a connection ended because of the cloud or
// the link (lost, a publish failed, a PUBACK overdue), not because edged
// ended it (a down message it could not store, a stop).
func endedByCloud(err error) bool {
	var l *lostError
	var p *publishError
	return errors.As(err, &l) || errors.As(err, &p) || errors.Is(err, errStalled)
}

func (s *session) serve(ctx context.Context, client mqtt.Client) error {
	u := s.u
	sub := client.SubscribeMultiple(u.downTopics(), nil)
	if err := s.wait(ctx, sub, u.ackTimeout()); err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	for topic, code := range sub.(*mqtt.SubscribeToken).Result() {
		if code == 0x80 {
			// Events still flow; the next connection tries again.
			u.log.Error("cloud broker refused subscription", "topic", topic)
			u.setError(fmt.Errorf("subscribe %s: refused by the broker", topic))
		}
	}
	if err := s.publish(ctx, client, u.topics.gateway, u.retain, u.presence(), nil); err != nil {
		return err
	}
	u.setConnected(s.since, u.hadConnection)
	u.hadConnection = true
	u.log.Info("uplink connected", "url", redact(u.broker), "client_id", u.clientID, "profile", u.cfg.Profile, "resend_from", u.pubacked+1)

	s.sentUpTo = u.pubacked
	s.startPubacked = u.pubacked
	s.liveFrom = u.cfg.Outbox.OutboxStats(u.clock.Now()).LastSeq
	s.liveSeen = s.liveFrom
	s.liveOn = s.liveFrom > s.sentUpTo
	s.refreshStates() // every device once on every new connection
	s.statesFirst = u.aliyun
	moreEvents := true
	liveTurn := true
	liveLast := false // the last message was a live one
	watchdog := time.NewTimer(time.Hour)
	defer watchdog.Stop()
	for {
		if err := s.retire(); err != nil {
			return err
		}
		if len(s.due) == 0 {
			s.statesFirst = false
		}
		if err := s.scanLive(ctx); err != nil {
			return err
		}
		others := len(s.due) > 0 || (moreEvents && !s.statesFirst)
		if len(s.live) > 0 && s.room() > 0 && (!liveLast || !others) {
			// Fresh results go before the backlog and before states, but
			// every other message at most while those wait: a burst of
			// rentals cannot stall the drain, which alone ends the lane.
			if err := s.publishLive(ctx, client); err != nil {
				return err
			}
			liveLast = true
			continue
		}
		liveLast = false
		// One message per turn: live state (with its renter messages) or
		// one events batch, taking turns while both wait, so neither
		// starves the other and every publish waits its token in order.
		wantLive := len(s.due) > 0
		wantEvents := moreEvents && !s.statesFirst
		if s.room() > 0 && (wantLive || wantEvents) {
			var err error
			if wantLive && (liveTurn || !wantEvents) {
				err = s.publishStates(ctx, client)
				liveTurn = false
			} else {
				moreEvents, err = s.publishEvents(ctx, client)
				liveTurn = true
			}
			if err != nil {
				return err
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case err := <-s.lost:
				return err
			case <-u.cfg.Outbox.Notify():
				moreEvents, s.liveScan = true, true
			case <-u.cfg.States.StatesChanged():
				s.refreshStates()
			default:
			}
			continue
		}

		var head <-chan struct{}
		if len(s.window) > 0 {
			head = s.window[0].tok.Done()
			d := u.ackTimeout() - time.Since(s.window[0].sent)
			if d <= 0 {
				return fmt.Errorf("no PUBACK within %v: %w", u.ackTimeout(), errStalled)
			}
			resetTimer(watchdog, d)
		} else {
			resetTimer(watchdog, time.Hour)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-s.lost:
			return err
		case <-head:
		case <-u.released:
		case <-u.cfg.Outbox.Notify():
			moreEvents, s.liveScan = true, true
		case <-u.cfg.States.StatesChanged():
			s.refreshStates()
		case <-watchdog.C:
		}
	}
}

func resetTimer(t *time.Timer, d time.Duration) {
	t.Stop()
	select {
	case <-t.C:
	default:
	}
	t.Reset(d)
}

// retire takes completed publishes off the head of the window, in order,
// and hands PUBACKed events to the acker. A publish that failed ends the
// session: the next one resends from the oldest unacknowledged event.
func (s *session) retire() error {
	var seqs []uint64
	msgs := 0
	defer func() {
		if len(seqs) > 0 {
			s.u.pubacked = seqs[len(seqs)-1]
			s.acks.add(msgs, seqs...)
		}
	}()
	for len(s.window) > 0 {
		f := s.window[0]
		select {
		case <-f.tok.Done():
		default:
			return nil
		}
		if err := f.tok.Error(); err != nil {
			return &publishError{err}
		}
		if len(f.seqs) > 0 {
			seqs = append(seqs, f.seqs...)
			msgs++
		}
		s.window[0] = inflight{}
		s.window = s.window[1:]
	}
	return nil
}

// room is how many more publishes may start: the window holds those
// awaiting their PUBACK and those PUBACKed but not yet released from the
// outbox, so a crash repeats at most a window of events.
func (s *session) room() int {
	r := s.u.cfg.Window - len(s.window) - s.acks.unreleased()
	if c := s.u.inflightCap; c > 0 {
		r = min(r, c-len(s.window))
	}
	return r
}

// pace waits for a token of the pacer (max_publish_rate), counting the
// publishes it held back.
func (s *session) pace(ctx context.Context) error {
	waited := false
	defer func() {
		if waited {
			s.u.sent.waits.Add(1)
		}
	}()
	for {
		d := s.u.pacer.reserve(time.Now())
		if d == 0 {
			return nil
		}
		waited = true
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case err := <-s.lost:
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// publish sends one QoS 1 message, once the pacer allows, and puts it in
// the window. seqs are the events it carries.
func (s *session) publish(ctx context.Context, client mqtt.Client, topic string, retained bool, payload []byte, seqs []uint64) error {
	if err := s.waitInflight(ctx); err != nil {
		return err
	}
	if err := s.pace(ctx); err != nil {
		return err
	}
	select {
	case err := <-s.lost: // do not start a Publish that would wait for a dead link
		return err
	default:
	}
	tok := client.Publish(topic, 1, retained, payload)
	s.u.sent.messages.Add(1)
	s.window = append(s.window, inflight{tok: tok, seqs: seqs, sent: time.Now()})
	// An immediate failure (not connected, write timeout) ends the
	// session without waiting for the window to reach it.
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return &publishError{err}
		}
	default:
	}
	return nil
}

// waitInflight holds a publish while inflightCap publishes await their
// PUBACK (only when the rate is limited).
func (s *session) waitInflight(ctx context.Context) error {
	limit := s.u.inflightCap
	if limit <= 0 {
		return nil
	}
	for {
		if err := s.retire(); err != nil {
			return err
		}
		if len(s.window) < limit {
			return nil
		}
		d := s.u.ackTimeout() - time.Since(s.window[0].sent)
		if d <= 0 {
			return fmt.Errorf("no PUBACK within %v: %w", s.u.ackTimeout(), errStalled)
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case err := <-s.lost:
			t.Stop()
			return err
		case <-s.window[0].tok.Done():
		case <-t.C:
		}
		t.Stop()
	}
}

// skip releases an event that is never sent, in its place in the window's
// order, and counts it as refused.
func (s *session) skip(ev edged.Event, why string, size int) {
	s.u.sent.refused.Add(1)
	s.u.log.Error("event not sent: "+why, "seq", ev.Seq, "type", ev.Type, "bytes", size, "max_message_kb", s.u.cfg.MaxMessageKB)
	s.u.setError(fmt.Errorf("event %d not sent: %s", ev.Seq, why))
	s.window = append(s.window, inflight{tok: doneToken{}, seqs: []uint64{ev.Seq}, sent: time.Now()})
	s.sentUpTo = ev.Seq
}

// doneToken is a completed paho token, for a skipped event's place in the
// window.
type doneToken struct{}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

func (doneToken) Wait() bool                     { return true }
func (doneToken) WaitTimeout(time.Duration) bool { return true }
func (doneToken) Done() <-chan struct{}          { return closedChan }
func (doneToken) Error() error                   { return nil }

// batchLimit is how many events the next message may carry when it
// starts at seq: batch_events, or fewer while a refused event is being
// looked for.
func (s *session) batchLimit(seq uint64) int {
	r := s.u.refusal
	if r.capEvents > 0 && seq <= r.capUntil {
		return min(r.capEvents, s.u.batch)
	}
	return s.u.batch
}

// publishEvents sends the next events message: one event, or with
// batch_events > 1 a batch of up to that many in seq order, cut before the
// payload would pass max_message_kb. It reports whether the outbox may
// hold more (false once a read came back empty).
func (s *session) publishEvents(ctx context.Context, client mqtt.Client) (bool, error) {
	u := s.u
	var (
		envs  [][]byte
		seqs  []uint64
		limit int
		size  int
	)
	batched := u.batch > 1
	overhead := 0
	if batched {
		st, _ := json.Marshal(u.cfg.StationID)
		overhead = len(`{"station":,"events":[]}`) + len(st)
	}
	more := true
	for limit == 0 || len(seqs) < limit {
		if len(s.buf) == 0 {
			after := s.sentUpTo
			if len(seqs) > 0 {
				after = seqs[len(seqs)-1]
			}
			evs, err := u.cfg.Outbox.Pending(ctx, after, max(u.cfg.Window*4, 256, u.batch))
			if err != nil {
				return true, fmt.Errorf("outbox: %w", err)
			}
			if len(evs) == 0 {
				more = false
				s.liveOn, s.live = false, nil // caught up: nothing to overtake
				break
			}
			s.buf = evs
		}
		ev := s.buf[0]
		if ev.Seq <= s.sentUpTo || (len(seqs) > 0 && ev.Seq <= seqs[len(seqs)-1]) {
			s.buf = s.buf[1:]
			continue // the outbox must return seqs above after; be safe
		}
		if len(seqs) == 0 {
			if u.refusal.fails >= refuseAfter && u.refusal.head == ev.Seq {
				s.buf = s.buf[1:]
				u.refusal.head, u.refusal.fails = 0, 0
				s.skip(ev, fmt.Sprintf("refused by the cloud: no PUBACK on %d connections in a row when sent alone", refuseAfter), 0)
				return true, nil
			}
			limit = s.batchLimit(ev.Seq)
		}
		env, err := u.envelope(ev)
		if err != nil {
			return true, fmt.Errorf("encode event %d: %w", ev.Seq, err)
		}
		grown := size + len(env)
		if len(envs) > 0 {
			grown++ // the comma
		}
		if overhead+grown > u.maxBytes {
			if len(envs) == 0 {
				// Too big on its own (device events are far smaller): it
				// can never be sent, so it must not stall the drain.
				s.buf = s.buf[1:]
				s.skip(ev, "larger than max_message_kb", len(env))
				return true, nil
			}
			break // cut before it
		}
		s.buf = s.buf[1:]
		envs = append(envs, env)
		seqs = append(seqs, ev.Seq)
		size = grown
	}
	if len(seqs) == 0 {
		return more, nil
	}
	payload := envs[0]
	if batched {
		b := make([]byte, 0, overhead+size)
		b = append(b, `{"station":`...)
		b, _ = appendJSON(b, u.cfg.StationID)
		b = append(b, `,"events":[`...)
		for i, e := range envs {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, e...)
		}
		b = append(b, "]}"...)
		payload = b
	}
	if s.firstCount == 0 {
		s.firstHead, s.firstLast, s.firstCount = seqs[0], seqs[len(seqs)-1], len(seqs)
	}
	if err := s.publish(ctx, client, u.topics.events, false, payload, seqs); err != nil {
		return true, err
	}
	u.sent.events.Add(uint64(len(seqs)))
	if batched {
		u.sent.batches.Add(1)
	}
	s.sentUpTo = seqs[len(seqs)-1]
	if s.sentUpTo >= s.liveFrom {
		s.liveOn, s.live = false, nil // past the backlog: in order is soon enough
	}
	return true, nil
}

// liveType reports whether events of type t take the live lane: the
// answers a renter or the cloud waits for.
func liveType(t edged.EventType) bool {
	return strings.HasPrefix(string(t), "rental.") || t == edged.EventCommandResult
}

// liveScanReads bounds the outbox reads of one scan, so a flood of device
// events cannot hold the loop; the rest is read on the next turn.
const liveScanReads = 8

// scanLive reads the events appended since the lane last looked, while the
// drain is behind, and queues the rental and command ones the drain has not
// reached yet.
func (s *session) scanLive(ctx context.Context) error {
	if !s.liveOn || !s.liveScan {
		return nil
	}
	const limit = 256
	for range liveScanReads {
		evs, err := s.u.cfg.Outbox.Pending(ctx, s.liveSeen, limit)
		if err != nil {
			return fmt.Errorf("outbox: %w", err)
		}
		for _, ev := range evs {
			s.liveSeen = max(s.liveSeen, ev.Seq)
			if ev.Seq > s.sentUpTo && liveType(ev.Type) {
				s.live = append(s.live, ev)
			}
		}
		if len(evs) < limit {
			s.liveScan = false
			return nil
		}
	}
	return nil
}

// publishLive sends the queued live events ahead of the backlog, in the
// profile's form (a batch of up to batch_events, cut before
// max_message_kb, or a bare envelope). The message carries no seqs for the
// window: the events stay in the outbox, and the in-order drain sends them
// again and alone releases them, so seq order and at-least-once hold; the
// cloud sees them twice and dedupes by (station, seq).
func (s *session) publishLive(ctx context.Context, client mqtt.Client) error {
	u := s.u
	var envs [][]byte
	size := 0
	st, _ := json.Marshal(u.cfg.StationID)
	overhead := len(`{"station":,"events":[]}`) + len(st)
	if u.batch == 1 {
		overhead = 0
	}
	for len(s.live) > 0 && len(envs) < u.batch {
		ev := s.live[0]
		if ev.Seq <= s.sentUpTo {
			s.live = s.live[1:] // the drain got there first
			continue
		}
		env, err := u.envelope(ev)
		if err != nil {
			s.live = s.live[1:] // the drain reports it
			continue
		}
		grown := size + len(env)
		if len(envs) > 0 {
			grown++
		}
		if overhead+grown > u.maxBytes {
			if len(envs) == 0 {
				s.live = s.live[1:] // too big alone: the drain deals with it
				continue
			}
			break
		}
		s.live = s.live[1:]
		envs = append(envs, env)
		size = grown
	}
	if len(envs) == 0 {
		return nil
	}
	payload := envs[0]
	if u.batch > 1 {
		b := make([]byte, 0, overhead+size)
		b = append(b, `{"station":`...)
		b = append(b, st...)
		b = append(b, `,"events":[`...)
		for i, e := range envs {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, e...)
		}
		payload = append(b, "]}"...)
	}
	if err := s.publish(ctx, client, u.topics.events, false, payload, nil); err != nil {
		return err
	}
	u.sent.live.Add(uint64(len(envs)))
	return nil
}

func appendJSON(b []byte, v any) ([]byte, error) {
	j, err := json.Marshal(v)
	return append(b, j...), err
}

// refreshStates reads the device states changed since the last read
// (every state, the first time on a connection) and queues those whose
// Version moved since they were last published on this connection.
// Coalescing happens here: however many changes came meanwhile, a device is
// queued once, with its newest state.
func (s *session) refreshStates() {
	var states []edged.DeviceState
	if s.statesAt == 0 {
		states = s.u.cfg.States.DeviceStates()
		for _, st := range states {
			s.statesAt = max(s.statesAt, st.Version)
		}
	} else {
		states, s.statesAt = s.u.cfg.States.ChangedSince(s.statesAt)
	}
	queued := make(map[string]int, len(s.due))
	for i, d := range s.due {
		queued[d.DeviceID] = i
	}
	for _, st := range states {
		if last, ok := s.published[st.DeviceID]; ok && last == st.Version {
			continue
		}
		if i, ok := queued[st.DeviceID]; ok {
			s.due[i] = st
			continue
		}
		queued[st.DeviceID] = len(s.due)
		s.due = append(s.due, st)
	}
}

// publishStates sends the next state message with its renter messages:
// one device's state on its own topic, or in aliyun with batch_events > 1
// a batch of up to that many devices, each at most once, cut before
// max_message_kb. The serve loop gives states and events turns, so a long
// drain never holds state back by more than one message, and many devices
// never hold back the drain.
func (s *session) publishStates(ctx context.Context, client mqtt.Client) error {
	u := s.u
	if u.aliyun && u.batch > 1 {
		return s.publishStateBatch(ctx, client)
	}
	st := s.due[0]
	s.due = s.due[1:]
	payload, err := json.Marshal(wireState(st))
	if err != nil {
		return fmt.Errorf("encode device %s: %w", st.DeviceID, err)
	}
	if len(payload) > u.maxBytes {
		s.stateTooBig(st, len(payload))
		return nil
	}
	topic := u.topics.devicePrefix + st.DeviceID
	if u.aliyun {
		topic = u.topics.devices
	}
	if err := s.publish(ctx, client, topic, u.retain, payload, nil); err != nil {
		return err
	}
	s.published[st.DeviceID] = st.Version
	return s.publishRenter(ctx, client, st, payload)
}

// stateTooBig drops a state that cannot be sent (the state bounds of §2
// keep it far below any profile's limit) and logs it.
func (s *session) stateTooBig(st edged.DeviceState, size int) {
	s.published[st.DeviceID] = st.Version
	s.u.log.Error("device state not sent: larger than max_message_kb", "device", st.DeviceID, "bytes", size)
	s.u.setError(fmt.Errorf("device %s state not sent: larger than max_message_kb", st.DeviceID))
}

// publishStateBatch sends up to batch_events queued states as
// {"station": S, "devices": [state, ...]} on aliyun's devices topic.
func (s *session) publishStateBatch(ctx context.Context, client mqtt.Client) error {
	u := s.u
	st, _ := json.Marshal(u.cfg.StationID)
	size := len(`{"station":,"devices":[]}`) + len(st)
	var (
		b     = append(append(append([]byte(nil), `{"station":`...), st...), `,"devices":[`...)
		taken []edged.DeviceState
		each  [][]byte
	)
	for len(s.due) > 0 && len(taken) < u.batch {
		d := s.due[0]
		payload, err := json.Marshal(wireState(d))
		if err != nil {
			return fmt.Errorf("encode device %s: %w", d.DeviceID, err)
		}
		grown := size + len(payload)
		if len(taken) > 0 {
			grown++
		}
		if grown > u.maxBytes {
			if len(taken) == 0 {
				s.due = s.due[1:]
				s.stateTooBig(d, len(payload))
				continue
			}
			break
		}
		s.due = s.due[1:]
		if len(taken) > 0 {
			b = append(b, ',')
		}
		b = append(b, payload...)
		size = grown
		taken = append(taken, d)
		each = append(each, payload)
	}
	if len(taken) == 0 {
		return nil
	}
	b = append(b, "]}"...)
	if err := s.publish(ctx, client, u.topics.devices, false, b, nil); err != nil {
		return err
	}
	for i, d := range taken {
		s.published[d.DeviceID] = d.Version
		if err := s.publishRenter(ctx, client, d, each[i]); err != nil {
			return err
		}
	}
	return nil
}

// publishRenter sends live state to the renter of a rented device
// (uplink.renter_topic; in aliyun the fixed renter topic, which the rules
// engine routes by rental.renter_id). It is never queued: only the newest
// state, only while connected. When a rental ends, the renter it ended for
// gets the final state (rental null) once, so their app sees the end (in
// aliyun that message carries no renter id, so the rule drops it; it
// costs one publish).
func (s *session) publishRenter(ctx context.Context, client mqtt.Client, st edged.DeviceState, payload []byte) error {
	tpl := s.u.cfg.RenterTopic
	if tpl == "" && !s.u.aliyun {
		return nil
	}
	topic := ""
	if st.Rental != nil {
		topic = s.u.topics.renter
		if !s.u.aliyun {
			topic = renterTopic(tpl, st.Rental.RenterID, st.DeviceID)
		}
	}
	prev := s.renterOf[st.DeviceID]
	if prev != "" && prev != topic {
		if err := s.publish(ctx, client, prev, false, payload, nil); err != nil {
			return err
		}
	}
	if topic == "" {
		delete(s.renterOf, st.DeviceID)
		return nil
	}
	s.renterOf[st.DeviceID] = topic
	return s.publish(ctx, client, topic, false, payload, nil)
}

func renterTopic(tpl, renterID, deviceID string) string {
	return strings.NewReplacer("{renter_id}", renterID, "{device_id}", deviceID).Replace(tpl)
}

// wireState is st as the contract shows it (§3.4): times in UTC, telemetry
// an object even when empty.
func wireState(st edged.DeviceState) edged.DeviceState {
	w := st
	w.UpdatedAt = st.UpdatedAt.UTC()
	if st.LastSeen != nil {
		t := st.LastSeen.UTC()
		w.LastSeen = &t
	}
	if st.Rental != nil {
		r := *st.Rental
		r.StartedAt, r.EndsAt = r.StartedAt.UTC(), r.EndsAt.UTC()
		w.Rental = &r
	}
	if w.Telemetry == nil {
		w.Telemetry = map[string]any{}
	}
	return w
}

// presence is the gateway's retained message on R/S/gateway.
func (u *Uplink) presence() []byte {
	type station struct {
		ID       string          `json:"id"`
		Name     string          `json:"name"`
		Location *edged.Location `json:"location"`
	}
	b, _ := json.Marshal(struct {
		Online    bool      `json:"online"`
		Version   string    `json:"version"`
		StartedAt time.Time `json:"started_at"`
		Station   station   `json:"station"`
	}{true, edged.Version, u.cfg.StartedAt.UTC(), station{u.cfg.StationID, u.cfg.StationName, u.cfg.StationLocation}})
	return b
}

// onMessage runs on paho's router goroutine for every message from the
// cloud, in arrival order. It hands the message to the session's down
// worker: while the router is busy paho reads nothing from the socket, not
// even PUBACKs and PINGRESPs, so a slow store must not run here. The
// channel's bound is the back pressure.
func (s *session) onMessage(_ mqtt.Client, m mqtt.Message) {
	select {
	case s.down <- m:
	case <-s.ctx.Done(): // left unacknowledged: redelivered next time
	}
}

// handleDown gives messages from the cloud to the station and acknowledges
// each one only once the station returned nil, that is once it is durable.
//
// Rental and command messages are decided by a small pool of workers keyed
// by the message's device_id, so messages for different devices reach the
// station together and share its group commit, while those for one device
// stay in arrival order (one worker, one queue). PUBACKs still go in the
// order the messages arrived (MQTT 3.1.1 §4.6, [MQTT-4.6.0-2]; paho's
// msg.Ack writes each ack when called): ackDown releases message i only
// after every message before it. Any other topic is a barrier: handled
// alone, once everything before it is acknowledged.
//
// When the station cannot store a message now (EUNAVAILABLE: the disk is
// full) the connection is kept: from that message on the connection is
// serial again. No worker hands a later message to the station; ackDown
// hands the held one again with backoff (downRetryFirst doubling to
// downRetryMax) until it is stored, then each later one in order. Dropping
// the link instead would cost the outage a reconnect loop and every device
// state meanwhile. On any other error it leaves the message (and every
// later one of this connection) unacknowledged and ends the session: the
// broker redelivers them, in order, on the next connection (the session is
// persistent, CleanSession=false).
func (s *session) handleDown() {
	h := s.u.cfg.Handler
	s.heldAt.Store(math.MaxInt64)
	s.failedAt.Store(math.MaxInt64)
	order := make(chan *downSlot, cap(s.down))
	queues := make([]chan *downSlot, downWorkers)
	var wg sync.WaitGroup
	defer wg.Wait() // after ctx ends, every goroutine below returns
	for k := range queues {
		queues[k] = make(chan *downSlot, downQueue)
		wg.Add(1)
		go func() { defer wg.Done(); s.decideDown(queues[k]) }()
	}
	wg.Add(1)
	go func() { defer wg.Done(); s.ackDown(order) }()
	for i := int64(0); ; i++ {
		var m mqtt.Message
		select {
		case <-s.ctx.Done():
			return
		case m = <-s.down:
		}
		sl := &downSlot{m: m, i: i, done: make(chan struct{})}
		switch m.Topic() {
		case s.u.topics.downRentals:
			sl.handle = h.Rental
		case s.u.topics.downCommands:
			sl.handle = h.RenterCommand
		case s.u.topics.downRegistry:
			// A device list changes what every later message means: it is
			// a barrier, applied alone once everything before it is done.
			sl.handle, sl.barrier = s.u.cfg.Registry.Registry, true
		}
		select {
		case order <- sl:
		case <-s.ctx.Done():
			return
		}
		if sl.handle == nil || sl.barrier {
			// A barrier: ackDown handles it once every earlier message is
			// acknowledged, and nothing later starts before it is done.
			select {
			case <-sl.done:
			case <-s.ctx.Done():
				return
			}
			continue
		}
		select {
		case queues[downWorker(m.Payload())] <- sl:
		case <-s.ctx.Done():
			return
		}
	}
}

// Size of the down pool: workers, and the messages each may have queued.
// The broker bounds the messages in flight to us (mosquitto 20 by default,
// EMQX 32, AWS IoT 100). Each worker holds its device's messages while the
// station commits one, so the workers bound how many grants share a
// commit: with 8, grants for devices that hash alike queued behind each
// other's fsyncs, and at 1,000 grants/s p99 was 59–83 ms; with 32,
// 36–42 ms (edgebench, same machine). A worker is a goroutine and a queue.
const (
	downWorkers = 32
	downQueue   = 16
)

// downSlot is one down message from its arrival to its PUBACK. A worker
// (or ackDown, for a barrier) sets err or skipped, then closes done.
type downSlot struct {
	m      mqtt.Message
	i      int64                               // arrival order on this connection
	handle func(context.Context, []byte) error // nil: not ours, dropped as a barrier
	// barrier: handled by ackDown alone, after every earlier message and
	// before any later one (a device registry).
	barrier bool
	err     error
	// skipped: not handed to the station, because an earlier message was
	// held (ackDown hands it over, serially) or failed (left unacked).
	skipped bool
	done    chan struct{}
}

// downWorker is the worker of a message: by its device_id, so one
// device's messages stay in order; one fixed worker when it has none.
func downWorker(payload []byte) int {
	var v struct {
		DeviceID string `json:"device_id"`
	}
	if json.Unmarshal(payload, &v) != nil || v.DeviceID == "" {
		return 0
	}
	h := fnv.New32a()
	h.Write([]byte(v.DeviceID))
	return int(h.Sum32() % downWorkers)
}

// lowerTo sets a to i if i is lower.
func lowerTo(a *atomic.Int64, i int64) {
	for {
		cur := a.Load()
		if i >= cur || a.CompareAndSwap(cur, i) {
			return
		}
	}
}

// decideDown is one worker of the down pool: it hands its messages to the
// station in order, unless an earlier message of the connection was held
// or failed.
func (s *session) decideDown(q <-chan *downSlot) {
	for {
		var sl *downSlot
		select {
		case <-s.ctx.Done():
			return
		case sl = <-q:
		}
		if s.failedAt.Load() < sl.i || s.heldAt.Load() < sl.i {
			sl.skipped = true
			close(sl.done)
			continue
		}
		sl.err = sl.handle(s.ctx, sl.m.Payload())
		if sl.err != nil {
			if edged.ErrorCode(sl.err) == edged.EUNAVAILABLE {
				lowerTo(&s.heldAt, sl.i)
			} else {
				lowerTo(&s.failedAt, sl.i)
			}
		}
		close(sl.done)
	}
}

// ackDown takes the slots in arrival order: it acknowledges each one the
// station stored, holds and retries one it could not store now (and hands
// every later one over itself, serially), and after a failure acknowledges
// nothing more on this connection.
func (s *session) ackDown(order <-chan *downSlot) {
	stopped := false
	for {
		var sl *downSlot
		select {
		case <-s.ctx.Done():
			return
		case sl = <-order:
		}
		if sl.handle == nil {
			if !stopped {
				// Not ours (a stale subscription of this client id): drop
				// it, or the broker would redeliver it forever.
				s.u.log.Warn("message on unexpected topic dropped", "topic", sl.m.Topic())
				sl.m.Ack()
			}
			close(sl.done)
			continue
		}
		if sl.barrier {
			exit := false
			if !stopped {
				stopped, exit = s.settleDown(sl, sl.handle(s.ctx, sl.m.Payload()))
			}
			close(sl.done)
			if exit {
				return
			}
			continue
		}
		select {
		case <-sl.done:
		case <-s.ctx.Done():
			return
		}
		if stopped {
			continue
		}
		err := sl.err
		if sl.skipped {
			if s.failedAt.Load() < sl.i {
				stopped = true
				continue
			}
			err = sl.handle(s.ctx, sl.m.Payload()) // held before it: serial now
		}
		var exit bool
		if stopped, exit = s.settleDown(sl, err); exit {
			return
		}
	}
}

// settleDown finishes a down message the station answered with err: a
// message it could not store now (EUNAVAILABLE) is held and retried on this
// connection; any other failure stops the acknowledgements (stopped), so
// the broker redelivers it and every later one in order; success is
// acknowledged. exit: the session ended while it was held.
func (s *session) settleDown(sl *downSlot, err error) (stopped, exit bool) {
	for wait := downRetryFirst; err != nil && edged.ErrorCode(err) == edged.EUNAVAILABLE; wait = min(2*wait, downRetryMax) {
		lowerTo(&s.heldAt, sl.i)
		s.u.sent.downHeld.Add(1)
		s.u.log.Warn("cloud message not stored, held and retried", "topic", sl.m.Topic(), "retry_in", wait, "err", err)
		s.u.setError(fmt.Errorf("%s not stored, held for retry: %w", sl.m.Topic(), err))
		t := time.NewTimer(wait)
		select {
		case <-s.ctx.Done():
			t.Stop()
			return true, true // unacknowledged: redelivered on the next connection
		case <-t.C:
		}
		err = sl.handle(s.ctx, sl.m.Payload())
	}
	if err != nil {
		lowerTo(&s.failedAt, sl.i)
		s.signal(fmt.Errorf("%s not stored, left for redelivery: %w", sl.m.Topic(), err))
		return true, false
	}
	sl.m.Ack()
	return false, false
}

// Retry delays for a down message the station cannot store now.
var (
	downRetryFirst = time.Second
	downRetryMax   = 30 * time.Second
)

// wait is the package's wait that also ends when the session is lost.
func (s *session) wait(ctx context.Context, tok mqtt.Token, timeout time.Duration) error {
	select {
	case err := <-s.lost:
		return err
	case <-tok.Done():
		return tok.Error()
	default:
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- wait(ctx, tok, timeout) }()
	select {
	case err := <-s.lost:
		return err
	case err := <-errc:
		return err
	}
}

// wait waits for a paho token, ctx or a timeout, whichever comes first.
func wait(ctx context.Context, tok mqtt.Token, timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return fmt.Errorf("no answer within %v", timeout)
	}
}

// envelope is an event as published (§3.3): the bytes the store encoded
// once when it assigned the seq, or, for a store that keeps none, the event
// encoded here.
func (u *Uplink) envelope(ev edged.Event) ([]byte, error) {
	if len(ev.Raw) > 0 && ev.Station != "" {
		return ev.Raw, nil
	}
	if ev.Station == "" {
		ev.Station = u.cfg.StationID
	}
	ev.TS = ev.TS.UTC()
	return json.Marshal(ev)
}
