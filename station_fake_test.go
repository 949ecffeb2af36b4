package edged_test

import (
	"context"
	"encoding/json"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// memStore is an in-memory edged.Store for the rules' tests. Its state
// survives a "restart": a new Station built on the same memStore.
type memStore struct {
	mu       sync.Mutex
	seq      uint64
	events   []edged.Event
	rentals  map[string]edged.Rental
	commands map[string]edged.CommandRecord
	results  map[string]edged.ResultRecord
	stops    map[string]edged.StopRecord
	states   map[string]edged.DeviceState
	durable  map[string]edged.DeviceState // states saved by SaveDeviceStateNow
	// fail, when set, fails every write (Commit, SaveDeviceStateNow), as a
	// full disk does; reads still work.
	fail error
}

func newMemStore() *memStore {
	return &memStore{rentals: map[string]edged.Rental{}, commands: map[string]edged.CommandRecord{},
		results: map[string]edged.ResultRecord{}, stops: map[string]edged.StopRecord{},
		states: map[string]edged.DeviceState{}, durable: map[string]edged.DeviceState{}}
}

// setFail sets or clears the write failure.
func (m *memStore) setFail(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.fail = err
}

func (m *memStore) Commit(ctx context.Context, c edged.Change) ([]edged.Event, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return nil, m.fail
	}
	if err := ctx.Err(); err != nil {
		return nil, err // as the real store: a cancelled commit is not made
	}
	for _, r := range c.Rentals {
		m.rentals[r.ID] = r
	}
	for _, r := range c.Commands {
		m.commands[r.CmdID] = r
	}
	for _, r := range c.Results {
		m.results[r.Key()] = r
	}
	for _, r := range c.Stops {
		if r.Done {
			delete(m.stops, r.DeviceID)
		} else {
			m.stops[r.DeviceID] = r
		}
	}
	out := make([]edged.Event, len(c.Events))
	for i, e := range c.Events {
		m.seq++
		e.Seq = m.seq
		m.events = append(m.events, e)
		out[i] = e
	}
	return out, nil
}

func (m *memStore) Rental(ctx context.Context, id string) (edged.Rental, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.rentals[id]
	if !ok {
		return r, edged.Errorf(edged.ENOTFOUND, "no rental")
	}
	return r, nil
}

func (m *memStore) Rentals(ctx context.Context, limit int, states ...edged.RentalState) ([]edged.Rental, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []edged.Rental
	for _, r := range m.rentals {
		for _, s := range states {
			if r.State == s {
				out = append(out, r)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (m *memStore) Command(ctx context.Context, id string) (edged.CommandRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.commands[id]
	if !ok {
		return r, edged.Errorf(edged.ENOTFOUND, "no command")
	}
	return r, nil
}

func (m *memStore) Result(ctx context.Context, key string) (edged.ResultRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.results[key]
	if !ok {
		return r, edged.Errorf(edged.ENOTFOUND, "no result")
	}
	return r, nil
}

func (m *memStore) Stops(ctx context.Context) ([]edged.StopRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []edged.StopRecord
	for _, r := range m.stops {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].DeviceID < out[j].DeviceID })
	return out, nil
}

func (m *memStore) SaveDeviceStateNow(ctx context.Context, s edged.DeviceState) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return m.fail
	}
	m.states[s.DeviceID] = s
	m.durable[s.DeviceID] = s
	return nil
}

func (m *memStore) SaveDeviceState(s edged.DeviceState) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.states[s.DeviceID] = s
}

func (m *memStore) DeviceStates(ctx context.Context) ([]edged.DeviceState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []edged.DeviceState
	for _, s := range m.states {
		out = append(out, s)
	}
	return out, nil
}

func (m *memStore) Events(ctx context.Context, after uint64, limit int) ([]edged.Event, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []edged.Event
	for _, e := range m.events {
		if e.Seq > after && (limit == 0 || len(out) < limit) {
			out = append(out, e)
		}
	}
	return out, nil
}

// eventsOf returns the logged events of the given type, decoded.
func (m *memStore) all() []edged.Event {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]edged.Event(nil), m.events...)
}

// fakeClock is a Clock the test moves by hand.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	synced bool
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Synced() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.synced
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// fakeDevices records the commands sent to devices.
type fakeDevices struct {
	mu   sync.Mutex
	sent []sentCommand
	fail map[string]error // by device id
}

type sentCommand struct {
	Device string
	Cmd    edged.DeviceCommand
}

func (f *fakeDevices) Send(ctx context.Context, id string, c edged.DeviceCommand) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail[id]; err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	f.sent = append(f.sent, sentCommand{id, c})
	return nil
}

// take returns and forgets the commands sent so far.
func (f *fakeDevices) take() []sentCommand {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.sent
	f.sent = nil
	return s
}

// decoded is an event with its data as a generic map, for assertions.
type decoded struct {
	Seq  uint64
	Type edged.EventType
	Data map[string]any
}

func decode(t *testing.T, evs []edged.Event) []decoded {
	t.Helper()
	out := make([]decoded, len(evs))
	for i, e := range evs {
		out[i] = decoded{Seq: e.Seq, Type: e.Type}
		if err := json.Unmarshal(e.Data, &out[i].Data); err != nil {
			t.Fatalf("event %d data: %v", e.Seq, err)
		}
	}
	return out
}
