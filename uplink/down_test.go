package uplink

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/faultproxy"
)

const (
	rentalsTopic  = "stations/st-1/down/rentals"
	commandsTopic = "stations/st-1/down/commands"
)

// TestDownWhileCut: a grant and a command published while the station's
// link is cut wait at the broker (persistent session) and reach the
// station, in order, once the link is back.
func TestDownWhileCut(t *testing.T) {
	m := startMosquitto(t, "")
	p := newProxy(t, m.addr)
	c := newCloud(t, m.addr, "nothing/here")
	s := newStation()
	u, err := New(s.config(t, "tcp://"+p.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })

	c.publish(rentalsTopic, `{"op":"grant","rental_id":"r0"}`)
	waitFor(t, 5*time.Second, "a grant while connected", func() bool { r, _, _ := s.handler.snapshot(); return len(r) == 1 })

	p.Cut()
	waitFor(t, 5*time.Second, "the cut noticed", func() bool { return u.Status().State != StateConnected })
	grants := []string{`{"op":"grant","rental_id":"r1"}`, `{"op":"grant","rental_id":"r2"}`}
	for _, g := range grants {
		c.publish(rentalsTopic, g)
	}
	c.publish(commandsTopic, `{"cmd_id":"c1"}`)
	time.Sleep(300 * time.Millisecond)
	if r, _, _ := s.handler.snapshot(); len(r) != 1 {
		t.Fatalf("got %d rentals while cut, want 1", len(r))
	}

	p.Restore()
	waitFor(t, 10*time.Second, "the grants after restore", func() bool {
		r, cmds, _ := s.handler.snapshot()
		return len(r) == 3 && len(cmds) == 1
	})
	rentals, cmds, _ := s.handler.snapshot()
	if diff := cmp.Diff(append([]string{`{"op":"grant","rental_id":"r0"}`}, grants...), rentals); diff != "" {
		t.Errorf("rentals (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{`{"cmd_id":"c1"}`}, cmds); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
}

// TestDownRedelivery: a message the station failed to make durable (an
// error other than EUNAVAILABLE) is not acknowledged and comes back on a
// new connection; once stored it is acknowledged and does not come back on
// the next connection.
func TestDownRedelivery(t *testing.T) {
	m := startMosquitto(t, "")
	p := newProxy(t, m.addr)
	c := newCloud(t, m.addr, "nothing/here")
	s := newStation()
	s.handler.fail = func(call int, payload []byte) error {
		if call <= 2 {
			return edged.Errorf(edged.EINTERNAL, "store broke")
		}
		return nil
	}
	u, err := New(s.config(t, "tcp://"+p.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })

	c.publish(commandsTopic, `{"cmd_id":"c1"}`)
	c.publish(commandsTopic, `{"cmd_id":"c2"}`)
	waitFor(t, 15*time.Second, "both commands stored", func() bool { _, cmds, _ := s.handler.snapshot(); return len(cmds) == 2 })
	_, cmds, calls := s.handler.snapshot()
	if diff := cmp.Diff([]string{`{"cmd_id":"c1"}`, `{"cmd_id":"c2"}`}, cmds); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
	if calls != 4 {
		t.Errorf("handler calls: got %d, want 4 (two failures, then c1 and c2)", calls)
	}
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })
	st := u.Status()
	if st.Reconnects < 1 || st.Connects != st.Reconnects+1 {
		t.Errorf("reconnects %d, connects %d: want at least 1 reconnect, and one connect more", st.Reconnects, st.Connects)
	}
	if st.LastError == "" {
		t.Errorf("LastError is empty after handler failures")
	}

	// Acknowledged: a new connection brings nothing back.
	reconnectRedeliversNothing(t, p, u, s, calls)
}

// TestDownHeldWhileStoreCannotWrite: while the station cannot store a
// cloud message (EUNAVAILABLE: a full disk) the uplink keeps the
// connection, holds the message and every later one unacknowledged, and
// retries; events keep flowing meanwhile. Once the store takes it, the
// messages are handled in order and acknowledged, and none comes back.
func TestDownHeldWhileStoreCannotWrite(t *testing.T) {
	m := startMosquitto(t, "")
	p := newProxy(t, m.addr)
	c := newCloud(t, m.addr, eventsTopic)
	s := newStation()
	var full atomic.Bool
	full.Store(true)
	s.handler.fail = func(call int, payload []byte) error {
		if full.Load() {
			return edged.Errorf(edged.EUNAVAILABLE, "store cannot write")
		}
		return nil
	}
	// It counts reconnects: a 3 s keepalive, which a loaded machine cannot
	// miss, rather than the package's usual 1 s.
	cfg := s.config(t, "tcp://"+p.Addr())
	cfg.KeepAlive = 3 * time.Second
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })

	c.publish(commandsTopic, `{"cmd_id":"c1"}`)
	c.publish(rentalsTopic, `{"op":"grant","rental_id":"r1"}`)
	c.publish(commandsTopic, `{"cmd_id":"c2"}`)
	waitFor(t, 10*time.Second, "the first message retried", func() bool { _, _, calls := s.handler.snapshot(); return calls >= 2 })
	// Held, not dropped: the drain goes on on the same connection.
	s.outbox.Append(100, 4)
	waitFor(t, 10*time.Second, "events drained while a message is held", func() bool { return s.outbox.Len() == 0 })
	rentals, cmds, calls := s.handler.snapshot()
	if len(rentals)+len(cmds) != 0 {
		t.Fatalf("stored while the store could not write: %v %v", rentals, cmds)
	}
	full.Store(false)
	waitFor(t, 40*time.Second, "every message stored", func() bool {
		r, cmds, _ := s.handler.snapshot()
		return len(r) == 1 && len(cmds) == 2
	})
	_, cmds, after := s.handler.snapshot()
	if diff := cmp.Diff([]string{`{"cmd_id":"c1"}`, `{"cmd_id":"c2"}`}, cmds); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
	if after != calls+3 {
		t.Errorf("handler calls: %d failed, then %d in all; want the held one once more and each later one once", calls, after)
	}
	st := u.Status()
	if st.Connects != 1 || st.Reconnects != 0 {
		t.Errorf("connects %d, reconnects %d while the store could not write: want 1 and 0", st.Connects, st.Reconnects)
	}
	if st.DownHeld != uint64(calls) || st.LastError == "" {
		t.Errorf("DownHeld %d (want %d), LastError %q", st.DownHeld, calls, st.LastError)
	}

	// Acknowledged in order: a new connection brings nothing back.
	reconnectRedeliversNothing(t, p, u, s, after)
}

// TestSlowHandler: a store that takes longer than the keepalive's ping
// timeout to make a grant durable neither drops the link nor holds back the
// event drain.
func TestSlowHandler(t *testing.T) {
	m := startMosquitto(t, "")
	c := newCloud(t, m.addr, eventsTopic)
	s := newStation()
	s.handler.fail = func(call int, payload []byte) error {
		time.Sleep(2 * time.Second) // longer than the ping timeout, 1.5 s here
		return nil
	}
	// A 3 s keepalive rather than the package's usual 1 s: mosquitto drops a
	// client whose ping is 1.5 keepalives late, which a loaded machine can
	// cause on its own; the handler still outlasts the ping timeout.
	cfg := s.config(t, "tcp://"+m.addr)
	cfg.KeepAlive = 3 * time.Second
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 5*time.Second, "connected", func() bool { return u.Status().State == StateConnected })

	// Several grants, each slower to store than the ping timeout.
	const grants = 6
	for i := range grants {
		c.publish(rentalsTopic, fmt.Sprintf(`{"op":"grant","rental_id":"r%d"}`, i))
	}
	time.Sleep(100 * time.Millisecond)
	s.outbox.Append(1000, 5)
	waitFor(t, 10*time.Second, "the events", func() bool {
		seqs, _ := c.events(eventsTopic)
		return len(seqs) == 1000
	})
	if r, _, _ := s.handler.snapshot(); len(r) == grants {
		t.Fatalf("the events arrived only after all %d grants were stored (%v)", grants, grants*2*time.Second)
	}
	waitFor(t, 30*time.Second, "the grants stored", func() bool { r, _, _ := s.handler.snapshot(); return len(r) == grants })
	time.Sleep(2 * time.Second)
	if st := u.Status(); st.Reconnects != 0 || st.Connects != 1 || st.State != StateConnected {
		t.Fatalf("status: got %+v, want connected all along", st)
	}
	if r, _, calls := s.handler.snapshot(); len(r) != grants || calls != grants {
		t.Fatalf("%d grants stored in %d calls, want %d in %d", len(r), calls, grants, grants)
	}
}

// reconnectRedeliversNothing cuts the link and waits for the uplink to be
// back, then checks the handler saw no more than want calls: what was
// acknowledged before the cut is not redelivered.
func reconnectRedeliversNothing(t *testing.T, p *faultproxy.Proxy, u *Uplink, s *station, want int) {
	t.Helper()
	time.Sleep(200 * time.Millisecond) // let the PUBACKs reach the broker
	p.Cut()
	waitFor(t, 5*time.Second, "the cut noticed", func() bool { return u.Status().State != StateConnected })
	p.Restore()
	waitFor(t, 5*time.Second, "reconnected", func() bool { return u.Status().State == StateConnected })
	time.Sleep(500 * time.Millisecond)
	if _, _, got := s.handler.snapshot(); got != want {
		t.Errorf("handler calls after a reconnect: got %d, want %d (nothing redelivered)", got, want)
	}
}
