package edged

import (
	"cmp"
	"context"
	"crypto/sha256"
	"fmt"
	"slices"
	"sync/atomic"
	"time"
)

// The station's write path is decide, commit, act, as databases do:
//
//   - Decide: under Station.mu, a decision changes the in-memory state at
//     once (so the next decision sees it) and writes into its ticket the
//     Change to record and the effects to perform: commands to send. It
//     never waits for a disk or a network.
//   - Commit: one committer at a time takes every queued ticket, merges
//     their changes into one Store.Commit (one transaction, one fsync)
//     outside the lock.
//   - Act: then, in decision order, it performs the tickets' effects and
//     wakes their callers, who acknowledge (the cloud message, the device's
//     PUBACK) only now that what they decided is durable.
//
// A device's ack of a command may linger: on a busy station, when it is
// all that is queued, the committer waits up to one commit's time for
// another decision to share the fsync (lingerLocked). Any other decision
// wakes it at once.
//
// When the commit fails (a full disk, §4), the decisions stand: enforced
// ends still send their stop, and their records wait in memory, in order,
// written once the store takes them (flushUnrecorded). Only what must not
// happen before it is recorded is undone: a grant's start is not sent and
// the grant is refused unavailable, a renter command is not forwarded.

// ticket is one decision's share of the pipeline.
type ticket struct {
	steps   []step
	effects []effect
	// force retries the changes waiting for the store before this one,
	// whatever the backoff says (a cloud message is refused while they
	// wait, so it first gives the store a chance).
	force bool
	// nudge runs the committer even with nothing to commit: the waiting
	// changes may be due for a retry, delivered stops are to be deleted.
	nudge bool
	// linger lets the committer hold this decision up to lingerFor on a
	// busy station, for another's commit to carry it: a device's ack,
	// whose only wait is its own PUBACK.
	linger bool

	// owe is the key a cloud message is known by (Station.owed), when the
	// decision is one's answer.
	owe string

	done chan struct{}
	err  error     // the commit's outcome, set before done closes
	then []*ticket // follow-up decisions its effects or failure made
}

// step is one Change of a decision.
type step struct {
	ch  Change
	seq uint64 // decision order, for the overlay of not yet durable records
	// tentative changes are dropped when the commit fails: a device event
	// (the device sends it again) or a change whose effect must not happen
	// unrecorded; onFail then decides what replaces it.
	tentative  bool
	onFail     func()
	checkpoint bool
}

// effect is what a decision does once its changes are durable (or, when
// not durableOnly, once the commit was tried, whatever its outcome: a stop
// is sent even when its record waits for the store).
type effect struct {
	durableOnly bool
	do          func(ctx context.Context) (followUp func())
}

// committerStats counts the committer's work, for metrics.
type committerStats struct {
	commits atomic.Uint64 // Store.Commit calls made by the committer: one fsync each
	changes atomic.Uint64 // decisions' changes they carried
}

// beginLocked starts a decision: what it records and sends goes into the
// returned ticket.
func (s *Station) beginLocked() *ticket {
	t := &ticket{done: make(chan struct{})}
	s.cur = t
	return t
}

// endLocked ends the decision begun with t and queues it for the
// committer. A decision that changed nothing still waits behind those in
// flight, so nothing is acknowledged before what was decided earlier.
func (s *Station) endLocked(t *ticket) *ticket {
	s.cur = nil
	if len(t.steps) == 0 && len(t.effects) == 0 && !t.force && !t.nudge && !s.committing {
		return nil
	}
	s.queue = append(s.queue, t)
	if !t.linger {
		select {
		case s.urgent <- struct{}{}:
		default:
		}
	}
	if !s.committing {
		s.committing = true
		go s.commitLoop() // exits when the queue is empty; its callers wait for it
	}
	return t
}

// finish waits until t's changes are durable (or kept for the store) and
// its effects performed, and its follow-ups too, and returns the commit's
// outcome: nil when durable.
func (s *Station) finish(t *ticket) error {
	if t == nil {
		return nil
	}
	<-t.done
	for _, f := range t.then {
		_ = s.finish(f) // a follow-up's record is enforced either way
	}
	return t.err
}

// decideMessage decides a cloud message like decide and, when its answer
// is left waiting for the store (EUNAVAILABLE), remembers the message by
// the key the decision gave, so that a retry of the same delivery meanwhile
// adds no second answer (one answer per message, §3.1).
func (s *Station) decideMessage(f func() error) (err, commitErr error) {
	s.mu.Lock()
	t := s.beginLocked()
	err = f()
	key := t.owe
	q := s.endLocked(t)
	s.mu.Unlock()
	commitErr = s.finish(q)
	if key != "" && q != nil && ErrorCode(cmp.Or(err, commitErr)) == EUNAVAILABLE {
		s.mu.Lock()
		s.oweLocked(key, q.lastSeq())
		s.mu.Unlock()
	}
	return err, commitErr
}

// lastSeq is the seq of the last change t and its follow-ups decided.
func (t *ticket) lastSeq() uint64 {
	var n uint64
	for _, st := range t.steps {
		n = max(n, st.seq)
	}
	for _, f := range t.then {
		n = max(n, f.lastSeq())
	}
	return n
}

// oweLocked remembers a message whose answer, decided up to change upTo,
// waits for the store: its caller was told EUNAVAILABLE and holds it
// unacknowledged.
func (s *Station) oweLocked(key string, upTo uint64) {
	if upTo <= s.durable {
		return // written meanwhile, or nothing recorded
	}
	if s.owed == nil || len(s.owed) >= maxOwed {
		// Bounded: past it the promises are forgotten, which costs at most
		// a repeated identical answer (at-least-once allows it).
		s.owed = map[string]uint64{}
	}
	s.owed[key] = upTo
}

// owedLocked reports whether a message answered before is a retry of a
// delivery whose answer still waits for the store (see Station.owed): it
// then gets EUNAVAILABLE again and adds nothing. Once that answer is
// written, the message is re-reported like any redelivery, so the call
// that is acknowledged has its answer durable.
func (s *Station) owedLocked(key string) (err error, retry bool) {
	upTo, ok := s.owed[key]
	if !ok {
		return nil, false
	}
	if s.durable < upTo {
		return errUnrecorded(len(s.unrecorded)), true
	}
	delete(s.owed, key)
	return nil, false
}

// maxOwed bounds Station.owed: a cloud that never redelivers would
// otherwise grow it for as long as the store cannot write.
const maxOwed = 10000

// payloadKey is what a message refused unread (invalid, badly signed) is
// known by in Station.owed: it has no usable ids.
func payloadKey(payload []byte) string {
	sum := sha256.Sum256(payload)
	return "p:" + string(sum[:])
}

// recordLocked adds ch to the decision being made.
func (s *Station) recordLocked(ch Change, tentative, checkpoint bool, onFail func()) {
	if ch.Empty() {
		return
	}
	s.seq++
	s.overlayLocked(ch, s.seq)
	s.cur.steps = append(s.cur.steps, step{ch: ch, seq: s.seq, tentative: tentative, checkpoint: checkpoint, onFail: onFail})
	if tentative {
		return
	}
	for _, e := range ch.Events {
		s.countLocked(e)
	}
}

// actLocked adds an effect to the decision being made.
func (s *Station) actLocked(durableOnly bool, do func(ctx context.Context) func()) {
	s.cur.effects = append(s.cur.effects, effect{durableOnly: durableOnly, do: do})
}

// commitLoop is the committer: it runs while tickets are queued, one loop
// at a time (Station.committing), and exits when none is left and every
// batch's effects are performed.
//
// The effects of a batch are performed by an actor goroutine, in batch
// order, while the committer writes the next batch: sending the commands
// to the devices then no longer waits for, nor delays, the next fsync.
// Both run while Station.committing holds, so a decision that changed
// nothing still waits for the effects of those before it.
func (s *Station) commitLoop() {
	ctx := context.Background() // a decision, once begun, is carried out whole
	var lingerTimer *time.Timer // made when first needed: most loops never linger
	defer func() {
		if lingerTimer != nil {
			lingerTimer.Stop()
		}
	}()
	acts := make(chan func(), actDepth)
	acted := make(chan struct{}, actDepth)
	go func() {
		for act := range acts {
			act()
			acted <- struct{}{}
		}
	}()
	defer close(acts)
	inflight := 0
	for {
		s.mu.Lock()
		if len(s.queue) == 0 {
			if inflight == 0 {
				s.committing = false
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
			<-acted // the effects may have queued follow-up decisions
			inflight--
			continue
		}
		if wait := s.lingerLocked(); wait > 0 {
			// A wake sent before now is stale: the queue holds no
			// decision that may not wait. One sent after, under the lock,
			// is for a decision queued since.
			select {
			case <-s.urgent:
			default:
			}
			s.mu.Unlock()
			if lingerTimer == nil {
				lingerTimer = time.NewTimer(wait)
			} else {
				lingerTimer.Reset(wait)
			}
			select {
			case <-s.urgent:
			case <-lingerTimer.C:
			}
			s.mu.Lock()
		}
		batch := s.queue
		s.queue = nil
		s.mu.Unlock()
		began := time.Now()
		act := s.commitBatch(ctx, batch)
		ended := time.Now()
		s.lastCommit.Store(ended.UnixNano())
		s.lastCommitTook.Store(int64(ended.Sub(began)))
		for inflight == actDepth {
			<-acted
			inflight--
		}
		acts <- act
		inflight++
	}
}

// lingerLocked returns how long the committer may wait before taking the
// queue, 0 for not at all. It waits only when every decision queued
// lingers and the station committed in the last lingerFor, so another
// decision is likely to come soon: an idle station commits at once. And
// it waits no longer than the last commit took: an ack pays at most one
// commit's time for the chance to save one, and with a store that
// commits in microseconds it does not wait. The wait is on the wall
// clock, not the station's: a test's clock may stand still.
func (s *Station) lingerLocked() time.Duration {
	for _, t := range s.queue {
		if !t.linger {
			return 0
		}
	}
	if time.Since(time.Unix(0, s.lastCommit.Load())) >= s.lingerFor {
		return 0
	}
	return min(s.lingerFor, time.Duration(s.lastCommitTook.Load()))
}

// lingerFor bounds how long a device's ack may wait for another
// decision's commit to carry it. At 100 grants/s a station decides about
// every 2.5 ms (grants, ends, the devices' acks of start and stop); one
// commit for two decisions instead of each its own saves the SD card two
// fsyncs. The ack's device waits as long for its PUBACK; a grant never
// waits for it.
const lingerFor = 5 * time.Millisecond

// actDepth bounds the batches whose effects wait for the actor while the
// committer writes: back pressure when the devices' sends fall behind.
const actDepth = 2

// commitBatch commits the tickets' changes in one Store.Commit and returns
// what remains to do once they are durable: perform their effects in
// order and wake their callers.
func (s *Station) commitBatch(ctx context.Context, batch []*ticket) (act func()) {
	force := false
	for _, t := range batch {
		force = force || t.force
	}
	writable := s.flushUnrecorded(ctx, force)

	s.mu.Lock()
	done := s.stopsDone // delivered stops ride along
	s.stopsDone = nil
	merged := Change{Stops: slices.Clone(done)}
	n := 0
	var last uint64
	for _, t := range batch {
		for _, st := range t.steps {
			merged = merge(merged, st.ch)
			n++
			last = st.seq
		}
	}
	waiting := len(s.unrecorded)
	s.mu.Unlock()

	var err error
	switch {
	case !writable:
		err = errUnrecorded(waiting)
	case !merged.Empty():
		_, err = s.store.Commit(ctx, merged)
		s.cstats.commits.Add(1)
		s.cstats.changes.Add(uint64(n))
		if err != nil {
			if ErrorCode(err) == EINVALID && len(batch) > 1 {
				// Never expected (ids are checked before): find the
				// change the store refuses, so it alone is dropped.
				s.mu.Lock()
				s.stopsDone = append(done, s.stopsDone...)
				s.mu.Unlock()
				acts := make([]func(), 0, len(batch))
				for _, t := range batch {
					acts = append(acts, s.commitBatch(ctx, []*ticket{t}))
				}
				return func() {
					for _, act := range acts {
						act()
					}
				}
			}
			err = fmt.Errorf("commit: %w", err)
		}
	}

	s.mu.Lock()
	if err == nil {
		s.durableLocked(last)
	} else if ErrorCode(err) == EINVALID {
		s.log.Error("change refused by the store", "err", err)
	} else {
		now := s.clock.Now()
		if len(done) > 0 {
			s.deferLocked(now, deferredChange{ch: Change{Stops: done}}, err)
		}
		for _, t := range batch {
			for _, st := range t.steps {
				if st.tentative {
					if st.onFail != nil {
						t.then = append(t.then, s.followLocked(st.onFail))
					}
					continue
				}
				s.deferLocked(now, deferredChange{ch: st.ch, checkpoint: st.checkpoint, seq: st.seq}, err)
			}
		}
	}
	s.mu.Unlock()

	return func() {
		for _, t := range batch {
			for _, e := range t.effects {
				if e.durableOnly && err != nil {
					continue
				}
				if f := e.do(ctx); f != nil {
					s.mu.Lock()
					t.then = append(t.then, s.followLocked(f))
					s.mu.Unlock()
				}
			}
			if len(t.steps) > 0 {
				t.err = err
			}
			close(t.done)
		}
	}
}

// followLocked makes a follow-up decision with its own ticket, queued
// behind those already decided.
func (s *Station) followLocked(decide func()) *ticket {
	t := s.beginLocked()
	decide()
	if t := s.endLocked(t); t != nil {
		return t
	}
	close(t.done)
	return t
}

// flushUnrecorded writes the changes waiting for the store, in order and
// merged, when their retry is due (or force), and reports whether none
// waits any more.
func (s *Station) flushUnrecorded(ctx context.Context, force bool) bool {
	per := 256
	for {
		s.mu.Lock()
		if len(s.unrecorded) == 0 {
			s.mu.Unlock()
			return true
		}
		now := s.clock.Now()
		if !force && now.Before(s.retryAt) {
			s.mu.Unlock()
			return false
		}
		k := min(per, len(s.unrecorded))
		var ch Change
		for _, d := range s.unrecorded[:k] {
			ch = merge(ch, d.ch)
		}
		s.retrying = true
		s.mu.Unlock()

		_, err := s.store.Commit(ctx, ch)
		s.cstats.commits.Add(1)
		s.cstats.changes.Add(uint64(k))

		s.mu.Lock()
		s.retrying = false
		if err != nil && ErrorCode(err) != EINVALID {
			s.retryWait = min(2*max(s.retryWait, time.Second/2), maxRetryWait)
			s.retryAt = now.Add(s.retryWait)
			s.log.Warn("store still cannot write", "waiting", len(s.unrecorded), "retry_in", s.retryWait, "err", err)
			s.mu.Unlock()
			return false
		}
		if err != nil && k > 1 {
			per = 1 // find the change the store refuses
			s.mu.Unlock()
			continue
		}
		if err != nil {
			s.log.Error("waiting change refused by the store: dropped", "err", err)
		}
		var last uint64
		for i := range k {
			last = max(last, s.unrecorded[i].seq)
			s.unrecorded[i] = deferredChange{}
		}
		s.unrecorded = s.unrecorded[k:]
		s.unrecordedN.Store(int64(len(s.unrecorded)))
		if len(s.unrecorded) == 0 {
			s.unrecorded = nil
			s.retryWait = 0
			s.log.Info("store writes again: every waiting record written")
		}
		// Only what was written: decisions queued meanwhile, with higher
		// seqs, keep their records in the overlay until their commit.
		s.durableLocked(last)
		s.mu.Unlock()
	}
}

// overlay holds the records decided but not yet durable (in flight in the
// committer, or waiting for the store), so a decision looks them up
// before the store: the latest decided record of each key wins.
type overlay struct {
	rentals  map[string]overlaid[Rental]
	commands map[string]overlaid[CommandRecord]
	results  map[string]overlaid[ResultRecord]
}

type overlaid[T any] struct {
	v   T
	seq uint64
}

func (s *Station) overlayLocked(ch Change, seq uint64) {
	if s.queued.rentals == nil {
		s.queued = overlay{rentals: map[string]overlaid[Rental]{}, commands: map[string]overlaid[CommandRecord]{}, results: map[string]overlaid[ResultRecord]{}}
	}
	for _, r := range ch.Rentals {
		s.queued.rentals[r.ID] = overlaid[Rental]{r, seq}
	}
	for _, r := range ch.Commands {
		s.queued.commands[r.CmdID] = overlaid[CommandRecord]{r, seq}
	}
	for _, r := range ch.Results {
		s.queued.results[r.Key()] = overlaid[ResultRecord]{r, seq}
	}
}

// durableLocked forgets the overlay's records decided at or before seq:
// the store has them now, or a newer record of the same key is decided.
func (s *Station) durableLocked(seq uint64) {
	s.durable = max(s.durable, seq)
	for k, o := range s.queued.rentals {
		if o.seq <= seq {
			delete(s.queued.rentals, k)
		}
	}
	for k, o := range s.queued.commands {
		if o.seq <= seq {
			delete(s.queued.commands, k)
		}
	}
	for k, o := range s.queued.results {
		if o.seq <= seq {
			delete(s.queued.results, k)
		}
	}
}

// maxUnrecorded bounds the changes kept in memory while the store cannot
// write. Past it, changes holding nothing but droppable events (presence)
// are dropped and counted; rental records never are.
const maxUnrecorded = 100000

// maxRetryWait caps the backoff between attempts to write the unrecorded
// changes, so a store that recovers is used again within seconds.
const maxRetryWait = 5 * time.Second

type deferredChange struct {
	ch  Change
	seq uint64 // the decision's, 0 for delivered stops
	// checkpoint: only rental checkpoints, replaced by a newer checkpoint
	// queued right behind it.
	checkpoint bool
}

// commitLocked records a decision's change: the committer makes it
// durable before its effects and the decision's caller is acknowledged,
// or, when the store cannot write, keeps it in memory, in order, until it
// can. The decision stands either way: it is enforced.
func (s *Station) commitLocked(ctx context.Context, now time.Time, ch Change) {
	s.recordLocked(ch, false, false, nil)
	s.answerRelayedLocked(ctx, ch.Events)
}

// writableLocked reports whether no change waits for the store.
func (s *Station) writableLocked() bool { return len(s.unrecorded) == 0 }

// retryNow has the committer try to write the changes waiting for the
// store now, and waits for it: a cloud message is refused while they
// wait, so it first gives a recovered store its chance.
func (s *Station) retryNow() {
	s.mu.Lock()
	t := s.beginLocked()
	t.force = true
	q := s.endLocked(t)
	s.mu.Unlock()
	_ = s.finish(q)
}

// decide makes one decision under the lock and waits until the committer
// has made it durable (or kept it for the store) and carried out its
// effects. It returns the decision's own error and the commit's outcome.
func (s *Station) decide(f func() error) (err, commitErr error) {
	return s.decideTicket(false, f)
}

// decideTicket is decide, the ticket lingering when linger is set.
func (s *Station) decideTicket(linger bool, f func() error) (err, commitErr error) {
	s.mu.Lock()
	t := s.beginLocked()
	t.linger = linger
	err = f()
	q := s.endLocked(t)
	s.mu.Unlock()
	return err, s.finish(q)
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
	}
	s.unrecorded = append(s.unrecorded, d)
	s.unrecordedN.Store(int64(len(s.unrecorded)))
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

// resultLocked finds the result a rental message got. Errors: ENOTFOUND.
// Errors: ENOTFOUND.
func (s *Station) resultLocked(ctx context.Context, key string) (ResultRecord, error) {
	if r, ok := s.queued.results[key]; ok {
		return r.v, nil
	}
	return s.store.Result(ctx, key)
}

// rentalLocked finds a rental's latest record, one waiting for the store
// included. Errors: ENOTFOUND.
func (s *Station) rentalLocked(ctx context.Context, id string) (Rental, error) {
	if r, ok := s.queued.rentals[id]; ok {
		return r.v, nil
	}
	return s.store.Rental(ctx, id)
}

// commandLocked finds a renter command's latest record, one waiting for
// the store included. Errors: ENOTFOUND.
func (s *Station) commandLocked(ctx context.Context, cmdID string) (CommandRecord, error) {
	if r, ok := s.queued.commands[cmdID]; ok {
		return r.v, nil
	}
	return s.store.Command(ctx, cmdID)
}
