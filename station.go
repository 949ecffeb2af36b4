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
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// CheckpointInterval is how often active rentals record how long they have
// run, so a restart loses at most this much of a rental's accounting (§4
// asks for at most 5 s).
const CheckpointInterval = 3 * time.Second

// unrentedRepeat is how often a device that keeps reporting in_use with no
// rental is stopped again and reported again.
const unrentedRepeat = 10 * time.Second

// maxStopWait caps the backoff between resends of an outstanding stop (§4).
const maxStopWait = 60 * time.Second

// stopIDs is how many of an outstanding stop's latest cmd ids are matched
// to acks: a late ack of an earlier send still counts.
const stopIDs = 8

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
// acknowledged to anyone. All its rules live in this file.
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
	// beat is when Run last completed a Tick (Unix nanoseconds), for the
	// watchdog: a stuck rental loop must stop the pings.
	beat atomic.Int64

	mu             sync.Mutex
	stats          StationStats
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
	queued    queuedRecords
	retryAt   time.Time
	retryWait time.Duration

	devs deviceList // the list's changes at run time: devicelist.go
}

// maxUnrecorded bounds the changes kept in memory while the store cannot
// write. Past it, changes holding nothing but droppable events (presence)
// are dropped and counted; rental records never are.
const maxUnrecorded = 100000

// maxRetryWait caps the backoff between attempts to write the unrecorded
// changes, so a store that recovers is used again within seconds.
const maxRetryWait = 5 * time.Second

type deferredChange struct {
	ch Change
	// checkpoint: only rental checkpoints, replaced by a newer checkpoint
	// queued right behind it.
	checkpoint bool
}

type queuedRecords struct {
	rentals  map[string]Rental
	commands map[string]CommandRecord
	results  map[string]ResultRecord
}

type deviceRecord struct {
	dev   Device
	state DeviceState
	// snap is a copy of state taken at its last change, shared read-only
	// with readers, so DeviceStates does not copy every map on every call.
	snap   *DeviceState
	rental *liveRental // starting or active
	// stop is the stop not yet delivered, nil when none is outstanding.
	stop         *outstandingStop
	graceUntil   time.Time // in_use tolerated until then after a rental ends
	lastUnrented time.Time
}

// outstandingStop is a stop the device has not yet acknowledged (§4): sent
// while the device is online, again every wait (doubling up to
// maxStopWait), until the device acks one with ok true or reports idle.
type outstandingStop struct {
	rec  StopRecord
	ids  []string      // cmd ids sent, newest last, at most stopIDs
	wait time.Duration // before the next resend
	due  time.Time     // next resend while online
}

type liveRental struct {
	r        Rental
	base     time.Time     // monotonic reading when baseUsed was taken
	baseUsed time.Duration // time used at base
	deadline time.Time     // start ack deadline while starting
}

func (l *liveRental) used(now time.Time) time.Duration {
	if l.r.State != RentalActive {
		return 0
	}
	d := l.baseUsed + now.Sub(l.base)
	if d < 0 {
		d = l.baseUsed
	}
	return d
}

type commandKind int

const (
	kindStart  commandKind = iota // a rental's start, awaiting its ack
	kindResync                    // start resent to a running device; ack ignored
	kindRenter                    // a renter's command forwarded to the device
)

type pendingCommand struct {
	kind     commandKind
	cmdID    string
	deviceID string
	rentalID string
	record   CommandRecord
	deadline time.Time
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
		changed: make(chan struct{}, 1), wake: make(chan struct{}, 1),
		devices: map[string]*deviceRecord{},
		live:    map[string]*liveRental{},
		pending: map[string]*pendingCommand{},
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
	s.mu.Lock()
	defer s.mu.Unlock()
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
	if !ch.Empty() {
		// A full disk must not keep edged down: the rentals are enforced
		// now and the record waits for the store.
		if err := s.commitLocked(ctx, now, ch); err != nil {
			s.log.Error("resume rentals: the record waits for the store", "err", err)
		}
	}
	s.expireLocked(ctx, now)
	return nil
}

// Run enforces rentals until ctx ends: start timeouts, command timeouts,
// expiry and checkpoints. It returns nil when ctx is cancelled.
func (s *Station) Run(ctx context.Context) error {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-s.wake:
		}
		next := s.Tick(ctx)
		s.beat.Store(time.Now().UnixNano())
		d := time.Until(next)
		if d < time.Millisecond {
			d = time.Millisecond
		}
		if d > time.Second {
			d = time.Second
		}
		if !t.Stop() {
			select {
			case <-t.C:
			default:
			}
		}
		t.Reset(d)
	}
}

// LastTick is when Run last completed a pass of the rental rules; zero
// before the first. Run passes at least once a second, so an older time
// means the rental loop is stuck.
func (s *Station) LastTick() time.Time {
	n := s.beat.Load()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// Tick applies every rule that depends on time passing, as of the clock's
// now, and returns when it next needs to run.
func (s *Station) Tick(ctx context.Context) time.Time {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	s.retryLocked(ctx, now)
	s.expireLocked(ctx, now)
	s.sweepRetiringLocked()
	if len(s.live) > 0 && now.Sub(s.lastCheckpoint) >= CheckpointInterval {
		s.checkpointLocked(ctx, now)
	}
	if len(s.stopsDone) > 0 {
		_ = s.commitLocked(ctx, now, Change{})
	}
	next := now.Add(time.Second)
	for _, id := range s.order {
		rec := s.devices[id]
		if rec.stop == nil || !rec.state.Online {
			continue
		}
		if !now.Before(rec.stop.due) {
			s.sendStopLocked(ctx, now, rec)
		}
		if rec.stop.due.Before(next) {
			next = rec.stop.due
		}
	}
	for _, l := range s.live {
		var at time.Time
		if l.r.State == RentalStarting {
			at = l.deadline
		} else {
			at = now.Add(l.r.Remaining(l.used(now)))
		}
		if at.Before(next) {
			next = at
		}
	}
	for _, p := range s.pending {
		if p.deadline.Before(next) {
			next = p.deadline
		}
	}
	return next
}

func (s *Station) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Station) notifyChanged() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// expireLocked ends rentals whose time is up and resolves commands whose
// ack never came.
func (s *Station) expireLocked(ctx context.Context, now time.Time) {
	ids := make([]string, 0, len(s.live))
	for id := range s.live {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		l := s.live[id]
		switch {
		case l.r.State == RentalStarting && !now.Before(l.deadline):
			s.failStartLocked(ctx, now, l, ReasonTimeout, "")
		case l.r.State == RentalActive && l.r.Remaining(l.used(now)) == 0:
			s.endLocked(ctx, now, l, ReasonExpired)
		}
	}
	for id, p := range s.pending {
		if now.Before(p.deadline) || p.kind == kindStart {
			continue
		}
		delete(s.pending, id)
		if p.kind == kindRenter {
			s.finishRenterLocked(ctx, now, p, false, ReasonTimeout, "")
		}
	}
}

func (s *Station) checkpointLocked(ctx context.Context, now time.Time) {
	var ch Change
	for _, l := range s.live {
		if l.r.State != RentalActive {
			continue
		}
		l.r.Used, l.r.CheckpointAt, l.r.CheckpointSynced = l.used(now), now, s.clock.Synced()
		ch.Rentals = append(ch.Rentals, l.r)
	}
	if len(ch.Rentals) == 0 {
		s.lastCheckpoint = now
		return
	}
	s.lastCheckpoint = now
	if n := len(s.unrecorded); n > 0 && s.unrecorded[n-1].checkpoint {
		s.unrecorded[n-1].ch = ch // nothing queued since: the newer one supersedes it
		return
	}
	if err := s.tryCommitLocked(ctx, now, ch); err != nil {
		s.deferLocked(now, deferredChange{ch: ch, checkpoint: true}, err)
	}
}

// event builds an event envelope; the store assigns its seq.
func (s *Station) event(now time.Time, t EventType, data any) Event {
	b, err := json.Marshal(data)
	if err != nil {
		panic(fmt.Sprintf("edged: marshal %s data: %v", t, err)) // our own types always marshal
	}
	return Event{Station: s.id, Type: t, TS: now.UTC().Round(time.Millisecond), ClockSynced: s.clock.Synced(), Data: b}
}

// commitLocked records a decision: durably now, or, when the store cannot
// write (or earlier decisions still wait for it), queued behind them in
// memory and written by Tick once it can. It returns nil only when ch is
// durable; the decision stands either way, so callers carry it out and
// pass the error on to whoever must not be acknowledged.
func (s *Station) commitLocked(ctx context.Context, now time.Time, ch Change) error {
	err := s.tryCommitLocked(ctx, now, ch)
	if err == nil {
		return nil
	}
	if ErrorCode(err) == EINVALID {
		// Never expected (ids are checked before): a change the store
		// refuses as invalid would block the queue for ever.
		s.log.Error("change refused by the store", "err", err)
		return err
	}
	s.deferLocked(now, deferredChange{ch: s.withStopsDoneLocked(ch)}, err)
	s.stopsDone = nil
	for _, e := range ch.Events {
		s.countLocked(e)
	}
	return err
}

// withStopsDoneLocked returns ch with the delivered stops' deletions first,
// so a stop begun in ch for the same device comes after them.
func (s *Station) withStopsDoneLocked(ch Change) Change {
	if len(s.stopsDone) == 0 {
		return ch
	}
	ch.Stops = append(slices.Clone(s.stopsDone), ch.Stops...)
	return ch
}

// tryCommitLocked commits ch durably, or fails and changes nothing. While
// changes wait for the store, it first tries to write them (when their
// retry is due) and fails if they still wait, so ch never overtakes them.
func (s *Station) tryCommitLocked(ctx context.Context, now time.Time, ch Change) error {
	if !s.writableLocked(ctx, now, false) {
		return errUnrecorded(len(s.unrecorded))
	}
	if _, err := s.store.Commit(ctx, s.withStopsDoneLocked(ch)); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	s.stopsDone = nil
	for _, e := range ch.Events {
		s.countLocked(e)
	}
	return nil
}

// writableLocked reports whether no change waits for the store, trying to
// write the waiting ones first when their retry is due or now is set.
func (s *Station) writableLocked(ctx context.Context, now time.Time, force bool) bool {
	if len(s.unrecorded) == 0 {
		return true
	}
	if force {
		s.retryAt = now
	}
	s.retryLocked(ctx, now)
	return len(s.unrecorded) == 0
}

func errUnrecorded(n int) error {
	return &Error{Code: EUNAVAILABLE, Reason: ReasonUnavailable,
		Message: fmt.Sprintf("store cannot write: %d records wait to be written", n)}
}

// Unrecorded returns how many decisions are enforced but not yet durable,
// waiting for the store to accept writes again (§4): nonzero means the
// station cannot record, for /healthz and the status page. It does not
// take the station's lock.
func (s *Station) Unrecorded() int { return int(s.unrecordedN.Load()) }

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

// send delivers a command, logging failures: the caller decides what a
// failure means for the rental.
func (s *Station) sendLocked(ctx context.Context, deviceID string, c DeviceCommand) error {
	if s.cmd == nil {
		return &Error{Code: EUNAVAILABLE, Reason: ReasonDeviceOffline, Message: "no device link"}
	}
	err := s.cmd.Send(ctx, deviceID, c)
	if err != nil {
		s.log.Warn("send command", "device", deviceID, "action", c.Action, "err", err)
	}
	return err
}

func newCmdID() string {
	var b [9]byte
	_, _ = rand.Read(b[:])
	return "edged-" + hex.EncodeToString(b[:])
}

func seconds(d time.Duration) int64 { return int64((d + time.Second/2) / time.Second) }

// beginStopLocked makes a stop outstanding for the device and returns its
// record, to be committed with the decision that stops the device. The
// caller sends it with sendStopLocked once the decision is made.
func (s *Station) beginStopLocked(now time.Time, rec *deviceRecord, rentalID string) StopRecord {
	rec.graceUntil = now.Add(2 * s.startTimeout)
	sr := StopRecord{DeviceID: rec.dev.ID, RentalID: rentalID, Since: now.UTC().Round(time.Millisecond)}
	rec.stop = &outstandingStop{rec: sr, wait: s.startTimeout}
	return sr
}

// sendStopLocked sends the device's outstanding stop if it is online, and
// schedules the next resend. A failed send is retried at that resend, like
// a lost one.
func (s *Station) sendStopLocked(ctx context.Context, now time.Time, rec *deviceRecord) {
	st := rec.stop
	if st == nil || !rec.state.Online {
		return
	}
	id := newCmdID()
	st.ids = append(st.ids, id)
	if len(st.ids) > stopIDs {
		st.ids = st.ids[len(st.ids)-stopIDs:]
	}
	st.due = now.Add(st.wait)
	st.wait = min(2*st.wait, max(maxStopWait, s.startTimeout))
	_ = s.sendLocked(ctx, rec.dev.ID, DeviceCommand{CmdID: id, Action: ActionStop, RentalID: st.rec.RentalID})
}

// stopDoneLocked forgets the device's outstanding stop: the device acked
// it or reported idle.
func (s *Station) stopDoneLocked(ctx context.Context, now time.Time, rec *deviceRecord, why string) {
	st := rec.stop
	rec.stop = nil
	// A report sent before the stop landed may still say in_use.
	rec.graceUntil = later(rec.graceUntil, now.Add(s.startTimeout))
	s.log.Info("stop delivered", "device", rec.dev.ID, "rental", st.rec.RentalID, "by", why)
	s.stopsDone = append(s.stopsDone, StopRecord{DeviceID: rec.dev.ID, Done: true})
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// resyncLocked sends start again to a running rental's device with the
// time it has left, so the device's own timer matches the station's.
func (s *Station) resyncLocked(ctx context.Context, now time.Time, l *liveRental) {
	id := newCmdID()
	c := startCommand(id, l.r, l.r.Remaining(l.used(now)), &l.r.EndsAt)
	if s.sendLocked(ctx, l.r.DeviceID, c) == nil {
		s.pending[id] = &pendingCommand{kind: kindResync, cmdID: id, deviceID: l.r.DeviceID, rentalID: l.r.ID, deadline: now.Add(s.startTimeout)}
	}
}

// startCommand is the start sent for a rental, carrying its remaining time.
func startCommand(cmdID string, r Rental, remaining time.Duration, endsAt *time.Time) DeviceCommand {
	d := int64((remaining + time.Second - 1) / time.Second)
	if d < 1 {
		d = 1
	}
	return DeviceCommand{CmdID: cmdID, Action: ActionStart, RentalID: r.ID, RenterID: r.RenterID, DurationS: d, EndsAt: endsAt}
}

// endLocked ends a started or starting rental for reason, durably, and
// stops its device.
func (s *Station) endLocked(ctx context.Context, now time.Time, l *liveRental, reason Reason) error {
	r := l.r
	used := l.used(now)
	if used > r.Duration {
		used = r.Duration
	}
	r.State, r.Reason, r.EndedAt, r.Used, r.CheckpointAt = RentalEnded, reason, now, used, now
	r.StartCmdID = ""
	rec := s.devices[r.DeviceID]
	ch := Change{Rentals: []Rental{r}, Events: []Event{s.event(now, EventRentalEnded, RentalEndedData{
		RentalID: r.ID, DeviceID: r.DeviceID, RenterID: r.RenterID,
		EndedAt: now.UTC().Round(time.Millisecond), UsedS: seconds(used), Reason: reason,
	})}, Stops: []StopRecord{s.beginStopLocked(now, rec, r.ID)}}
	// The device is stopped even when the store refuses the record: the
	// end is enforced now and recorded as soon as the store takes it.
	err := s.commitLocked(ctx, now, ch)
	s.dropLiveLocked(l)
	s.sendStopLocked(ctx, now, rec)
	s.touchLocked(rec, now)
	s.log.Info("rental ended", "rental", r.ID, "device", r.DeviceID, "reason", reason, "used_s", seconds(used))
	return err
}

// deferLocked keeps a change the store refused, in order, for Tick to
// retry with backoff, so an enforced decision is recorded once the disk
// recovers.
func (s *Station) deferLocked(now time.Time, d deferredChange, cause error) {
	if len(s.unrecorded) >= maxUnrecorded && droppableOnly(d.ch) {
		s.stats.UnrecordedDropped += uint64(len(d.ch.Events))
		return
	}
	if len(s.unrecorded) == 0 {
		s.log.Error("store cannot write: decisions are enforced and kept in memory until it can", "err", cause)
		s.queued = queuedRecords{rentals: map[string]Rental{}, commands: map[string]CommandRecord{}, results: map[string]ResultRecord{}}
	}
	s.unrecorded = append(s.unrecorded, d)
	s.unrecordedN.Store(int64(len(s.unrecorded)))
	for _, r := range d.ch.Rentals {
		s.queued.rentals[r.ID] = r
	}
	for _, r := range d.ch.Commands {
		s.queued.commands[r.CmdID] = r
	}
	for _, r := range d.ch.Results {
		s.queued.results[r.Key()] = r
	}
	if s.retryWait == 0 {
		s.retryWait = time.Second
		s.retryAt = now.Add(s.retryWait)
	}
}

func droppableOnly(ch Change) bool {
	if len(ch.Rentals)+len(ch.Commands)+len(ch.Results)+len(ch.Stops) > 0 {
		return false
	}
	for _, e := range ch.Events {
		if !e.Type.Droppable() {
			return false
		}
	}
	return true
}

// retryLocked commits the deferred changes, in order, once due.
func (s *Station) retryLocked(ctx context.Context, now time.Time) {
	if len(s.unrecorded) == 0 || now.Before(s.retryAt) {
		return
	}
	for len(s.unrecorded) > 0 {
		_, err := s.store.Commit(ctx, s.unrecorded[0].ch)
		if err != nil && ErrorCode(err) != EINVALID {
			s.retryWait = min(2*s.retryWait, maxRetryWait)
			s.retryAt = now.Add(s.retryWait)
			s.log.Warn("store still cannot write", "waiting", len(s.unrecorded), "retry_in", s.retryWait, "err", err)
			return
		}
		if err != nil {
			s.log.Error("waiting change refused by the store: dropped", "err", err)
		}
		s.unrecorded[0] = deferredChange{}
		s.unrecorded = s.unrecorded[1:]
		s.unrecordedN.Store(int64(len(s.unrecorded)))
	}
	s.unrecorded = nil
	s.queued = queuedRecords{}
	s.retryWait = 0
	s.log.Info("store writes again: every waiting record written")
}

func (s *Station) dropLiveLocked(l *liveRental) {
	delete(s.live, l.r.ID)
	if l.r.StartCmdID != "" {
		delete(s.pending, l.r.StartCmdID)
	}
	if rec := s.devices[l.r.DeviceID]; rec != nil && rec.rental == l {
		rec.rental = nil
		rec.state.Rental = nil
	}
}

// failStartLocked resolves a grant whose start failed: no ack in time, a
// refusal by the device, or a device that faulted first.
func (s *Station) failStartLocked(ctx context.Context, now time.Time, l *liveRental, reason Reason, detail string) {
	r := l.r
	r.State, r.Reason, r.StartCmdID = RentalRejected, reason, ""
	rec := s.devices[r.DeviceID]
	ch := s.grantAnswer(now, r, false, reason)
	ch.Rentals = []Rental{r}
	ch.Stops = []StopRecord{s.beginStopLocked(now, rec, r.ID)}
	_ = s.commitLocked(ctx, now, ch) // enforced either way; recorded once the store can
	s.dropLiveLocked(l)
	s.sendStopLocked(ctx, now, rec)
	s.touchLocked(rec, now)
	s.log.Info("rental refused", "rental", r.ID, "device", r.DeviceID, "reason", reason, "detail", detail)
}

func (s *Station) touchLocked(rec *deviceRecord, now time.Time) {
	rec.state.UpdatedAt = now.UTC().Round(time.Millisecond)
	rec.state.Version++
	snap := rec.state.Clone()
	rec.snap = &snap
	s.store.SaveDeviceState(snap)
	s.notifyChanged()
}

// view returns the device's state for readers: the shared snapshot of its
// last change when there is one.
func (rec *deviceRecord) view() DeviceState {
	if rec.snap != nil {
		return *rec.snap
	}
	return rec.state.Clone()
}

// Rental applies a message of R/S/down/rentals (§3.1). It returns nil once
// the message's effect and its result are durable; a refusal is reported as
// a rental.result event, not as an error.
func (s *Station) Rental(ctx context.Context, payload []byte) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	m, perr := ParseRentalMessage(payload)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	// Records waiting for the store go first, if it takes them now.
	s.writableLocked(ctx, now, true)
	unrecorded := func(reason Reason) error {
		// Neither the message nor its refusal is recorded: a forged or
		// garbled message cannot occupy a rental id.
		s.log.Info("rental message refused", "op", truncate(m.Op), "rental", truncate(m.RentalID), "device", truncate(m.DeviceID), "reason", reason)
		return s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, EventRentalResult, RentalResultData{
			RentalID: truncate(m.RentalID), DeviceID: truncate(m.DeviceID), Op: truncate(m.Op), OK: false, Reason: reason,
		})}})
	}
	if perr != nil {
		return unrecorded(ReasonInvalid)
	}
	if s.verifyKey != nil {
		if err := VerifyRental(s.verifyKey, s.id, m); err != nil {
			return unrecorded(ReasonBadSignature)
		}
	}
	// A message answered before is answered the same, whatever happened
	// since: the rental ended, its not_after passed, edged restarted.
	prev, err := s.resultLocked(ctx, ResultKey(m.RentalID, m.Op, m.DurationS))
	switch {
	case err == nil:
		return s.commitLocked(ctx, now, Change{Events: []Event{s.resultEvent(now, prev)}})
	case ErrorCode(err) != ENOTFOUND:
		return fmt.Errorf("%s: %w", m.Op, err)
	}
	refuse := func(reason Reason, rejectRental bool) error {
		ch := s.answer(now, m, false, reason)
		if reason == ReasonInvalid {
			// A message naming another device than its rental's is refused
			// as invalid and, like any invalid message, not recorded: the
			// right one may follow under the same key.
			ch.Results = nil
		}
		if rejectRental {
			ch.Rentals = []Rental{{ID: m.RentalID, DeviceID: m.DeviceID, RenterID: m.RenterID, State: RentalRejected,
				Reason: reason, Duration: time.Duration(m.DurationS) * time.Second, GrantedAt: now}}
		}
		s.log.Info("rental message refused", "op", m.Op, "rental", m.RentalID, "device", m.DeviceID, "reason", reason)
		return s.commitLocked(ctx, now, ch)
	}
	if m.NotAfter != "" && s.clock.Synced() {
		na, _ := time.Parse(time.RFC3339Nano, m.NotAfter)
		if now.After(na) {
			if m.Op != OpGrant {
				return refuse(ReasonExpired, false)
			}
			// A grant still starting has no result yet: it comes with the ack.
			if _, err := s.rentalLocked(ctx, m.RentalID); ErrorCode(err) == ENOTFOUND {
				return refuse(ReasonExpired, true)
			}
		}
	}
	switch m.Op {
	case OpGrant:
		return s.grantLocked(ctx, now, m, refuse)
	case OpExtend:
		return s.extendLocked(ctx, now, m, refuse)
	default:
		return s.cancelLocked(ctx, now, m, refuse)
	}
}

func truncate(s string) string {
	if len(s) > 128 {
		s = s[:128]
	}
	return s
}

// answer is the result of a rental message: its rental.result event and
// the record that answers its redeliveries.
func (s *Station) answer(now time.Time, m RentalMessage, ok bool, reason Reason) Change {
	return s.answerRecord(now, ResultRecord{RentalID: m.RentalID, Op: m.Op, DurationS: m.DurationS, DeviceID: m.DeviceID, OK: ok, Reason: reason})
}

// grantAnswer is the result of a rental's grant, known once its start is
// acknowledged, refused, timed out or cancelled.
func (s *Station) grantAnswer(now time.Time, r Rental, ok bool, reason Reason) Change {
	return s.answerRecord(now, ResultRecord{RentalID: r.ID, Op: OpGrant, DeviceID: r.DeviceID, OK: ok, Reason: reason})
}

func (s *Station) answerRecord(now time.Time, rr ResultRecord) Change {
	if rr.Op != OpExtend {
		rr.DurationS = 0
	}
	rr.At = now.UTC().Round(time.Millisecond)
	return Change{Results: []ResultRecord{rr}, Events: []Event{s.resultEvent(now, rr)}}
}

func (s *Station) resultEvent(now time.Time, rr ResultRecord) Event {
	d := RentalResultData{RentalID: rr.RentalID, DeviceID: rr.DeviceID, Op: rr.Op, OK: rr.OK, Reason: rr.Reason}
	if rr.Op == OpExtend {
		d.DurationS = rr.DurationS
	}
	return s.event(now, EventRentalResult, d)
}

// resultLocked finds the result a rental message got. Errors: ENOTFOUND.
// Errors: ENOTFOUND.
func (s *Station) resultLocked(ctx context.Context, key string) (ResultRecord, error) {
	if r, ok := s.queued.results[key]; ok {
		return r, nil
	}
	return s.store.Result(ctx, key)
}

// rentalLocked finds a rental's latest record, one waiting for the store
// included. Errors: ENOTFOUND.
func (s *Station) rentalLocked(ctx context.Context, id string) (Rental, error) {
	if r, ok := s.queued.rentals[id]; ok {
		return r, nil
	}
	return s.store.Rental(ctx, id)
}

// merge appends b's records and events to a's, in order.
func merge(a, b Change) Change {
	a.Rentals = append(a.Rentals, b.Rentals...)
	a.Commands = append(a.Commands, b.Commands...)
	a.Results = append(a.Results, b.Results...)
	a.Stops = append(a.Stops, b.Stops...)
	a.Events = append(a.Events, b.Events...)
	return a
}

func (s *Station) grantLocked(ctx context.Context, now time.Time, m RentalMessage, refuse func(Reason, bool) error) error {
	prev, err := s.rentalLocked(ctx, m.RentalID)
	switch {
	case err == nil:
		// A redelivery: report the same result again, change nothing.
		switch prev.State {
		case RentalStarting:
			return nil // its result comes with the device's ack
		case RentalRejected:
			return s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, EventRentalResult, RentalResultData{
				RentalID: prev.ID, DeviceID: prev.DeviceID, Op: OpGrant, OK: false, Reason: prev.Reason})}})
		default:
			return s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, EventRentalResult, RentalResultData{
				RentalID: prev.ID, DeviceID: prev.DeviceID, Op: OpGrant, OK: true})}})
		}
	case ErrorCode(err) != ENOTFOUND:
		return fmt.Errorf("grant: %w", err)
	}
	rec, ok := s.devices[m.DeviceID]
	switch {
	case !s.writableLocked(ctx, now, false):
		// The grant and its refusal wait in memory; the message is not
		// acknowledged until they are durable.
		return refuse(ReasonUnavailable, true)
	case !ok || s.devs.retiring[m.DeviceID]:
		return refuse(ReasonUnknownDevice, true)
	case rec.state.Maintenance:
		return refuse(ReasonMaintenance, true)
	case rec.state.Status == StatusFault:
		return refuse(ReasonDeviceFault, true)
	case !rec.state.Online:
		return refuse(ReasonDeviceOffline, true)
	case rec.rental != nil || rec.stop != nil || rec.state.Status == StatusInUse:
		// An outstanding stop is busy too: the device may still be running.
		return refuse(ReasonDeviceBusy, true)
	}
	cmdID := newCmdID()
	l := &liveRental{r: Rental{
		ID: m.RentalID, DeviceID: m.DeviceID, RenterID: m.RenterID, State: RentalStarting,
		Duration: time.Duration(m.DurationS) * time.Second, GrantedAt: now, StartCmdID: cmdID,
	}, deadline: now.Add(s.startTimeout)}
	if err := s.tryCommitLocked(ctx, now, Change{Rentals: []Rental{l.r}}); err != nil {
		return refuse(ReasonUnavailable, true)
	}
	s.live[l.r.ID] = l
	rec.rental = l
	s.pending[cmdID] = &pendingCommand{kind: kindStart, cmdID: cmdID, deviceID: m.DeviceID, rentalID: m.RentalID, deadline: l.deadline}
	s.log.Info("rental granted", "rental", m.RentalID, "device", m.DeviceID, "duration_s", m.DurationS)
	if err := s.sendLocked(ctx, m.DeviceID, startCommand(cmdID, l.r, l.r.Duration, nil)); err != nil {
		reason := ErrorReason(err)
		if reason == "" {
			reason = ReasonDeviceError
		}
		s.failStartLocked(ctx, now, l, reason, err.Error())
	}
	s.poke()
	return nil
}

// ownedLocked finds the rental an extend or cancel names and checks that
// the message matches it.
func (s *Station) ownedLocked(ctx context.Context, m RentalMessage) (Rental, *liveRental, Reason, error) {
	r, err := s.rentalLocked(ctx, m.RentalID)
	if ErrorCode(err) == ENOTFOUND {
		return r, nil, ReasonNoRental, nil
	}
	if err != nil {
		return r, nil, "", fmt.Errorf("%s: %w", m.Op, err)
	}
	switch {
	case r.DeviceID != m.DeviceID:
		return r, nil, ReasonInvalid, nil
	case r.RenterID != m.RenterID:
		return r, nil, ReasonNotRenter, nil
	case r.State == RentalRejected:
		return r, nil, ReasonNoRental, nil
	}
	return r, s.live[r.ID], "", nil
}

func (s *Station) extendLocked(ctx context.Context, now time.Time, m RentalMessage, refuse func(Reason, bool) error) error {
	r, l, reason, err := s.ownedLocked(ctx, m)
	if err != nil {
		return err
	}
	if reason == "" && l == nil {
		reason = ReasonNoRental // ended
	}
	if reason != "" {
		return refuse(reason, false)
	}
	dur := time.Duration(m.DurationS) * time.Second
	if l.r.Duration == dur {
		return s.commitLocked(ctx, now, s.answer(now, m, true, ""))
	}
	if l.r.State == RentalStarting {
		l.r.Duration = dur
		ch := s.answer(now, m, true, "")
		ch.Rentals = []Rental{l.r}
		return s.commitLocked(ctx, now, ch)
	}
	l.r.Duration = dur
	used := l.used(now)
	remaining := l.r.Remaining(used)
	l.r.EndsAt = now.Add(remaining)
	l.r.Used, l.r.CheckpointAt, l.r.CheckpointSynced = used, now, s.clock.Synced()
	ch := s.answer(now, m, true, "")
	ch.Rentals = []Rental{l.r}
	ch.Events = append(ch.Events, s.event(now, EventRentalExtended, RentalExtendedData{
		RentalID: r.ID, DeviceID: r.DeviceID, RenterID: r.RenterID,
		EndsAt: l.r.EndsAt.UTC().Round(time.Millisecond), DurationS: m.DurationS,
	}))
	// Carried out even when the store cannot write: the message is then
	// not acknowledged, and its redelivery is answered the same.
	err = s.commitLocked(ctx, now, ch)
	rec := s.devices[r.DeviceID]
	rec.state.Rental.EndsAt = l.r.EndsAt.UTC().Round(time.Millisecond)
	s.touchLocked(rec, now)
	if remaining == 0 {
		return cmp.Or(err, s.endLocked(ctx, now, l, ReasonExpired))
	}
	// The device runs its own timer from start's duration_s: tell it.
	if rec.state.Online {
		s.resyncLocked(ctx, now, l)
	}
	s.poke()
	return err
}

func (s *Station) cancelLocked(ctx context.Context, now time.Time, m RentalMessage, refuse func(Reason, bool) error) error {
	_, l, reason, err := s.ownedLocked(ctx, m)
	if err != nil {
		return err
	}
	if reason != "" {
		return refuse(reason, false)
	}
	if l != nil && l.r.State == RentalStarting {
		return s.cancelStartLocked(ctx, now, l, m)
	}
	err = s.commitLocked(ctx, now, s.answer(now, m, true, ""))
	if l == nil {
		return err // already ended: nothing changes
	}
	return cmp.Or(err, s.endLocked(ctx, now, l, ReasonCancelled))
}

// cancelStartLocked cancels a grant whose start the device has not
// acknowledged (§3.1): the grant's result is cancelled, the cancel's ok,
// and the device is stopped; the rental never started, so it has no
// rental.started or rental.ended.
func (s *Station) cancelStartLocked(ctx context.Context, now time.Time, l *liveRental, m RentalMessage) error {
	r := l.r
	r.State, r.Reason, r.StartCmdID = RentalRejected, ReasonCancelled, ""
	rec := s.devices[r.DeviceID]
	ch := merge(s.grantAnswer(now, r, false, ReasonCancelled), s.answer(now, m, true, ""))
	ch.Rentals = []Rental{r}
	ch.Stops = []StopRecord{s.beginStopLocked(now, rec, r.ID)}
	err := s.commitLocked(ctx, now, ch)
	s.dropLiveLocked(l)
	s.sendStopLocked(ctx, now, rec)
	s.touchLocked(rec, now)
	s.log.Info("rental cancelled before its start", "rental", r.ID, "device", r.DeviceID)
	return err
}

// RenterCommand applies a message of R/S/down/commands (§3.1): it is
// forwarded to the device only while its renter holds the device's active
// rental; action "end" ends the rental. Every command gets a
// command.result, now or when the device answers.
func (s *Station) RenterCommand(ctx context.Context, payload []byte) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	c, perr := ParseRenterCommand(payload)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	s.writableLocked(ctx, now, true) // records waiting for the store go first
	p := &pendingCommand{kind: kindRenter, cmdID: c.CmdID, deviceID: c.DeviceID, record: CommandRecord{
		CmdID: c.CmdID, DeviceID: c.DeviceID, RenterID: c.RenterID, Action: c.Action, At: now,
	}}
	if perr != nil {
		p.cmdID, p.deviceID = truncate(c.CmdID), truncate(c.DeviceID)
		return s.finishRenterLocked(ctx, now, p, false, ReasonInvalid, "")
	}
	prev, err := s.commandLocked(ctx, c.CmdID)
	switch {
	case err == nil && prev.Done:
		return s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, EventCommandResult, CommandResultData{
			CmdID: prev.CmdID, DeviceID: prev.DeviceID, OK: prev.OK, Reason: prev.Reason, Error: prev.Error})}})
	case err == nil:
		if _, inFlight := s.pending[c.CmdID]; inFlight {
			return nil // its result comes with the device's ack
		}
		// Pending before a restart: its ack can no longer be matched.
		return s.finishRenterLocked(ctx, now, p, false, ReasonTimeout, "")
	case ErrorCode(err) != ENOTFOUND:
		return fmt.Errorf("renter command: %w", err)
	}
	if !s.writableLocked(ctx, now, false) {
		// Its refusal waits in memory too; the message is not
		// acknowledged until that is durable.
		return s.finishRenterLocked(ctx, now, p, false, ReasonUnavailable, "")
	}
	rec, ok := s.devices[c.DeviceID]
	if !ok {
		return s.finishRenterLocked(ctx, now, p, false, ReasonUnknownDevice, "")
	}
	l := rec.rental
	if l == nil || l.r.State != RentalActive {
		return s.finishRenterLocked(ctx, now, p, false, ReasonNoRental, "")
	}
	if l.r.RenterID != c.RenterID {
		return s.finishRenterLocked(ctx, now, p, false, ReasonNotRenter, "")
	}
	p.rentalID = l.r.ID
	switch c.Action {
	case ActionEnd:
		err := s.finishRenterLocked(ctx, now, p, true, "", "")
		return cmp.Or(err, s.endLocked(ctx, now, l, ReasonRenterEnded))
	case ActionStart, ActionStop:
		return s.finishRenterLocked(ctx, now, p, false, ReasonUnsupported, "start and stop are the gateway's own")
	}
	if !rec.state.Online {
		return s.finishRenterLocked(ctx, now, p, false, ReasonDeviceOffline, "")
	}
	if err := s.tryCommitLocked(ctx, now, Change{Commands: []CommandRecord{p.record}}); err != nil {
		return s.finishRenterLocked(ctx, now, p, false, ReasonUnavailable, "")
	}
	p.deadline = now.Add(s.startTimeout)
	s.pending[c.CmdID] = p
	err = s.sendLocked(ctx, c.DeviceID, DeviceCommand{CmdID: c.CmdID, Action: c.Action, RentalID: l.r.ID, RenterID: c.RenterID, Args: c.Args})
	if err != nil {
		delete(s.pending, c.CmdID)
		reason := ErrorReason(err)
		if reason == "" {
			reason = ReasonDeviceError
		}
		return s.finishRenterLocked(ctx, now, p, false, reason, "")
	}
	s.poke()
	return nil
}

// finishRenterLocked records a renter command's result and reports it.
func (s *Station) finishRenterLocked(ctx context.Context, now time.Time, p *pendingCommand, ok bool, reason Reason, detail string) error {
	rec := p.record
	rec.Done, rec.OK, rec.Reason, rec.Error, rec.At = true, ok, reason, detail, now
	ch := Change{Events: []Event{s.event(now, EventCommandResult, CommandResultData{
		CmdID: p.cmdID, DeviceID: p.deviceID, OK: ok, Reason: reason, Error: detail})}}
	if ValidToken(rec.CmdID) && reason != ReasonInvalid {
		ch.Commands = []CommandRecord{rec}
	}
	return s.commitLocked(ctx, now, ch)
}

// commandLocked finds a renter command's latest record, one waiting for
// the store included. Errors: ENOTFOUND.
func (s *Station) commandLocked(ctx context.Context, cmdID string) (CommandRecord, error) {
	if r, ok := s.queued.commands[cmdID]; ok {
		return r, nil
	}
	return s.store.Command(ctx, cmdID)
}

// DeviceOnline records a device connecting or going away. A device that
// returns during its rental gets start again with the time left; one with a
// stop outstanding gets it at once.
func (s *Station) DeviceOnline(ctx context.Context, deviceID string, online bool) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, err := s.deviceLocked(deviceID)
	if err != nil {
		return err
	}
	now := s.clock.Now()
	if rec.state.Online == online {
		return nil
	}
	t := EventDeviceOffline
	if online {
		t = EventDeviceOnline
	}
	// Presence is applied even when the store cannot write: the stops and
	// starts that depend on it must not wait for the disk.
	_ = s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, t, DeviceData{DeviceID: deviceID})}})
	rec.state.Online = online
	seenLocked(rec, now)
	if online {
		if l := rec.rental; l != nil && l.r.State == RentalActive {
			s.resyncLocked(ctx, now, l)
		} else if rec.stop != nil {
			// Back online: the stop goes at once, with a fresh backoff.
			rec.stop.wait = s.startTimeout
			s.sendStopLocked(ctx, now, rec)
		}
	}
	s.touchLocked(rec, now)
	return nil
}

// DeviceState records a device's status report. A fault ends its rental
// (device_fault); in_use with no rental is unrented use, and the device is
// stopped. A report whose telemetry would take the device over the state
// bounds (§2) changes nothing: EINVALID.
func (s *Station) DeviceState(ctx context.Context, deviceID string, r StateReport) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, err := s.deviceLocked(deviceID)
	if err != nil {
		return err
	}
	if err := mergeTelemetry(rec.state.Telemetry, r.Extra); err != nil {
		return err
	}
	now := s.clock.Now()
	seenLocked(rec, now)
	prev := rec.state.Status
	rec.state.Status, rec.state.Fault = r.Status, r.Fault
	if r.Status != StatusFault {
		rec.state.Fault = ""
	}
	switch {
	case r.Status == StatusFault && rec.rental != nil:
		if l := rec.rental; l.r.State == RentalStarting {
			s.failStartLocked(ctx, now, l, ReasonDeviceFault, rec.state.Fault)
		} else {
			_ = s.endLocked(ctx, now, l, ReasonDeviceFault) // enforced; recorded once the store can
		}
	case r.Status == StatusInUse && rec.rental == nil && rec.stop == nil && now.After(rec.graceUntil):
		// With a stop outstanding, in_use is expected until it lands.
		if prev != StatusInUse || now.Sub(rec.lastUnrented) >= unrentedRepeat || rec.lastUnrented.IsZero() {
			rec.lastUnrented = now
			ch := Change{Events: []Event{s.event(now, EventUnrentedUse, DeviceData{DeviceID: deviceID})},
				Stops: []StopRecord{s.beginStopLocked(now, rec, "")}}
			_ = s.commitLocked(ctx, now, ch) // enforced; recorded once the store can
			s.log.Warn("unrented use stopped", "device", deviceID)
			s.sendStopLocked(ctx, now, rec)
		}
	}
	if r.Status == StatusIdle && rec.stop != nil {
		s.stopDoneLocked(ctx, now, rec, "idle")
	}
	s.touchLocked(rec, now)
	// Nil even when a record waits for the store: what the report decided
	// is carried out, and an error would make the broker refuse the report
	// (and drop an MQTT 3.1.1 device), so a stop could not reach it.
	return nil
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

// mergeTelemetry merges src into dst, or, when dst would then hold more
// than MaxTelemetryKeys fields, changes nothing and returns EINVALID: a
// report that breaks the state bounds is dropped whole (§2).
func mergeTelemetry(dst, src map[string]any) error {
	if err := CheckTelemetryMerge(dst, src); err != nil {
		return err
	}
	for k, v := range src {
		dst[k] = v
	}
	return nil
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
	if err := mergeTelemetry(rec.state.Telemetry, t); err != nil {
		return err
	}
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

// DeviceEvent appends a device's event to the log, durably, as a
// device.event. It does not take the station's lock, so events from many
// devices are committed together. While records wait for the store it
// fails with EUNAVAILABLE, so the device is not acknowledged and the event
// does not overtake them.
func (s *Station) DeviceEvent(ctx context.Context, deviceID string, event []byte) error {
	if !s.known(deviceID) {
		return Errorf(ENOTFOUND, "unknown device %q", deviceID)
	}
	if n := s.unrecordedN.Load(); n > 0 {
		// Records wait for the store: this one must not overtake them,
		// and the device must not be acknowledged before it is stored.
		return errUnrecorded(int(n))
	}
	now := s.clock.Now()
	_, err := s.store.Commit(ctx, Change{Events: []Event{s.event(now, EventDeviceEvent, DeviceEventData{DeviceID: deviceID, Event: event})}})
	if err != nil {
		return fmt.Errorf("device event: %w", err)
	}
	return nil
}

// DeviceAck matches a device's ack to the command it answers.
func (s *Station) DeviceAck(ctx context.Context, deviceID string, a CommandAck) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	p, ok := s.pending[a.CmdID]
	if !ok || p.deviceID != deviceID {
		if rec := s.devices[deviceID]; rec != nil && rec.stop != nil && slices.Contains(rec.stop.ids, a.CmdID) {
			if a.OK {
				s.stopDoneLocked(ctx, now, rec, "ack")
			} else {
				s.log.Warn("device refused stop: it will be sent again", "device", deviceID, "cmd", a.CmdID, "error", a.Error)
			}
			return nil
		}
		s.log.Debug("ack for no pending command", "device", deviceID, "cmd", a.CmdID)
		return nil
	}
	rec := s.devices[deviceID]
	switch p.kind {
	case kindStart:
		l := s.live[p.rentalID]
		if l == nil || l.r.State != RentalStarting {
			delete(s.pending, a.CmdID)
			return nil
		}
		if !a.OK {
			detail := a.Error
			s.failStartLocked(ctx, now, l, ReasonDeviceError, detail)
			return nil
		}
		r := l.r
		r.State, r.StartedAt, r.EndsAt = RentalActive, now, now.Add(r.Duration)
		r.StartCmdID, r.Used, r.CheckpointAt, r.CheckpointSynced = "", 0, now, s.clock.Synced()
		ch := s.grantAnswer(now, r, true, "")
		ch.Rentals = []Rental{r}
		ch.Events = append(ch.Events, s.event(now, EventRentalStarted, RentalStartedData{
			RentalID: r.ID, DeviceID: r.DeviceID, RenterID: r.RenterID,
			StartedAt: now.UTC().Round(time.Millisecond), EndsAt: r.EndsAt.UTC().Round(time.Millisecond),
			DurationS: seconds(r.Duration),
		}))
		// The rental starts even when the store cannot write: the device
		// runs, and the record waits for the store.
		_ = s.commitLocked(ctx, now, ch)
		delete(s.pending, a.CmdID)
		l.r, l.base, l.baseUsed = r, now, 0
		rec.state.Rental = &DeviceRental{RentalID: r.ID, RenterID: r.RenterID,
			StartedAt: now.UTC().Round(time.Millisecond), EndsAt: r.EndsAt.UTC().Round(time.Millisecond)}
		s.touchLocked(rec, now)
		s.log.Info("rental started", "rental", r.ID, "device", deviceID, "duration_s", seconds(r.Duration))
		s.poke()
	case kindRenter:
		delete(s.pending, a.CmdID)
		reason := Reason("")
		if !a.OK {
			reason = ReasonDeviceError
		}
		detail := a.Error
		if a.Code != 0 && detail == "" {
			detail = fmt.Sprintf("code %d", a.Code)
		}
		// Nil even when the result waits for the store: an error would
		// make the broker refuse the ack.
		_ = s.finishRenterLocked(ctx, now, p, a.OK, reason, detail)
	default:
		delete(s.pending, a.CmdID)
		if !a.OK {
			s.log.Warn("device refused command", "device", deviceID, "cmd", a.CmdID, "error", a.Error)
		}
	}
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

// EndRental ends a starting or active rental for reason (operator for a
// technician's request). Errors: ENOTFOUND when no such rental is running.
func (s *Station) EndRental(ctx context.Context, rentalID string, reason Reason) error {
	ctx = context.WithoutCancel(ctx) // see Station: a decision is carried out whole
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.live[rentalID]
	if !ok {
		return Errorf(ENOTFOUND, "no running rental %q", rentalID)
	}
	if err := s.endLocked(ctx, s.clock.Now(), l, reason); err != nil {
		return &Error{Code: EUNAVAILABLE, Message: "rental ended and its device stopped, but the record waits for the store", Err: err}
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
