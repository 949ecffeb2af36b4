// The rental rules (§3, §4): what a grant, extend, cancel, renter command
// or device report decides. Each function here runs under Station.mu and
// only decides: it changes the station's memory and hands the committer
// (committer.go) the change to record and the commands to send, never
// waiting for a disk or a network.

package edged

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"
)

// unrentedRepeat is how often a device that keeps reporting in_use with no
// rental is stopped again and reported again.
const unrentedRepeat = 10 * time.Second

// maxStopWait caps the backoff between resends of an outstanding stop (§4).
const maxStopWait = 60 * time.Second

// stopIDs is how many of an outstanding stop's latest cmd ids are matched
// to acks: a late ack of an earlier send still counts.
const stopIDs = 8

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
	s.sendLocked(rec.dev.ID, DeviceCommand{CmdID: id, Action: ActionStop, RentalID: st.rec.RentalID}, false, nil)
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
	s.pending[id] = &pendingCommand{kind: kindResync, cmdID: id, deviceID: l.r.DeviceID, rentalID: l.r.ID, deadline: now.Add(s.startTimeout)}
	s.sendLocked(l.r.DeviceID, c, false, func(error) { delete(s.pending, id) })
}

// startCommand is the start sent for a rental, carrying its remaining time.
func startCommand(cmdID string, r Rental, remaining time.Duration, endsAt *time.Time) DeviceCommand {
	d := int64((remaining + time.Second - 1) / time.Second)
	if d < 1 {
		d = 1
	}
	return DeviceCommand{CmdID: cmdID, Action: ActionStart, RentalID: r.ID, RenterID: r.RenterID, DurationS: d, EndsAt: endsAt}
}

// endRentalLocked ends a started or starting rental for reason, durably, and
// stops its device.
func (s *Station) endRentalLocked(ctx context.Context, now time.Time, l *liveRental, reason Reason) error {
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
	s.commitLocked(ctx, now, ch)
	s.dropLiveLocked(l)
	s.sendStopLocked(ctx, now, rec)
	s.touchLocked(rec, now)
	s.log.Info("rental ended", "rental", r.ID, "device", r.DeviceID, "reason", reason, "used_s", seconds(used))
	return nil
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
	if s.live[l.r.ID] != l || l.r.State != RentalStarting {
		return // decided meanwhile: cancelled, or refused already
	}
	r := l.r
	r.State, r.Reason, r.StartCmdID = RentalRejected, reason, ""
	rec := s.devices[r.DeviceID]
	ch := s.grantAnswer(now, r, false, reason)
	ch.Rentals = []Rental{r}
	ch.Stops = []StopRecord{s.beginStopLocked(now, rec, r.ID)}
	s.commitLocked(ctx, now, ch) // enforced either way; recorded once the store can
	s.dropLiveLocked(l)
	s.sendStopLocked(ctx, now, rec)
	s.touchLocked(rec, now)
	s.log.Info("rental refused", "rental", r.ID, "device", r.DeviceID, "reason", reason, "detail", detail)
}

// rentalMessageLocked decides a rental message.
func (s *Station) rentalMessageLocked(ctx context.Context, m RentalMessage, perr error, relayedBy string, payload []byte) error {
	now := s.clock.Now()
	unrecorded := func(reason Reason) error {
		// Neither the message nor its refusal is recorded: a forged or
		// garbled message cannot occupy a rental id. A retry while its
		// refusal waits for the store is known by its payload.
		key := payloadKey(payload)
		if err, retry := s.owedLocked(key); retry {
			return err
		}
		s.cur.owe = key
		s.log.Info("rental message refused", "op", truncate(m.Op), "rental", truncate(m.RentalID), "device", truncate(m.DeviceID), "reason", reason)
		s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, EventRentalResult, RentalResultData{
			RentalID: truncate(m.RentalID), DeviceID: truncate(m.DeviceID), Op: truncate(m.Op), OK: false, Reason: reason,
		})}})
		return nil
	}
	if perr != nil {
		return unrecorded(ReasonInvalid)
	}
	if relayedBy != "" {
		if reason := s.relayRuleLocked(m, relayedBy); reason != "" {
			return unrecorded(reason)
		}
	}
	if s.verifyKey != nil {
		if err := VerifyRental(s.verifyKey, s.id, m); err != nil {
			return unrecorded(ReasonBadSignature)
		}
	}
	// A message answered before is answered the same, whatever happened
	// since: the rental ended, its not_after passed, edged restarted.
	key := ResultKey(m.RentalID, m.Op, m.DurationS)
	prev, err := s.resultLocked(ctx, key)
	switch {
	case err == nil:
		if err, retry := s.owedLocked(key); retry {
			return err
		}
		s.cur.owe = key
		s.commitLocked(ctx, now, Change{Events: []Event{s.resultEvent(now, prev)}})
		return nil
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
				Reason: reason, Duration: time.Duration(m.DurationS) * time.Second, GrantedAt: now, Via: s.deciding.via()}}
		}
		s.log.Info("rental message refused", "op", m.Op, "rental", m.RentalID, "device", m.DeviceID, "reason", reason)
		s.commitLocked(ctx, now, ch)
		return nil
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
	s.cur.owe = key
	switch m.Op {
	case OpGrant:
		return s.grantLocked(ctx, now, m, refuse)
	case OpExtend:
		return s.extendLocked(ctx, now, m, refuse)
	default:
		return s.cancelLocked(ctx, now, m, refuse)
	}
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
			s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, EventRentalResult, RentalResultData{
				RentalID: prev.ID, DeviceID: prev.DeviceID, Op: OpGrant, OK: false, Reason: prev.Reason})}})
			return nil
		default:
			s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, EventRentalResult, RentalResultData{
				RentalID: prev.ID, DeviceID: prev.DeviceID, Op: OpGrant, OK: true})}})
			return nil
		}
	case ErrorCode(err) != ENOTFOUND:
		return fmt.Errorf("grant: %w", err)
	}
	rec, ok := s.devices[m.DeviceID]
	switch {
	case !s.writableLocked():
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
		Duration: time.Duration(m.DurationS) * time.Second, GrantedAt: now, StartCmdID: cmdID, Via: s.deciding.via(),
	}, deadline: now.Add(s.startTimeout)}
	s.live[l.r.ID] = l
	rec.rental = l
	s.pending[cmdID] = &pendingCommand{kind: kindStart, cmdID: cmdID, deviceID: m.DeviceID, rentalID: m.RentalID, deadline: l.deadline}
	s.log.Info("rental granted", "rental", m.RentalID, "device", m.DeviceID, "duration_s", m.DurationS)
	deciding := s.deciding
	// The start goes only once the grant is durable. When the store
	// cannot write it, the grant is refused unavailable instead.
	s.recordLocked(Change{Rentals: []Rental{l.r}}, true, false, func() {
		if s.live[l.r.ID] != l || l.r.State != RentalStarting {
			return // decided meanwhile
		}
		s.dropLiveLocked(l)
		s.deciding = deciding
		_ = refuse(ReasonUnavailable, true)
		*deciding.answeredLater = s.deciding.answered // read once finish returns
		s.deciding = decision{}
	})
	s.sendLocked(m.DeviceID, startCommand(cmdID, l.r, l.r.Duration, nil), true, func(err error) {
		reason := ErrorReason(err)
		if reason == "" {
			reason = ReasonDeviceError
		}
		s.failStartLocked(ctx, s.clock.Now(), l, reason, err.Error())
	})
	s.wakeByLocked(l.deadline)
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
		s.commitLocked(ctx, now, s.answer(now, m, true, ""))
		return nil
	}
	if l.r.State == RentalStarting {
		l.r.Duration = dur
		ch := s.answer(now, m, true, "")
		ch.Rentals = []Rental{l.r}
		s.commitLocked(ctx, now, ch)
		return nil
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
	s.commitLocked(ctx, now, ch)
	rec := s.devices[r.DeviceID]
	dr := *rec.state.Rental // shared with readers: replaced, never modified
	dr.EndsAt = l.r.EndsAt.UTC().Round(time.Millisecond)
	rec.state.Rental = &dr
	s.touchLocked(rec, now)
	if remaining == 0 {
		return cmp.Or(err, s.endRentalLocked(ctx, now, l, ReasonExpired))
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
	s.commitLocked(ctx, now, s.answer(now, m, true, ""))
	if l == nil {
		return err // already ended: nothing changes
	}
	return cmp.Or(err, s.endRentalLocked(ctx, now, l, ReasonCancelled))
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
	s.commitLocked(ctx, now, ch)
	var err error
	s.dropLiveLocked(l)
	s.sendStopLocked(ctx, now, rec)
	s.touchLocked(rec, now)
	s.log.Info("rental cancelled before its start", "rental", r.ID, "device", r.DeviceID)
	return err
}

// renterCommandLocked decides a renter command.
func (s *Station) renterCommandLocked(ctx context.Context, c RenterCommand, perr error, payload []byte) error {
	now := s.clock.Now()
	p := &pendingCommand{kind: kindRenter, cmdID: c.CmdID, deviceID: c.DeviceID, record: CommandRecord{
		CmdID: c.CmdID, DeviceID: c.DeviceID, RenterID: c.RenterID, Action: c.Action, At: now,
	}}
	if perr != nil {
		p.cmdID, p.deviceID = truncate(c.CmdID), truncate(c.DeviceID)
		key := payloadKey(payload)
		if err, retry := s.owedLocked(key); retry {
			return err
		}
		s.cur.owe = key
		return s.finishRenterLocked(ctx, now, p, false, ReasonInvalid, "")
	}
	prev, err := s.commandLocked(ctx, c.CmdID)
	key := "c:" + c.CmdID
	if err == nil && prev.Done {
		if err, retry := s.owedLocked(key); retry {
			return err
		}
	}
	s.cur.owe = key
	switch {
	case err == nil && prev.Done:
		s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, EventCommandResult, CommandResultData{
			CmdID: prev.CmdID, DeviceID: prev.DeviceID, OK: prev.OK, Reason: prev.Reason, Error: prev.Error})}})
		return nil
	case err == nil:
		if _, inFlight := s.pending[c.CmdID]; inFlight {
			return nil // its result comes with the device's ack
		}
		// Pending before a restart: its ack can no longer be matched.
		return s.finishRenterLocked(ctx, now, p, false, ReasonTimeout, "")
	case ErrorCode(err) != ENOTFOUND:
		return fmt.Errorf("renter command: %w", err)
	}
	if !s.writableLocked() {
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
		return cmp.Or(err, s.endRentalLocked(ctx, now, l, ReasonRenterEnded))
	case ActionStart, ActionStop:
		return s.finishRenterLocked(ctx, now, p, false, ReasonUnsupported, "start and stop are the gateway's own")
	}
	if !rec.state.Online {
		return s.finishRenterLocked(ctx, now, p, false, ReasonDeviceOffline, "")
	}
	p.deadline = now.Add(s.startTimeout)
	s.pending[c.CmdID] = p
	// Forwarded only once its record is durable; refused unavailable when
	// the store cannot write it.
	fail := func(reason Reason) {
		if s.pending[c.CmdID] != p {
			return // answered meanwhile
		}
		delete(s.pending, c.CmdID)
		_ = s.finishRenterLocked(ctx, s.clock.Now(), p, false, reason, "")
	}
	s.recordLocked(Change{Commands: []CommandRecord{p.record}}, true, false, func() { fail(ReasonUnavailable) })
	s.sendLocked(c.DeviceID, DeviceCommand{CmdID: c.CmdID, Action: c.Action, RentalID: l.r.ID, RenterID: c.RenterID, Args: c.Args}, true, func(err error) {
		reason := ErrorReason(err)
		if reason == "" {
			reason = ReasonDeviceError
		}
		fail(reason)
	})
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
	s.commitLocked(ctx, now, ch)
	return nil
}

func (s *Station) deviceOnlineLocked(ctx context.Context, deviceID string, online bool) error {
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
	s.commitLocked(ctx, now, Change{Events: []Event{s.event(now, t, DeviceData{DeviceID: deviceID})}})
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

func (s *Station) deviceStateLocked(ctx context.Context, deviceID string, r StateReport) error {
	rec, err := s.deviceLocked(deviceID)
	if err != nil {
		return err
	}
	tel, err := mergeTelemetry(rec.state.Telemetry, r.Extra)
	if err != nil {
		return err
	}
	rec.state.Telemetry = tel
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
			_ = s.endRentalLocked(ctx, now, l, ReasonDeviceFault) // enforced; recorded once the store can
		}
	case r.Status == StatusInUse && rec.rental == nil && rec.stop == nil && now.After(rec.graceUntil):
		// With a stop outstanding, in_use is expected until it lands.
		if prev != StatusInUse || now.Sub(rec.lastUnrented) >= unrentedRepeat || rec.lastUnrented.IsZero() {
			rec.lastUnrented = now
			ch := Change{Events: []Event{s.event(now, EventUnrentedUse, DeviceData{DeviceID: deviceID})},
				Stops: []StopRecord{s.beginStopLocked(now, rec, "")}}
			s.commitLocked(ctx, now, ch) // enforced; recorded once the store can
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

func (s *Station) deviceAckLocked(ctx context.Context, deviceID string, a CommandAck) error {
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
		s.commitLocked(ctx, now, ch)
		delete(s.pending, a.CmdID)
		l.r, l.base, l.baseUsed = r, now, 0
		rec.state.Rental = &DeviceRental{RentalID: r.ID, RenterID: r.RenterID,
			StartedAt: now.UTC().Round(time.Millisecond), EndsAt: r.EndsAt.UTC().Round(time.Millisecond)}
		s.touchLocked(rec, now)
		s.log.Info("rental started", "rental", r.ID, "device", deviceID, "duration_s", seconds(r.Duration))
		s.wakeByLocked(r.EndsAt)
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
