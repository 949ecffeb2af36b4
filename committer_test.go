package edged_test

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// gatedStore holds its commits at a gate until it is opened, telling on
// entered when one arrives.
type gatedStore struct {
	*memStore
	once    sync.Once
	gate    chan struct{}
	entered chan struct{}
}

func (g *gatedStore) Commit(ctx context.Context, c edged.Change) ([]edged.Event, error) {
	select {
	case g.entered <- struct{}{}:
	default:
	}
	<-g.gate
	return g.memStore.Commit(ctx, c)
}

func (g *gatedStore) open() { g.once.Do(func() { close(g.gate) }) }

// gatedDevices holds every send at a gate until it is opened.
type gatedDevices struct {
	fakeDevices
	once    sync.Once
	gate    chan struct{}
	entered chan struct{}
}

func (g *gatedDevices) Send(ctx context.Context, id string, c edged.DeviceCommand) error {
	select {
	case g.entered <- struct{}{}:
	default:
	}
	<-g.gate
	return g.fakeDevices.Send(ctx, id, c)
}

func (g *gatedDevices) open() { g.once.Do(func() { close(g.gate) }) }

// waitFor polls cond until it holds, failing after a generous deadline.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestDecisionsShareACommit: decisions taken while a commit is in flight
// are not held by it: they queue, and the committer writes them together
// in one commit (one fsync), each caller answered once it is durable.
func TestDecisionsShareACommit(t *testing.T) {
	h := newHarness(t)
	store := &gatedStore{memStore: h.store, gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	t.Cleanup(store.open)
	h.opts.Store = store
	h.restart()
	errs := make(chan error, 3)
	go func() { errs <- h.st.DeviceEvent(ctx, "chair-1", []byte(`{"type":"door"}`)) }()
	<-store.entered
	// The first commit is in flight: the station still decides.
	for _, id := range []string{"chair-2", "chair-3"} {
		go func() { errs <- h.st.DeviceEvent(ctx, id, []byte(`{"type":"door"}`)) }()
	}
	waitFor(t, "two decisions queued behind the commit", func() bool { return h.st.Queued() == 2 })
	if n := len(h.store.all()); n != 0 {
		t.Fatalf("%d events stored before their commit", n)
	}
	store.open()
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	st := h.st.Stats()
	if st.Commits != 2 || st.CommitChanges != 3 {
		t.Errorf("got %d commits carrying %d changes, want 2 carrying 3 (the two queued ones together)", st.Commits, st.CommitChanges)
	}
	if n := len(h.store.all()); n != 3 {
		t.Errorf("%d events stored, want 3", n)
	}
}

// TestSendOutsideTheLock: a device command that takes long to send holds
// neither the readers (the status page, the uplink's states) nor other
// devices' reports, and the grant's caller is answered only once its start
// is sent.
func TestSendOutsideTheLock(t *testing.T) {
	h := newHarness(t)
	dev := &gatedDevices{gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	t.Cleanup(dev.open)
	h.opts.Commander = dev
	h.restart()
	h.online("chair-1", edged.StatusIdle)
	done := make(chan error, 1)
	go func() {
		b, _ := json.Marshal(grant("r1", "chair-1", "u1", 60))
		done <- h.st.Rental(ctx, b)
	}()
	<-dev.entered
	// Bounded, so a station that sends under its lock fails here rather
	// than hanging the test.
	read := make(chan []edged.Rental, 1)
	go func() {
		if got := h.st.DeviceStates(); len(got) != 3 {
			t.Errorf("states while a send is in flight: %d, want 3", len(got))
		}
		if err := h.st.DeviceTelemetry(ctx, "chair-2", map[string]any{"temp": 40.0}); err != nil {
			t.Error(err)
		}
		read <- h.st.ActiveRentals()
	}()
	select {
	case got := <-read:
		if len(got) != 1 || got[0].State != edged.RentalStarting {
			t.Fatalf("rentals while the start is being sent: %+v, want r1 starting", got)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the station's readers wait for a device send")
	}
	select {
	case err := <-done:
		t.Fatalf("grant answered (%v) before its start was sent", err)
	default:
	}
	dev.open()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if sent := dev.take(); len(sent) != 1 || sent[0].Cmd.Action != edged.ActionStart {
		t.Fatalf("sent %+v, want one start", sent)
	}
}

// TestAckRidesTheNextCommit: on a busy station a device's ack waits for
// the next decision's commit to carry it: two decisions, one fsync. The
// decision that may not wait (a grant) is not held by it.
func TestAckRidesTheNextCommit(t *testing.T) {
	h := newHarness(t)
	h.online("chair-1", edged.StatusIdle)
	h.online("chair-2", edged.StatusIdle)
	h.rental(grant("r-1", "chair-1", "alice", 600))
	start := h.sent("chair-1", "start")
	// The last commit just ended and took long: the ack may wait an hour.
	h.st.SetLinger(time.Hour, 0, time.Hour)
	before := h.st.Stats()
	acked := make(chan error, 1)
	go func() { acked <- h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: start.CmdID, OK: true}) }()
	waitFor(t, "the ack queued, its commit held", func() bool { return h.st.Queued() == 1 })
	granted := make(chan error, 1)
	go func() {
		b, _ := json.Marshal(grant("r-2", "chair-2", "bob", 600))
		granted <- h.st.Rental(ctx, b)
	}()
	for name, ch := range map[string]chan error{"the grant": granted, "the ack": acked} {
		if err := answered(t, ch, name+" still waits: the grant did not wake the committer"); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if got := h.st.Stats().Commits - before.Commits; got != 1 {
		t.Errorf("the ack and the grant took %d commits, want 1", got)
	}
	if r := rentalState(h, "r-1"); r != edged.RentalActive {
		t.Errorf("r-1 is %q after its start was acked, want active", r)
	}
}

// answered waits for a caller's answer on ch, failing with stuck when
// none comes within a generous deadline.
func answered(t *testing.T, ch <-chan error, stuck string) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal(stuck)
		return nil
	}
}

// rentalState is the state of a running rental, "" when none runs.
func rentalState(h *harness, id string) edged.RentalState {
	for _, r := range h.st.ActiveRentals() {
		if r.ID == id {
			return r.State
		}
	}
	return ""
}

// TestAckNotHeldWhenItSavesNothing: an idle station commits a device's
// ack at once, and so does a station whose commits cost nothing.
func TestAckNotHeldWhenItSavesNothing(t *testing.T) {
	for _, c := range []struct {
		name      string
		ago, took time.Duration
	}{
		{"idle: the last commit ended 2 h ago", 2 * time.Hour, time.Hour},
		{"the last commit took no time", 0, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			h.online("chair-1", edged.StatusIdle)
			h.rental(grant("r-1", "chair-1", "alice", 600))
			h.st.SetLinger(time.Hour, c.ago, c.took)
			acked := make(chan error, 1)
			start := h.sent("chair-1", "start")
			go func() { acked <- h.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: start.CmdID, OK: true}) }()
			if err := answered(t, acked, "the ack was held, with nothing to ride"); err != nil {
				t.Fatal(err)
			}
		})
	}
}
