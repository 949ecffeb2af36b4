// The timer loop: the rules that depend on time passing (start and
// command timeouts, expiry, checkpoints, stop resends).

package edged

import (
	"context"
	"sort"
	"time"
)

// CheckpointInterval is how often active rentals record how long they have
// run, so a restart loses at most this much of a rental's accounting (§4
// asks for at most 5 s).
const CheckpointInterval = 3 * time.Second

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
	t := s.beginLocked()
	now := s.clock.Now()
	// Waiting records are retried by the committer when due; delivered
	// stops' records are deleted with this pass's commit.
	t.nudge = len(s.unrecorded) > 0 || len(s.stopsDone) > 0
	s.expireLocked(ctx, now)
	s.sweepRetiringLocked()
	if len(s.live) > 0 && now.Sub(s.lastCheckpoint) >= CheckpointInterval {
		s.checkpointLocked(ctx, now)
	}
	next := s.nextLocked(ctx, now)
	s.nextRun = next
	q := s.endLocked(t)
	s.mu.Unlock()
	_ = s.finish(q) // enforced either way; the records wait for the store
	return next
}

// nextLocked resends the stops that are due and returns when the rental
// rules next need to run.
func (s *Station) nextLocked(ctx context.Context, now time.Time) time.Time {
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

// wakeByLocked has Run pass again by at (a new deadline), waking it only
// when it is not due by then anyway: at 1,000 grants a second a pass per
// grant sorted every live rental under the lock a thousand times a second.
func (s *Station) wakeByLocked(at time.Time) {
	if !s.nextRun.IsZero() && at.After(s.nextRun) {
		return
	}
	s.nextRun = at
	s.poke()
}

func (s *Station) poke() {
	select {
	case s.wake <- struct{}{}:
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
			s.endRentalLocked(ctx, now, l, ReasonExpired)
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
	if n := len(s.unrecorded); n > 0 && s.unrecorded[n-1].checkpoint && !s.committing {
		s.unrecorded[n-1].ch = ch // nothing decided since: the newer one supersedes it
		return
	}
	s.recordLocked(ch, false, true, nil)
}
