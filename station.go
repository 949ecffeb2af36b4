package edged

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// StationOptions configure a Station.
type StationOptions struct {
	ID      string
	Devices []Device
	Store   Store
	// Commander delivers commands to devices; it may be set later with
	// SetCommander, before Open.
	Commander Commander
	Clock     Clock
	// VerifyKey, when set, makes signatures on rental messages mandatory.
	VerifyKey    ed25519.PublicKey
	StartTimeout time.Duration
	Logger       *slog.Logger
}

// Station is the rental engine and the registry of the station's devices:
// it decides what happens to grants, extends, cancels, renter commands and
// device reports, and records every decision in the Store before it is
// acknowledged to anyone. Its parts, each in its own file: the rental
// rules, pure decisions under mu (rules.go); the device registry
// (registry.go); the committer, which makes decisions durable in groups
// and then carries out their effects (committer.go); the timer loop
// (timers.go). This file holds the entry points: each decides under mu,
// then waits for the committer.
//
// A decision, once begun, is carried out whole: its store commits and
// device commands do not heed the caller's cancellation, so a cloud
// connection dropping mid-message cannot leave a rental half started.
//
// Rental time runs on the monotonic clock: a rental's used time is the
// time used at its last base (start ack or resume) plus the monotonic time
// since. Wall times in events are informative and flagged with
// clock_synced.
type Station struct {
	id           string
	store        Store
	cmd          Commander
	clock        Clock
	verifyKey    ed25519.PublicKey
	startTimeout time.Duration
	log          *slog.Logger

	changed chan struct{}
	wake    chan struct{}
	nextRun time.Time // when Run passes next (Tick's answer), or earlier once poked
	// beat is when Run last completed a Tick (Unix nanoseconds), for the
	// watchdog: a stuck rental loop must stop the pings.
	beat atomic.Int64

	mu    sync.Mutex
	stats StationStats
	// version counts device state changes station-wide: each state
	// carries the version of its last change (ChangedSince).
	version        uint64
	changes        changeList
	devices        map[string]*deviceRecord
	order          []string
	live           map[string]*liveRental // starting and active rentals by id
	pending        map[string]*pendingCommand
	lastCheckpoint time.Time

	// unrecorded holds the changes decided and enforced while the store
	// could not write, in decision order; Tick retries them with backoff.
	// While it is not empty every later change queues behind it, so
	// events reach the log in the order they were decided. The maps hold
	// the latest queued record of each key, for lookups meanwhile.
	unrecorded  []deferredChange
	unrecordedN atomic.Int64
	// stopsDone are delivered stops whose records are deleted with the
	// next commit (or by Tick within a second): losing one in a crash only
	// resends a stop the device acknowledges again, and any new rental of
	// the device commits it first, so it costs no fsync of its own.
	stopsDone []StopRecord
	queued    overlay
	retryAt   time.Time
	retryWait time.Duration
	retrying  bool // the committer is writing the unrecorded changes

	// The pipeline (committer.go): cur is the decision being made; queue
	// the decisions waiting for the committer, in decision order;
	// committing is set while a committer runs; seq numbers decisions'
	// changes.
	cur        *ticket
	queue      []*ticket
	committing bool
	seq        uint64
	cstats     committerStats
	// urgent wakes a committer lingering over device acks when a decision
	// that may not wait is queued; lastCommit is when the last commit
	// ended (UnixNano), lastCommitTook how long it took.
	urgent         chan struct{}
	lastCommit     atomic.Int64
	lastCommitTook atomic.Int64
	lingerFor      time.Duration // lingerFor, or a test's
	// durable is the seq up to which every decided change is written.
	durable uint64
	// owed holds the cloud messages (by result key; "c:" and a cmd_id for
	// renter commands; "p:" and a payload hash for a message refused
	// unread) whose answer waits for the store, their caller told so
	// (EUNAVAILABLE) and holding them unacknowledged, with the seq of the
	// answer's last change. While that answer waits, a retry of the same
	// delivery adds nothing, so an outage does not multiply identical
	// results (one answer per message, §3.1).
	owed map[string]uint64

	// deciding is the rental message being decided, if any: see relay.go.
	deciding decision

	devs deviceList // the list's changes at run time: devicelist.go
}

// NewStation returns a Station for the given devices. Call Open before use.
func NewStation(o StationOptions) (*Station, error) {
	if !ValidStationID(o.ID) {
		return nil, Errorf(EINVALID, "bad station id %q", o.ID)
	}
	if o.Store == nil || o.Clock == nil {
		return nil, Errorf(EINVALID, "station needs a store and a clock")
	}
	if o.StartTimeout <= 0 {
		o.StartTimeout = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Station{
		id: o.ID, store: o.Store, cmd: o.Commander, clock: o.Clock,
		verifyKey: o.VerifyKey, startTimeout: o.StartTimeout, log: o.Logger,
		changed: make(chan struct{}, 1), wake: make(chan struct{}, 1), urgent: make(chan struct{}, 1),
		lingerFor: lingerFor,
		devices:   map[string]*deviceRecord{},
		live:      map[string]*liveRental{},
		pending:   map[string]*pendingCommand{},
	}
	for _, d := range o.Devices {
		if _, dup := s.devices[d.ID]; dup {
			return nil, Errorf(EINVALID, "device %q declared twice", d.ID)
		}
		// A device never seen was last updated when edged first loaded
		// it, not at the zero time; Open keeps a stored state's time.
		rec := &deviceRecord{dev: d, state: DeviceState{
			DeviceID: d.ID, Kind: d.Kind, Transport: d.Transport,
			Status: StatusUnknown, Telemetry: map[string]any{},
			UpdatedAt: o.Clock.Now().UTC().Round(time.Millisecond),
		}}
		if d.Location != nil {
			l := *d.Location
			rec.state.Location = &l
		}
		s.devices[d.ID] = rec
		s.order = append(s.order, d.ID)
	}
	return s, nil
}

// SetCommander sets where device commands go. Call it before Open.
func (s *Station) SetCommander(c Commander) { s.cmd = c }

// ID returns the station id.
func (s *Station) ID() string { return s.id }

// Open restores the station from its store: the last known device states
// (all offline until they report), and every rental that was running,
// resumed with the time it had left at its last checkpoint, less the
// downtime when the wall clock lets it be measured (§4), and every stop not
// yet delivered. A grant whose start was never acknowledged before the
// restart ends as timeout. Open fails only when the store cannot be read: a
// store that cannot write (a full disk) keeps the resume's records in
// memory until it can, and the station enforces its rentals meanwhile.
func (s *Station) Open(ctx context.Context) error {
	states, err := s.store.DeviceStates(ctx)
	if err != nil {
		return fmt.Errorf("load device states: %w", err)
	}
	rentals, err := s.store.Rentals(ctx, 0, RentalStarting, RentalActive)
	if err != nil {
		return fmt.Errorf("load rentals: %w", err)
	}
	stops, err := s.store.Stops(ctx)
	if err != nil {
		return fmt.Errorf("load stops: %w", err)
	}
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	s.mu.Lock()
	t := s.beginLocked()
	for _, st := range states {
		rec, ok := s.devices[st.DeviceID]
		if !ok {
			continue // no longer configured
		}
		rec.state.Status = st.Status
		rec.state.Fault = st.Fault
		rec.state.Maintenance = st.Maintenance
		rec.state.Telemetry = st.Telemetry
		if rec.state.Telemetry == nil {
			rec.state.Telemetry = map[string]any{}
		}
		if n := BoundTelemetry(rec.state.Telemetry); n > 0 { // saved before the bounds of §2
			s.log.Warn("telemetry over the state bounds dropped", "device", st.DeviceID, "fields", n)
		}
		if st.Location != nil {
			rec.state.Location = st.Location
		}
		rec.state.LastSeen = st.LastSeen
		rec.state.UpdatedAt = st.UpdatedAt
	}
	now := s.clock.Now()
	var ch Change
	for _, st := range stops {
		rec, ok := s.devices[st.DeviceID]
		if !ok {
			ch.Stops = append(ch.Stops, StopRecord{DeviceID: st.DeviceID, Done: true})
			continue
		}
		// Sent when the device comes online; all are offline until then.
		rec.stop = &outstandingStop{rec: st, wait: s.startTimeout}
	}
	for _, r := range rentals {
		rec, ok := s.devices[r.DeviceID]
		if !ok || rec.rental != nil {
			// The device is gone from the config, or (never expected) holds
			// two rentals: end this one now.
			r.State, r.Reason, r.EndedAt = RentalEnded, ReasonOperator, now
			ch.Rentals = append(ch.Rentals, r)
			ch.Events = append(ch.Events, s.event(now, EventRentalEnded, RentalEndedData{
				RentalID: r.ID, DeviceID: r.DeviceID, RenterID: r.RenterID,
				EndedAt: now, UsedS: seconds(r.Used), Reason: ReasonOperator,
			}))
			continue
		}
		if r.State == RentalStarting {
			r.State, r.Reason, r.StartCmdID = RentalRejected, ReasonTimeout, ""
			ch = merge(ch, s.grantAnswer(now, r, false, ReasonTimeout))
			ch.Rentals = append(ch.Rentals, r)
			ch.Stops = append(ch.Stops, s.beginStopLocked(now, rec, r.ID)) // sent when the device reconnects
			continue
		}
		used := r.Used
		if r.CheckpointSynced && s.clock.Synced() && !r.CheckpointAt.IsZero() {
			if down := now.Sub(r.CheckpointAt); down > 0 {
				used += down
			}
		}
		l := &liveRental{r: r, base: now, baseUsed: used}
		l.r.EndsAt = now.Add(r.Remaining(used))
		l.r.Used, l.r.CheckpointAt, l.r.CheckpointSynced = used, now, s.clock.Synced()
		s.live[r.ID] = l
		rec.rental = l
		rec.state.Rental = &DeviceRental{RentalID: r.ID, RenterID: r.RenterID, StartedAt: r.StartedAt, EndsAt: l.r.EndsAt}
		ch.Rentals = append(ch.Rentals, l.r)
		s.log.Info("rental resumed", "rental", r.ID, "device", r.DeviceID, "remaining", r.Remaining(used).Round(time.Second))
	}
	s.lastCheckpoint = now
	s.commitLocked(ctx, now, ch)
	resumed := !ch.Empty()
	s.expireLocked(ctx, now)
	q := s.endLocked(t)
	s.mu.Unlock()
	// A full disk must not keep edged down: the rentals are enforced now
	// and the record waits for the store.
	if err := s.finish(q); err != nil && resumed {
		s.log.Error("resume rentals: the record waits for the store", "err", err)
	}
	return nil
}

// event builds an event envelope; the store assigns its seq.
func (s *Station) event(now time.Time, t EventType, data any) Event {
	data = s.markRelayedLocked(t, data)
	b, err := json.Marshal(data)
	if err != nil {
		panic(fmt.Sprintf("edged: marshal %s data: %v", t, err)) // our own types always marshal
	}
	return Event{Station: s.id, Type: t, TS: now.UTC().Round(time.Millisecond), ClockSynced: s.clock.Synced(), Data: b}
}

// StationStats counts what the station decided since it started, for
// metrics.
type StationStats struct {
	// Results counts rental.result events by reason, "ok" for successes.
	Results map[string]uint64
	Started uint64
	// Ended counts rental.ended events by reason.
	Ended map[Reason]uint64
	// Commands counts command.result events by reason, "ok" for successes.
	Commands    map[string]uint64
	UnrentedUse uint64
	// UnrecordedDropped counts presence events dropped because too many
	// records already waited for a store that could not write.
	UnrecordedDropped uint64
	// Commits counts the committer's store commits, one fsync each, and
	// CommitChanges the decisions' changes they carried: their ratio is
	// how many decisions share an fsync.
	Commits, CommitChanges uint64
}

func (s *Station) countLocked(e Event) {
	if s.stats.Results == nil {
		s.stats.Results, s.stats.Ended, s.stats.Commands = map[string]uint64{}, map[Reason]uint64{}, map[string]uint64{}
	}
	var d struct {
		OK     bool   `json:"ok"`
		Reason Reason `json:"reason"`
	}
	switch e.Type {
	case EventRentalResult, EventCommandResult:
		_ = json.Unmarshal(e.Data, &d)
		key := string(d.Reason)
		if d.OK {
			key = "ok"
		}
		if e.Type == EventRentalResult {
			s.stats.Results[key]++
		} else {
			s.stats.Commands[key]++
		}
	case EventRentalStarted:
		s.stats.Started++
	case EventRentalEnded:
		_ = json.Unmarshal(e.Data, &d)
		s.stats.Ended[d.Reason]++
	case EventUnrentedUse:
		s.stats.UnrentedUse++
	}
}

// Stats returns a copy of the station's counters.
func (s *Station) Stats() StationStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := StationStats{Started: s.stats.Started, UnrentedUse: s.stats.UnrentedUse, UnrecordedDropped: s.stats.UnrecordedDropped,
		Commits: s.cstats.commits.Load(), CommitChanges: s.cstats.changes.Load(),
		Results: map[string]uint64{}, Ended: map[Reason]uint64{}, Commands: map[string]uint64{}}
	for k, v := range s.stats.Results {
		c.Results[k] = v
	}
	for k, v := range s.stats.Ended {
		c.Ended[k] = v
	}
	for k, v := range s.stats.Commands {
		c.Commands[k] = v
	}
	return c
}

// sendLocked has the committer deliver a command once the decision's
// changes are committed (only when durable, with durableOnly), logging
// failures. onErr, when set, decides what a failure means for the rental,
// as a decision of its own.
func (s *Station) sendLocked(deviceID string, c DeviceCommand, durableOnly bool, onErr func(error)) {
	cmd := s.cmd
	s.actLocked(durableOnly, func(ctx context.Context) func() {
		var err error
		if cmd == nil {
			err = &Error{Code: EUNAVAILABLE, Reason: ReasonDeviceOffline, Message: "no device link"}
		} else if err = cmd.Send(ctx, deviceID, c); err != nil {
			s.log.Warn("send command", "device", deviceID, "action", c.Action, "err", err)
		}
		if err == nil || onErr == nil {
			return nil
		}
		return func() { onErr(err) }
	})
}

func newCmdID() string {
	var b [9]byte
	_, _ = rand.Read(b[:])
	return "edged-" + hex.EncodeToString(b[:])
}

// Rental applies a message of R/S/down/rentals (§3.1). It returns nil once
// the message's effect and its result are durable; a refusal is reported as
// a rental.result event, not as an error.
func (s *Station) Rental(ctx context.Context, payload []byte) error {
	return s.applyRental(ctx, payload, "")
}

// applyRental decides a rental message from the cloud (relayedBy empty) or
// relayed by device relayedBy (§2): one decision for both, the relay adding
// only its two rules.
func (s *Station) applyRental(ctx context.Context, payload []byte, relayedBy string) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	m, perr := ParseRentalMessage(payload)
	if s.unrecordedN.Load() > 0 {
		s.retryNow() // records waiting for the store go first, if it takes them now
	}
	var d decision
	err, commitErr := s.decideMessage(func() error {
		s.deciding = decision{rentalID: truncate(m.RentalID), op: truncate(m.Op), relayedBy: relayedBy, answeredLater: new(bool)}
		err := s.rentalMessageLocked(ctx, m, perr, relayedBy, payload)
		d, s.deciding = s.deciding, decision{}
		return err
	})
	return s.decided(d, cmp.Or(err, commitErr))
}

func truncate(s string) string {
	if len(s) > 128 {
		s = s[:128]
	}
	return s
}

// RenterCommand applies a message of R/S/down/commands (§3.1): it is
// forwarded to the device only while its renter holds the device's active
// rental; action "end" ends the rental. Every command gets a
// command.result, now or when the device answers.
func (s *Station) RenterCommand(ctx context.Context, payload []byte) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	c, perr := ParseRenterCommand(payload)
	if s.unrecordedN.Load() > 0 {
		s.retryNow() // records waiting for the store go first, if it takes them now
	}
	err, commitErr := s.decideMessage(func() error { return s.renterCommandLocked(ctx, c, perr, payload) })
	return cmp.Or(err, commitErr)
}

// DeviceOnline records a device connecting or going away. A device that
// returns during its rental gets start again with the time left; one with a
// stop outstanding gets it at once.
func (s *Station) DeviceOnline(ctx context.Context, deviceID string, online bool) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	// The commit's outcome is not the device's business: what was decided
	// is enforced, its record waits for the store if it must.
	err, _ := s.decide(func() error { return s.deviceOnlineLocked(ctx, deviceID, online) })
	return err
}

// DeviceState records a device's status report. A fault ends its rental
// (device_fault); in_use with no rental is unrented use, and the device is
// stopped. A report whose telemetry would take the device over the state
// bounds (§2) changes nothing: EINVALID.
func (s *Station) DeviceState(ctx context.Context, deviceID string, r StateReport) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	// The commit's outcome is not the device's business: what was decided
	// is enforced, its record waits for the store if it must.
	err, _ := s.decide(func() error { return s.deviceStateLocked(ctx, deviceID, r) })
	return err
}

// DeviceEvent appends a device's event to the log, durably, as a
// device.event. It takes the station's lock only to queue the event: the
// committer commits the events of many devices together. While records wait for the store it
// fails with EUNAVAILABLE, so the device is not acknowledged and the event
// does not overtake them.
func (s *Station) DeviceEvent(ctx context.Context, deviceID string, event []byte) error {
	err, commitErr := s.decide(func() error {
		if _, ok := s.devices[deviceID]; !ok {
			return Errorf(ENOTFOUND, "unknown device %q", deviceID)
		}
		if n := len(s.unrecorded); n > 0 {
			// Records wait for the store: this one must not overtake them,
			// and the device must not be acknowledged before it is stored.
			return errUnrecorded(n)
		}
		// Dropped, not kept, when the store cannot write it: the device is
		// not acknowledged and sends it again.
		now := s.clock.Now()
		s.recordLocked(Change{Events: []Event{s.event(now, EventDeviceEvent, DeviceEventData{DeviceID: deviceID, Event: event})}}, true, false, nil)
		return nil
	})
	if err != nil {
		return err
	}
	if commitErr != nil {
		return fmt.Errorf("device event: %w", commitErr)
	}
	return nil
}

// DeviceAck matches a device's ack to the command it answers.
func (s *Station) DeviceAck(ctx context.Context, deviceID string, a CommandAck) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	// The commit's outcome is not the device's business: what was decided
	// is enforced, its record waits for the store if it must. An ack may
	// wait briefly for another decision's commit to carry it (lingerFor).
	err, _ := s.decideTicket(true, func() error { return s.deviceAckLocked(ctx, deviceID, a) })
	return err
}

// EndRental ends a starting or active rental for reason (operator for a
// technician's request). Errors: ENOTFOUND when no such rental is running.
func (s *Station) EndRental(ctx context.Context, rentalID string, reason Reason) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	err, commitErr := s.decide(func() error {
		l, ok := s.live[rentalID]
		if !ok {
			return Errorf(ENOTFOUND, "no running rental %q", rentalID)
		}
		return s.endRentalLocked(ctx, s.clock.Now(), l, reason)
	})
	if err != nil {
		return err
	}
	if commitErr != nil {
		return &Error{Code: EUNAVAILABLE, Message: "rental ended and its device stopped, but the record waits for the store", Err: commitErr}
	}
	return nil
}

// ActiveRentals returns the running rentals with their time used as of now,
// in grant order.
func (s *Station) ActiveRentals() []Rental {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	out := make([]Rental, 0, len(s.live))
	for _, l := range s.live {
		r := l.r
		r.Used = l.used(now)
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GrantedAt.Before(out[j].GrantedAt) })
	return out
}

var (
	_ DeviceReporter = (*Station)(nil)
	_ CloudHandler   = (*Station)(nil)
	_ StateSource    = (*Station)(nil)
)
