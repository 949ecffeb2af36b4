package local

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// call is one call the broker made on the reporter.
type call struct {
	Method string
	Device string
	Value  any
}

// fakeReporter records what the broker reports. eventHook, when set, runs
// inside DeviceEvent before it records; its error is returned. Like the
// station, it keeps each device's telemetry and refuses (EINVALID) a
// report that would take it over the state bounds.
type fakeReporter struct {
	mu        sync.Mutex
	calls     []call
	eventHook func(ctx context.Context) error
	telemetry map[string]map[string]any
}

// merge applies the station's merge rule to the device's telemetry.
func (f *fakeReporter) merge(id string, t map[string]any) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.telemetry == nil {
		f.telemetry = map[string]map[string]any{}
	}
	cur := f.telemetry[id]
	if cur == nil {
		cur = map[string]any{}
		f.telemetry[id] = cur
	}
	if err := edged.CheckTelemetryMerge(cur, t); err != nil {
		return err
	}
	for k, v := range t {
		cur[k] = v
	}
	return nil
}

func (f *fakeReporter) record(c call) {
	f.mu.Lock()
	f.calls = append(f.calls, c)
	f.mu.Unlock()
}

func (f *fakeReporter) DeviceOnline(ctx context.Context, id string, online bool) error {
	f.record(call{"online", id, online})
	return nil
}

func (f *fakeReporter) DeviceState(ctx context.Context, id string, r edged.StateReport) error {
	if err := f.merge(id, r.Extra); err != nil {
		return err
	}
	f.record(call{"state", id, r})
	return nil
}

func (f *fakeReporter) DeviceTelemetry(ctx context.Context, id string, t map[string]any) error {
	if err := f.merge(id, t); err != nil {
		return err
	}
	f.record(call{"telemetry", id, t})
	return nil
}

func (f *fakeReporter) DeviceLocation(ctx context.Context, id string, l edged.Location) error {
	f.record(call{"location", id, l})
	return nil
}

func (f *fakeReporter) DeviceEvent(ctx context.Context, id string, e []byte) error {
	f.mu.Lock()
	hook := f.eventHook
	f.mu.Unlock()
	if hook != nil {
		if err := hook(ctx); err != nil {
			return err
		}
	}
	f.record(call{"event", id, string(e)})
	return nil
}

func (f *fakeReporter) DeviceAck(ctx context.Context, id string, a edged.CommandAck) error {
	f.record(call{"ack", id, a})
	return nil
}

func (f *fakeReporter) setEventHook(h func(ctx context.Context) error) {
	f.mu.Lock()
	f.eventHook = h
	f.mu.Unlock()
}

// Calls returns the calls so far, optionally only those of one method.
func (f *fakeReporter) Calls(method string) []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []call
	for _, c := range f.calls {
		if method == "" || c.Method == method {
			out = append(out, c)
		}
	}
	return out
}

// dataCalls returns every call but presence.
func (f *fakeReporter) dataCalls() []call {
	var out []call
	for _, c := range f.Calls("") {
		if c.Method != "online" {
			out = append(out, c)
		}
	}
	return out
}

// lastOnline returns the last presence reported for id, and whether any was.
func (f *fakeReporter) lastOnline(id string) (online, ok bool) {
	for _, c := range f.Calls("online") {
		if c.Device == id {
			online, ok = c.Value.(bool), true
		}
	}
	return online, ok
}

// logBuffer is a goroutine-safe log sink.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// waitFor polls cond every few milliseconds for at most 5 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
