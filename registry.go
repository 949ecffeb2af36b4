// The device registry: each configured device's record and its latest
// state, shared with readers as one immutable snapshot per change.

package edged

import (
	"context"
	"time"
)

type deviceRecord struct {
	dev   Device
	state DeviceState
	// snap is state as of its last change, shared read-only with readers
	// and the store: state's maps and pointers are replaced, never
	// modified, so snap shares them without a copy.
	snap *DeviceState
	// prev and next link the devices in the order of their last change,
	// for ChangedSince.
	prev, next *deviceRecord
	rental     *liveRental // starting or active
	// stop is the stop not yet delivered, nil when none is outstanding.
	stop         *outstandingStop
	graceUntil   time.Time // in_use tolerated until then after a rental ends
	lastUnrented time.Time
}

func (s *Station) notifyChanged() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// touchLocked publishes the device's changed state: it takes the next
// station-wide version, becomes the newest in the change list that
// ChangedSince walks, and its immutable snapshot is shared by every reader
// and by the store's buffered flush. The snapshot copies the struct only:
// its telemetry map, location, last-seen and rental are replaced on
// change, never modified, so one copy of each serves them all.
func (s *Station) touchLocked(rec *deviceRecord, now time.Time) {
	rec.state.UpdatedAt = now.UTC().Round(time.Millisecond)
	s.version++
	rec.state.Version = s.version
	snap := rec.state
	rec.snap = &snap
	s.changes.moveToBack(rec)
	s.store.SaveDeviceState(snap)
	s.notifyChanged()
}

// view returns the device's state for readers: the shared snapshot of its
// last change.
func (rec *deviceRecord) view() DeviceState {
	if rec.snap != nil {
		return *rec.snap
	}
	return rec.state
}

// deviceLocked finds a configured device. Errors: ENOTFOUND.
func (s *Station) deviceLocked(id string) (*deviceRecord, error) {
	rec, ok := s.devices[id]
	if !ok {
		return nil, Errorf(ENOTFOUND, "unknown device %q", id)
	}
	return rec, nil
}

// seenLocked records that the device was heard from now.
func seenLocked(rec *deviceRecord, now time.Time) {
	t := now.UTC().Round(time.Millisecond)
	rec.state.LastSeen = &t
}

// mergeTelemetry returns a new map holding dst merged with src, or, when
// it would hold more than MaxTelemetryKeys fields, EINVALID: a report that
// breaks the state bounds is dropped whole (§2). dst is shared with the
// readers of the device's snapshot, so it is copied, never modified: the
// telemetry is copied only when telemetry changes.
func mergeTelemetry(dst, src map[string]any) (map[string]any, error) {
	if err := CheckTelemetryMerge(dst, src); err != nil {
		return nil, err
	}
	if len(src) == 0 {
		return dst, nil
	}
	out := make(map[string]any, len(dst)+len(src))
	for k, v := range dst {
		out[k] = v
	}
	for k, v := range src {
		out[k] = v
	}
	return out, nil
}

// DeviceTelemetry merges telemetry into the device's latest state. A
// report that would take it over the state bounds changes nothing.
// Errors: ENOTFOUND, EINVALID.
func (s *Station) DeviceTelemetry(ctx context.Context, deviceID string, t map[string]any) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, err := s.deviceLocked(deviceID)
	if err != nil {
		return err
	}
	tel, err := mergeTelemetry(rec.state.Telemetry, t)
	if err != nil {
		return err
	}
	rec.state.Telemetry = tel
	now := s.clock.Now()
	seenLocked(rec, now)
	s.touchLocked(rec, now)
	return nil
}

// DeviceLocation records where a device says it is.
func (s *Station) DeviceLocation(ctx context.Context, deviceID string, l Location) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, err := s.deviceLocked(deviceID)
	if err != nil {
		return err
	}
	now := s.clock.Now()
	seenLocked(rec, now)
	rec.state.Location = &l
	s.touchLocked(rec, now)
	return nil
}

// DeviceStates returns every device's latest state, in config order. The
// maps and pointers inside are shared between callers: read them, never
// modify them (Clone first).
func (s *Station) DeviceStates() []DeviceState {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]DeviceState, 0, len(s.order))
	for _, id := range s.order {
		out = append(out, s.devices[id].view())
	}
	return out
}

// Online counts the devices online and the devices configured, without
// copying their states (DeviceStates does): the daemon asks every few
// seconds for its status line.
func (s *Station) Online() (online, total int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range s.order { // the devices DeviceStates lists
		if s.devices[id].state.Online {
			online++
		}
	}
	return online, len(s.order)
}

// Device returns one device's latest state. Errors: ENOTFOUND.
func (s *Station) Device(id string) (DeviceState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, ok := s.devices[id]
	if !ok {
		return DeviceState{}, Errorf(ENOTFOUND, "no device %q", id)
	}
	return rec.view(), nil
}

// StatesChanged is signalled after any device state changes.
func (s *Station) StatesChanged() <-chan struct{} { return s.changed }

// ChangedSince returns the states of the devices changed after version,
// oldest change first, and the station's version now: pass it back next
// time. It copies only what changed, so a reader woken by StatesChanged
// pays for the devices that moved, not for every device.
func (s *Station) ChangedSince(version uint64) ([]DeviceState, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for r := s.changes.tail; r != nil && r.snap.Version > version; r = r.prev {
		n++
	}
	out := make([]DeviceState, n)
	i := n
	for r := s.changes.tail; i > 0; r = r.prev {
		i--
		out[i] = *r.snap
	}
	return out, s.version
}

// changeList links devices in the order of their last change, newest at
// the tail.
type changeList struct{ head, tail *deviceRecord }

func (l *changeList) moveToBack(r *deviceRecord) {
	if l.tail == r {
		return
	}
	if r.prev != nil || l.head == r { // linked: unlink
		if r.prev != nil {
			r.prev.next = r.next
		} else {
			l.head = r.next
		}
		if r.next != nil {
			r.next.prev = r.prev
		}
	}
	r.prev, r.next = l.tail, nil
	if l.tail != nil {
		l.tail.next = r
	} else {
		l.head = r
	}
	l.tail = r
}

// SetMaintenance puts a device in or out of maintenance: in maintenance it
// takes no new rental; a running one continues. It returns once the change
// is durable, so a technician told it is saved can rely on it across a
// restart; when the store cannot write it, the change is undone and the
// error returned. Errors: ENOTFOUND, EUNAVAILABLE.
func (s *Station) SetMaintenance(ctx context.Context, id string, on bool) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	s.mu.Lock()
	rec, ok := s.devices[id]
	if !ok {
		s.mu.Unlock()
		return Errorf(ENOTFOUND, "no device %q", id)
	}
	changed := rec.state.Maintenance != on
	if changed {
		rec.state.Maintenance = on
		s.touchLocked(rec, s.clock.Now())
		s.log.Info("maintenance", "device", id, "on", on)
	}
	snap := rec.view()
	s.mu.Unlock()
	// Written outside the lock: a state changed meanwhile has a higher
	// Version, and the store writes that newer one instead.
	err := s.store.SaveDeviceStateNow(ctx, snap)
	if err == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if changed && rec.state.Version == snap.Version {
		rec.state.Maintenance = !on // nothing changed since: undo
		s.touchLocked(rec, s.clock.Now())
	}
	return &Error{Code: EUNAVAILABLE, Message: "maintenance not saved: the store cannot write", Err: err}
}
