package uplink

import (
	"context"
	"encoding/json"
	"fmt"
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

	// failed is set once a down message could not be made durable: later
	// messages of this connection are left unacknowledged too, so the
	// broker redelivers them in their original order.
	failed atomic.Bool

	window []inflight

	// published is the Version of each device's state as last published on
	// this connection; due holds devices whose state moved since.
	published map[string]uint64
	renterOf  map[string]string // device -> renter topic last published to
	due       []edged.DeviceState
	buf       []edged.Event // events read from the outbox, not yet sent
	sentUpTo  uint64        // highest seq handed to paho on this connection
}

// inflight is a QoS 1 publish awaiting its PUBACK. seq is 0 for anything
// but an event.
type inflight struct {
	tok  mqtt.Token
	seq  uint64
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

	opts := mqtt.NewClientOptions().
		AddBroker(u.broker).
		SetClientID(u.clientID).
		SetUsername(u.cfg.Username).
		SetPassword(u.cfg.Password).
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
		SetBinaryWill(u.topics.gateway, []byte(`{"online":false}`), 1, true).
		SetDefaultPublishHandler(s.onMessage).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			s.signal(fmt.Errorf("connection lost: %w", err))
		})
	if u.tls != nil {
		opts.SetTLSConfig(u.tls)
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
// suppresses the will, so the retained presence is replaced explicitly.
func (s *session) goodbye(client mqtt.Client) {
	tok := client.Publish(s.u.topics.gateway, 1, true, []byte(`{"online":false}`))
	_ = wait(context.Background(), tok, 2*time.Second)
	client.Disconnect(250)
}

func (s *session) serve(ctx context.Context, client mqtt.Client) error {
	u := s.u
	sub := client.SubscribeMultiple(map[string]byte{u.topics.downRentals: 1, u.topics.downCommands: 1}, nil)
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
	if err := s.publish(client, u.topics.gateway, true, u.presence(), 0); err != nil {
		return err
	}
	u.setConnected(s.since, u.hadConnection)
	u.hadConnection = true
	u.log.Info("uplink connected", "url", redact(u.broker), "client_id", u.clientID, "resend_from", u.pubacked+1)

	s.sentUpTo = u.pubacked
	s.refreshStates() // every device once on every new connection
	moreEvents := true
	watchdog := time.NewTimer(time.Hour)
	defer watchdog.Stop()
	for {
		if err := s.retire(); err != nil {
			return err
		}
		if err := s.publishStates(client); err != nil {
			return err
		}
		if moreEvents {
			var err error
			if moreEvents, err = s.publishEvents(ctx, client); err != nil {
				return err
			}
		}

		var head <-chan struct{}
		if len(s.window) > 0 {
			head = s.window[0].tok.Done()
			d := u.ackTimeout() - time.Since(s.window[0].sent)
			if d <= 0 {
				return fmt.Errorf("no PUBACK within %v: link stalled", u.ackTimeout())
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
			moreEvents = true
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
	defer func() {
		if len(seqs) > 0 {
			s.u.pubacked = seqs[len(seqs)-1]
			s.acks.add(seqs...)
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
			return fmt.Errorf("publish: %w", err)
		}
		if f.seq > 0 {
			seqs = append(seqs, f.seq)
		}
		s.window[0] = inflight{}
		s.window = s.window[1:]
	}
	return nil
}

// room is how many more publishes may start: the window holds those
// awaiting their PUBACK and those PUBACKed but not yet released from the
// outbox, so a crash repeats at most a window of events.
func (s *session) room() int { return s.u.cfg.Window - len(s.window) - s.acks.unreleased() }

// publish sends one QoS 1 message and puts it in the window.
func (s *session) publish(client mqtt.Client, topic string, retained bool, payload []byte, seq uint64) error {
	select {
	case err := <-s.lost: // do not start a Publish that would wait for a dead link
		return err
	default:
	}
	tok := client.Publish(topic, 1, retained, payload)
	s.window = append(s.window, inflight{tok: tok, seq: seq, sent: time.Now()})
	// An immediate failure (not connected, write timeout) ends the
	// session without waiting for the window to reach it.
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return fmt.Errorf("publish: %w", err)
		}
	default:
	}
	return nil
}

// publishEvents fills the window with events in seq order. It reports
// whether the outbox may hold more (false once a read came back empty).
func (s *session) publishEvents(ctx context.Context, client mqtt.Client) (bool, error) {
	u := s.u
	for s.room() > 0 {
		if len(s.buf) == 0 {
			evs, err := u.cfg.Outbox.Pending(ctx, s.sentUpTo, max(u.cfg.Window*4, 256))
			if err != nil {
				return true, fmt.Errorf("outbox: %w", err)
			}
			if len(evs) == 0 {
				return false, nil
			}
			s.buf = evs
		}
		ev := s.buf[0]
		s.buf = s.buf[1:]
		if ev.Seq <= s.sentUpTo {
			continue // the outbox must return seqs above after; be safe
		}
		if ev.Station == "" {
			ev.Station = u.cfg.StationID
		}
		ev.TS = ev.TS.UTC()
		payload, err := json.Marshal(ev)
		if err != nil {
			return true, fmt.Errorf("encode event %d: %w", ev.Seq, err)
		}
		if err := s.publish(client, u.topics.events, false, payload, ev.Seq); err != nil {
			return true, err
		}
		s.sentUpTo = ev.Seq
	}
	return true, nil
}

// refreshStates reads the latest device states and queues those whose
// Version moved since they were last published on this connection.
// Coalescing happens here: however many changes came meanwhile, a device is
// queued once, with its newest state.
func (s *session) refreshStates() {
	states := s.u.cfg.States.DeviceStates()
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

// publishStates publishes queued device states, using at most half of the
// free window so that live state and the event backlog interleave: a long
// drain never holds state back by more than one round of PUBACKs, and a
// station with many devices never holds back the drain.
func (s *session) publishStates(client mqtt.Client) error {
	u := s.u
	budget := (s.room() + 1) / 2
	for len(s.due) > 0 && budget > 0 {
		st := s.due[0]
		s.due = s.due[1:]
		payload, err := json.Marshal(wireState(st))
		if err != nil {
			return fmt.Errorf("encode device %s: %w", st.DeviceID, err)
		}
		if err := s.publish(client, u.topics.devicePrefix+st.DeviceID, true, payload, 0); err != nil {
			return err
		}
		budget--
		s.published[st.DeviceID] = st.Version
		if err := s.publishRenter(client, st, payload); err != nil {
			return err
		}
	}
	return nil
}

// publishRenter sends live state to the renter of a rented device
// (uplink.renter_topic). It is never queued: only the newest state, only
// while connected. When a rental ends, the renter it ended for gets the
// final state (rental null) once, so their app sees the end.
func (s *session) publishRenter(client mqtt.Client, st edged.DeviceState, payload []byte) error {
	tpl := s.u.cfg.RenterTopic
	if tpl == "" {
		return nil
	}
	topic := ""
	if st.Rental != nil {
		topic = renterTopic(tpl, st.Rental.RenterID, st.DeviceID)
	}
	prev := s.renterOf[st.DeviceID]
	if prev != "" && prev != topic {
		if err := s.publish(client, prev, false, payload, 0); err != nil {
			return err
		}
	}
	if topic == "" {
		delete(s.renterOf, st.DeviceID)
		return nil
	}
	s.renterOf[st.DeviceID] = topic
	return s.publish(client, topic, false, payload, 0)
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

// handleDown gives messages from the cloud to the station one at a time,
// in arrival order. It acknowledges a message only once the station
// returned nil, that is once it is durable. On an error it leaves it (and
// every later message of this connection) unacknowledged and ends the
// session: the broker redelivers them, in order, on the next connection
// (the session is persistent, CleanSession=false).
func (s *session) handleDown() {
	h := s.u.cfg.Handler
	for {
		var m mqtt.Message
		select {
		case <-s.ctx.Done():
			return
		case m = <-s.down:
		}
		if s.failed.Load() {
			continue
		}
		var err error
		switch m.Topic() {
		case s.u.topics.downRentals:
			err = h.Rental(s.ctx, m.Payload())
		case s.u.topics.downCommands:
			err = h.RenterCommand(s.ctx, m.Payload())
		default:
			// Not ours (a stale subscription of this client id): drop it,
			// or the broker would redeliver it forever.
			s.u.log.Warn("message on unexpected topic dropped", "topic", m.Topic())
			m.Ack()
			continue
		}
		if err != nil {
			s.failed.Store(true)
			s.signal(fmt.Errorf("%s not stored, left for redelivery: %w", m.Topic(), err))
			continue
		}
		m.Ack()
	}
}

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
