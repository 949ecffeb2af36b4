package edged

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// A device list changes while the station runs: a reload of the config
// file (SIGHUP, §9) and a registry from the cloud (§3.6) are both a new
// list, diffed against the running one by DiffDevices and applied by
// Station.ApplyDevices and each link's DeviceSet. One code path, so the
// two cannot disagree on what a removed device keeps.

// DeviceDiff is what changes from one device list to the next.
type DeviceDiff struct {
	// Added are devices not in the old list; they may connect and rent at
	// once.
	Added []Device
	// Removed are devices not in the new list, as they were.
	Removed []Device
	// Changed are devices in both lists whose entry differs, as they are
	// now; SecretChanged names those whose accepted secrets changed.
	Changed       []Device
	SecretChanged []string
	// Unchanged are the ids of devices whose entry is the same.
	Unchanged []string
	// Retiring are the ids of Removed devices the station keeps until
	// their rental ends and its stop is delivered: the links keep serving
	// them (the device must hear its stop) until the station lets them go
	// (Station.Retired).
	Retiring []string
}

// Empty reports whether the diff changes nothing.
func (d DeviceDiff) Empty() bool {
	return len(d.Added)+len(d.Removed)+len(d.Changed) == 0
}

// Gone returns the removed devices the links drop now: the removed ones
// that are not retiring.
func (d DeviceDiff) Gone() []Device {
	out := make([]Device, 0, len(d.Removed))
	for _, r := range d.Removed {
		if !slices.Contains(d.Retiring, r.ID) {
			out = append(out, r)
		}
	}
	return out
}

// DeviceSet is a part of the station that serves devices (the local
// broker, a serial bus) and learns a new device list without a restart.
// ApplyDevices picks the devices that are its own from d: it starts
// serving the added ones, drops the gone ones (d.Gone), and updates the
// changed ones; a device whose secret changed must log in again. Every
// other device keeps its session. Errors: EINVALID for an entry it cannot
// serve (nothing is changed then).
type DeviceSet interface {
	ApplyDevices(ctx context.Context, d DeviceDiff) error
}

// Hashes returns the device's accepted secret hashes: secret_hash and
// secret_hashes, without blanks or repeats.
func (d Device) Hashes() []string {
	var out []string
	for _, h := range append([]string{d.SecretHash}, d.SecretHashes...) {
		if h != "" && !slices.Contains(out, h) {
			out = append(out, h)
		}
	}
	return out
}

// sameSecrets reports whether a and b accept the same secrets.
func sameSecrets(a, b Device) bool {
	ha, hb := a.Hashes(), b.Hashes()
	slices.Sort(ha)
	slices.Sort(hb)
	return slices.Equal(ha, hb)
}

// SameDevice reports whether two entries of a device are equal.
func SameDevice(a, b Device) bool {
	if a.ID != b.ID || a.Kind != b.Kind || a.Transport != b.Transport || a.Bus != b.Bus ||
		a.Unit != b.Unit || a.Profile != b.Profile || !sameSecrets(a, b) {
		return false
	}
	switch {
	case a.Location == nil && b.Location == nil:
		return true
	case a.Location == nil || b.Location == nil:
		return false
	}
	la, lb := *a.Location, *b.Location
	if (la.AccuracyM == nil) != (lb.AccuracyM == nil) || (la.AccuracyM != nil && *la.AccuracyM != *lb.AccuracyM) {
		return false
	}
	return la.Lat == lb.Lat && la.Lon == lb.Lon
}

// DiffDevices returns what changes from old to next. It is pure: the same
// lists give the same diff, in the order of the lists.
func DiffDevices(old, next []Device) DeviceDiff {
	var d DeviceDiff
	was := make(map[string]Device, len(old))
	for _, o := range old {
		was[o.ID] = o
	}
	is := make(map[string]bool, len(next))
	for _, n := range next {
		is[n.ID] = true
		o, ok := was[n.ID]
		switch {
		case !ok:
			d.Added = append(d.Added, n)
		case SameDevice(o, n):
			d.Unchanged = append(d.Unchanged, n.ID)
		default:
			d.Changed = append(d.Changed, n)
			if !sameSecrets(o, n) {
				d.SecretChanged = append(d.SecretChanged, n.ID)
			}
		}
	}
	for _, o := range old {
		if !is[o.ID] {
			d.Removed = append(d.Removed, o)
		}
	}
	return d
}

// deviceList is the station's part of a changing device list.
type deviceList struct {
	// retiring are removed devices kept until their rental ends and its
	// stop is delivered; they take no new rental.
	retiring map[string]bool
	// gone are retiring devices let go since the last Retired call.
	gone   []Device
	goneCh chan struct{}
}

// Devices returns the station's device list as last applied, in order,
// without the retiring devices.
func (s *Station) Devices() []Device {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.devicesLocked()
}

func (s *Station) devicesLocked() []Device {
	out := make([]Device, 0, len(s.order))
	for _, id := range s.order {
		if !s.devs.retiring[id] {
			out = append(out, s.devices[id].dev)
		}
	}
	return out
}

// ApplyDevices makes next the station's device list and returns what
// changed. Added devices may rent at once. A removed device takes no new
// rental (unknown_device); one with a rental or an outstanding stop is
// retiring: its rental runs to its end and its stop is delivered, and then
// it goes, reported on RetiredNotify. A changed device keeps its state and
// rental. Errors: EINVALID for a list with a device twice (nothing is
// changed).
func (s *Station) ApplyDevices(ctx context.Context, next []Device) (DeviceDiff, error) {
	seen := make(map[string]bool, len(next))
	for _, d := range next {
		if seen[d.ID] {
			return DeviceDiff{}, Errorf(EINVALID, "device %q listed twice", d.ID)
		}
		seen[d.ID] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	d := DiffDevices(s.devicesLocked(), next)
	if s.devs.retiring == nil {
		s.devs.retiring = map[string]bool{}
	}
	for _, a := range d.Added {
		if rec, ok := s.devices[a.ID]; ok {
			// Retiring and listed again: it stays, rental and all.
			delete(s.devs.retiring, a.ID)
			s.updateDeviceLocked(rec, a, now)
			continue
		}
		rec := &deviceRecord{dev: a, state: DeviceState{
			DeviceID: a.ID, Kind: a.Kind, Transport: a.Transport,
			Status: StatusUnknown, Telemetry: map[string]any{},
		}}
		if a.Location != nil {
			l := *a.Location
			rec.state.Location = &l
		}
		s.devices[a.ID] = rec
		s.touchLocked(rec, now)
	}
	for _, c := range d.Changed {
		s.updateDeviceLocked(s.devices[c.ID], c, now)
	}
	for _, r := range d.Removed {
		rec := s.devices[r.ID]
		if rec.rental != nil || rec.stop != nil {
			s.devs.retiring[r.ID] = true
			d.Retiring = append(d.Retiring, r.ID)
			s.log.Info("device removed: kept until its rental ends and its stop is delivered", "device", r.ID)
			continue
		}
		s.forgetLocked(rec)
	}
	order := make([]string, 0, len(s.devices))
	for _, n := range next {
		order = append(order, n.ID)
	}
	for _, id := range s.order {
		if s.devs.retiring[id] {
			order = append(order, id)
		}
	}
	s.order = order
	s.notifyChanged()
	s.log.Info("device list applied", "added", len(d.Added), "removed", len(d.Removed),
		"changed", len(d.Changed), "retiring", len(d.Retiring))
	return d, nil
}

// updateDeviceLocked gives a kept device its new entry; state and rental
// stay.
func (s *Station) updateDeviceLocked(rec *deviceRecord, d Device, now time.Time) {
	rec.dev = d
	rec.state.Kind, rec.state.Transport = d.Kind, d.Transport
	if d.Location != nil {
		l := *d.Location
		rec.state.Location = &l
	}
	s.touchLocked(rec, now)
}

// Retiring reports whether a device was removed from the list and is kept
// only until its rental ends and its stop is delivered.
func (s *Station) Retiring(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.devs.retiring[id]
}

// RetiredNotify receives a value when retiring devices have gone; take
// them with Retired.
func (s *Station) RetiredNotify() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.devs.goneCh == nil {
		s.devs.goneCh = make(chan struct{}, 1)
	}
	return s.devs.goneCh
}

// Retired returns the retiring devices that have gone since the last call:
// their links drop them now.
func (s *Station) Retired() []Device {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.devs.gone
	s.devs.gone = nil
	return out
}

// sweepRetiringLocked lets go of retiring devices whose rental has ended
// and whose stop was delivered.
func (s *Station) sweepRetiringLocked() {
	if len(s.devs.retiring) == 0 {
		return
	}
	for id := range s.devs.retiring {
		rec := s.devices[id]
		if rec != nil && (rec.rental != nil || rec.stop != nil) {
			continue
		}
		delete(s.devs.retiring, id)
		if rec == nil {
			continue
		}
		s.forgetLocked(rec)
		s.order = slices.DeleteFunc(s.order, func(o string) bool { return o == id })
		s.devs.gone = append(s.devs.gone, rec.dev)
		s.log.Info("removed device gone: its rental ended and its stop was delivered", "device", id)
	}
	if len(s.devs.gone) > 0 {
		if s.devs.goneCh == nil {
			s.devs.goneCh = make(chan struct{}, 1)
		}
		select {
		case s.devs.goneCh <- struct{}{}:
		default:
		}
		s.notifyChanged()
	}
}

// RecordEvent commits one event of the station's own kind (such as
// registry.result) in the log, in order with the rental events. It returns
// once the event is durable. Errors: EUNAVAILABLE when the store cannot
// write (the event then waits in memory and is written once it can).
func (s *Station) RecordEvent(ctx context.Context, t EventType, data any) error {
	ctx = context.WithoutCancel(ctx)
	_, cerr := s.decide(func() error {
		now := s.clock.Now()
		s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, t, data)}})
		return nil
	})
	if cerr != nil {
		return &Error{Code: EUNAVAILABLE, Reason: ReasonUnavailable, Message: "event waits for the store", Err: cerr}
	}
	return nil
}

// forgetLocked drops a device's record: out of the map and out of the
// change list that ChangedSince walks.
func (s *Station) forgetLocked(rec *deviceRecord) {
	delete(s.devices, rec.dev.ID)
	s.changes.remove(rec)
}

// remove unlinks r, if linked.
func (l *changeList) remove(r *deviceRecord) {
	if r.prev == nil && l.head != r {
		return // not linked
	}
	if r.prev != nil {
		r.prev.next = r.next
	} else {
		l.head = r.next
	}
	if r.next != nil {
		r.next.prev = r.prev
	} else {
		l.tail = r.prev
	}
	r.prev, r.next = nil, nil
}

// EventRegistryResult answers every registry version (§3.3, §3.6).
const EventRegistryResult EventType = "registry.result"

// ReasonStale refuses a registry older than the one applied (§3.6).
const ReasonStale Reason = "stale"

// RegistryResultData is the data of a registry.result event. Index and
// Detail say which entry made a registry invalid, and why.
type RegistryResultData struct {
	Version uint64 `json:"version"`
	OK      bool   `json:"ok"`
	Reason  Reason `json:"reason,omitempty"`
	Index   *int   `json:"index,omitempty"`
	Detail  string `json:"detail,omitempty"`
	Added   int    `json:"added"`
	Removed int    `json:"removed"`
	Changed int    `json:"changed"`
}

// RegistryMessage is a message of R/S/down/registry (§3.6). Devices is a
// JSON array of §8 device entries, as a string: the signature covers it
// exactly as sent.
type RegistryMessage struct {
	Version uint64 `json:"version"`
	Devices string `json:"devices"`
	Sig     string `json:"sig,omitempty"`
}

// registryContext opens every signed registry text (§3.6).
const registryContext = "edged-registry-v1"

// ParseRegistryMessage decodes a registry message. Errors: EINVALID.
func ParseRegistryMessage(payload []byte) (RegistryMessage, error) {
	var m RegistryMessage
	if err := json.Unmarshal(payload, &m); err != nil {
		return m, invalid("registry: %v", err)
	}
	if m.Version == 0 {
		return m, invalid("registry: version must be at least 1")
	}
	return m, nil
}

// RegistrySignedText is what a registry's sig covers: the context, the
// station id, the version in decimal and the devices string, joined by
// newlines.
func RegistrySignedText(station string, m RegistryMessage) []byte {
	return []byte(strings.Join([]string{registryContext, station, strconv.FormatUint(m.Version, 10), m.Devices}, "\n"))
}

// VerifyRegistry checks m's sig against key for this station. Errors:
// EINVALID with reason bad_signature.
func VerifyRegistry(key ed25519.PublicKey, station string, m RegistryMessage) error {
	bad := &Error{Code: EINVALID, Reason: ReasonBadSignature, Message: "bad signature"}
	if m.Sig == "" {
		bad.Message = "missing signature"
		return bad
	}
	sig, err := base64.StdEncoding.DecodeString(m.Sig)
	if err != nil || len(sig) != ed25519.SignatureSize || !ed25519.Verify(key, RegistrySignedText(station, m), sig) {
		return bad
	}
	return nil
}

// SignRegistry returns the base64 signature of m for station.
func SignRegistry(key ed25519.PrivateKey, station string, m RegistryMessage) string {
	return base64.StdEncoding.EncodeToString(ed25519.Sign(key, RegistrySignedText(station, m)))
}

// RegistryHandler takes the messages of R/S/down/registry, with the
// acknowledgement rule of CloudHandler: nil once the registry and its
// result are durable.
type RegistryHandler interface {
	Registry(ctx context.Context, payload []byte) error
}

// AppliedRegistry is the registry a station runs on, as kept in the store.
type AppliedRegistry struct {
	Version   uint64             `json:"version"`
	Devices   string             `json:"devices"`
	AppliedAt time.Time          `json:"applied_at"`
	Result    RegistryResultData `json:"result"`
}

// RegistryStore keeps the applied registry across restarts. Errors of
// SaveRegistry: EUNAVAILABLE when it cannot write.
type RegistryStore interface {
	// Registry returns the applied registry; ok is false when none was.
	Registry(ctx context.Context) (r AppliedRegistry, ok bool, err error)
	SaveRegistry(ctx context.Context, r AppliedRegistry) error
}

func (d DeviceDiff) String() string {
	return fmt.Sprintf("added %d, removed %d, changed %d", len(d.Added), len(d.Removed), len(d.Changed))
}

// RetiringDevices returns the entries of the retiring devices. The daemon
// keeps them in its store, so a restart while a removed device's rental
// runs resumes that rental instead of ending it.
func (s *Station) RetiringDevices() []Device {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Device
	for _, id := range s.order {
		if s.devs.retiring[id] {
			out = append(out, s.devices[id].dev)
		}
	}
	return out
}
