package store

import (
	"context"
	"encoding/json"
	"slices"
	"time"

	"github.com/stationedge/edged"
	bolt "go.etcd.io/bbolt"
)

// pruneBatch bounds the log events pruned by one transaction.
const pruneBatch = 512

// Pending returns up to limit queued events with seq > after, in seq order
// (limit <= 0 or over 10000 means 10000), each with its stored envelope in
// Raw. It reads in a bbolt read transaction, concurrent with commits.
// Errors: EUNAVAILABLE.
func (db *DB) Pending(ctx context.Context, after uint64, limit int) ([]edged.Event, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	limit = pageLimit(limit)
	// Shared: only a commit that may drop waits for it (see handMu).
	db.handMu.RLock()
	defer db.handMu.RUnlock()
	var out []edged.Event
	err := db.bolt.View(func(tx *bolt.Tx) error {
		out = out[:0]
		st, err := readState(tx)
		if err != nil {
			return err
		}
		ev := tx.Bucket(bucketEvents)
		cur := tx.Bucket(bucketOutbox).Cursor()
		for k, _ := cur.Seek(u64(max(after, st.Delivered) + 1)); k != nil && len(out) < limit; k, _ = cur.Next() {
			if st.delivered(seqOf(k)) {
				continue
			}
			v := ev.Get(k)
			if v == nil {
				return edged.Errorf(edged.EINTERNAL, "queued event %d is missing from the log", seqOf(k))
			}
			var e edged.Event
			if err := json.Unmarshal(v, &e); err != nil {
				return internalErr("decode event", err)
			}
			// bbolt's bytes live only as long as the transaction.
			e.Raw = append(json.RawMessage(nil), v...)
			out = append(out, e)
		}
		return nil
	})
	if err != nil {
		return nil, storeErr("read outbox", err)
	}
	if n := len(out); n > 0 {
		for last, h := out[n-1].Seq, db.handed.Load(); last > h; h = db.handed.Load() {
			if db.handed.CompareAndSwap(h, last) {
				break
			}
		}
	}
	return out, nil
}

// Ack marks delivered events: it moves the delivered watermark (and the
// seqs acked beyond it) and the outbox counters in a small write that rides
// in the transaction of a concurrent commit when there is one, so a busy
// station pays no fsync for its acks; an idle one writes them in a
// transaction of their own. It is durable when it returns. The outbox
// entries and, past retention, the log's copies are deleted later in
// bounded background batches. Unknown seqs are ignored. Errors:
// EUNAVAILABLE.
func (db *DB) Ack(ctx context.Context, seqs ...uint64) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if len(seqs) == 0 {
		return nil
	}
	req := &ackReq{seqs: seqs, done: make(chan struct{})}
	db.ackMu.Lock()
	db.acks = append(db.acks, req)
	db.ackMu.Unlock()
	// A commit in flight may take the ack into its transaction: wait for
	// it to end, and for those that follow on its heels (a busy station
	// commits every few milliseconds: wait up to ackLinger for the next),
	// then write the ack alone if none did. An idle station writes it at
	// once.
	linger := time.NewTimer(db.ackLinger)
	defer linger.Stop()
wait:
	for range ackRides {
		db.endMu.Lock()
		ended := db.endCh
		db.endMu.Unlock()
		var timeout <-chan time.Time // a commit in flight is always waited for
		if db.committing.Load() == 0 {
			if time.Since(time.Unix(0, db.lastEnd.Load())) > db.ackLinger {
				break
			}
			timeout = linger.C
		}
		select {
		case <-req.done:
			return db.afterAck()
		case <-ended:
		case <-timeout:
			break wait
		}
	}
	select {
	case <-req.done:
		return db.afterAck()
	default:
	}
	err := db.update("ack", txAck, func(tx *bolt.Tx) error {
		taken, err := db.takeAcks(tx)
		if err != nil {
			return err
		}
		if len(taken) == 0 {
			return errNothingToWrite // a commit carried it meanwhile
		}
		st, err := readState(tx)
		if err != nil {
			return err
		}
		// No commit is waiting on this transaction: it takes a bounded
		// share of the release and the log prune along, sparing the
		// background a transaction of its own.
		released, err := releaseTx(tx, &st, db.logCutoff(st), pruneBatch)
		if err != nil {
			return err
		}
		pruned, err := pruneLogTx(tx, &st, db.logCutoff(st))
		if err != nil {
			return err
		}
		if released+pruned > 0 {
			if err := writeState(tx, &st); err != nil {
				return err
			}
		}
		db.ackedOnCommit(tx, takeSnapshot(tx, st), taken)
		return nil
	})
	if err != nil {
		// Not durable: the caller acks again later. Unless a commit
		// carried it meanwhile, it leaves the queue, which must not grow
		// while the disk refuses writes.
		db.ackMu.Lock()
		db.acks = slices.DeleteFunc(db.acks, func(r *ackReq) bool { return r == req })
		db.ackMu.Unlock()
		select {
		case <-req.done:
			return db.afterAck()
		default:
		}
		return err
	}
	return db.afterAck()
}

// ackRides bounds the commits an Ack waits for to carry it; ackLinger is
// how long it waits for them, and how recent the last commit must be for
// it to wait at all. An ack alone costs two fsyncs of the one writer a
// customer's grant waits for: at 100 grants/s they were a third of the
// store's transactions.
const (
	ackRides  = 4
	ackLinger = 10 * time.Millisecond
)

// ackReq is an Ack waiting for a transaction to carry it; done is closed
// once one did.
type ackReq struct {
	seqs []uint64
	done chan struct{}
}

// afterAck wakes the background release when delivered entries pile up.
func (db *DB) afterAck() error {
	if db.releaseBacklog.Load() >= releaseKick {
		select {
		case db.kick <- struct{}{}:
		default:
		}
	}
	return nil
}

// takeAcks applies every waiting Ack in tx, once per transaction. The acks
// stay queued until the transaction commits (ackedOnCommit), so a rolled
// back transaction loses none: the next one applies them again, and
// applying an ack twice changes nothing.
func (db *DB) takeAcks(tx *bolt.Tx) ([]*ackReq, error) {
	if db.ackTx == tx {
		return nil, nil
	}
	db.ackTx = tx
	db.ackMu.Lock()
	taken := slices.Clone(db.acks)
	db.ackMu.Unlock()
	if len(taken) == 0 {
		return nil, nil
	}
	st, err := readState(tx)
	if err != nil {
		return nil, err
	}
	ob := tx.Bucket(bucketOutbox)
	above := make(map[uint64]bool, len(st.Above))
	for _, s := range st.Above {
		above[s] = true
	}
	changed := false
	for _, r := range taken {
		for _, seq := range r.seqs {
			if seq <= st.Delivered || seq > st.Seq || above[seq] {
				continue
			}
			v := ob.Get(u64(seq))
			if v == nil {
				continue
			}
			en := decodeEntry(v)
			st.Events--
			st.Bytes -= en.size
			if en.droppable {
				st.DropBytes -= en.size
			}
			above[seq] = true
			changed = true
		}
	}
	if !changed {
		return taken, nil
	}
	// The watermark moves over every queued seq acked in a row; the seqs
	// missing in between were dropped or released already.
	cur := ob.Cursor()
	for k, _ := cur.Seek(u64(st.Delivered + 1)); k != nil && above[seqOf(k)]; k, _ = cur.Next() {
		st.Delivered = seqOf(k)
		delete(above, st.Delivered)
	}
	st.Above = st.Above[:0]
	for s := range above {
		if s > st.Delivered {
			st.Above = append(st.Above, s)
		}
	}
	slices.Sort(st.Above)
	if k, _ := ob.Cursor().First(); k != nil && seqOf(k) <= st.Delivered {
		db.releaseBacklog.Store(st.Delivered - seqOf(k))
	}
	return taken, writeState(tx, &st)
}

// ackedOnCommit installs snap (the state once tx's functions ran) and
// releases the Acks taken, once tx has committed.
func (db *DB) ackedOnCommit(tx *bolt.Tx, snap snapshot, taken []*ackReq) {
	if len(taken) == 0 {
		return
	}
	tx.OnCommit(func() {
		db.apply(&snap)
		// bbolt runs commit handlers after it lets the next writer in, so
		// that one may have taken (and committed) the same acks: each is
		// released once.
		var released []*ackReq
		db.ackMu.Lock()
		db.acks = slices.DeleteFunc(db.acks, func(r *ackReq) bool {
			if slices.Contains(taken, r) {
				released = append(released, r)
				return true
			}
			return false
		})
		db.ackMu.Unlock()
		db.writes.acks.Add(uint64(len(released)))
		for _, r := range released {
			close(r.done)
		}
	})
}

// releaseBatch bounds the outbox entries of delivered events (13 bytes
// each) one transaction deletes; releaseKick is how many waiting wake the
// background release before its next tick.
const (
	releaseBatch = 4096
	releaseKick  = releaseBatch
)

// logCutoff is the newest seq the log may prune once delivered.
func (db *DB) logCutoff(st state) uint64 {
	if st.Seq <= uint64(db.opts.LogRetain) {
		return 0
	}
	return st.Seq - uint64(db.opts.LogRetain)
}

// releaseTx deletes up to limit outbox entries of delivered events
// (at or below the watermark), and the log's copies of those past
// retention.
func releaseTx(tx *bolt.Tx, st *state, cutoff uint64, limit int) (int, error) {
	ob, ev := tx.Bucket(bucketOutbox), tx.Bucket(bucketEvents)
	cur := ob.Cursor()
	n := 0
	for k, _ := cur.First(); k != nil && n < limit; k, _ = cur.Seek(u64(seqOf(k) + 1)) {
		seq := seqOf(k)
		if seq > st.Delivered {
			break
		}
		key := u64(seq)
		if err := ob.Delete(key); err != nil {
			return n, err
		}
		// An old event delivered after the log prune passed it.
		if seq <= cutoff && seq < st.LogFrom {
			if err := ev.Delete(key); err != nil {
				return n, err
			}
		}
		n++
	}
	return n, nil
}

// pruneLogTx deletes up to pruneBatch delivered events at or below cutoff,
// from st.LogFrom on, skipping those still queued, and advances LogFrom.
func pruneLogTx(tx *bolt.Tx, st *state, cutoff uint64) (int, error) {
	if cutoff == 0 || st.LogFrom > cutoff {
		return 0, nil
	}
	ob, ev := tx.Bucket(bucketOutbox), tx.Bucket(bucketEvents)
	cur := ev.Cursor()
	n, examined := 0, 0
	k, _ := cur.Seek(u64(st.LogFrom))
	for ; k != nil && examined < 4*pruneBatch && n < pruneBatch; examined++ {
		seq := seqOf(k)
		if seq > cutoff {
			break
		}
		if ob.Get(k) != nil && !st.delivered(seq) {
			k, _ = cur.Next()
			continue
		}
		if err := ev.Delete(u64(seq)); err != nil {
			return n, err
		}
		n++
		k, _ = cur.Seek(u64(seq + 1))
	}
	next := cutoff + 1
	if k != nil && seqOf(k) <= cutoff {
		next = seqOf(k)
	}
	if next == st.LogFrom && n == 0 {
		return 0, nil
	}
	st.LogFrom = next
	// Moving LogFrom alone is a change worth writing only with deletions.
	return max(n, 1), nil
}

// pruneLog releases delivered outbox entries and prunes the log in bounded
// transactions until both are done, writing nothing when there is nothing
// to do.
func (db *DB) pruneLog() error {
	for range 256 {
		more, err := db.pruneOnce()
		if err != nil || !more {
			return err
		}
	}
	return nil
}

// pruneOnce runs one bounded release and prune transaction, when there is
// work. It reports whether there may be more.
func (db *DB) pruneOnce() (bool, error) {
	s := db.snapshot()
	if s.LogFrom > db.logCutoff(s.state) && !db.releasable() {
		return false, nil
	}
	var snap *snapshot
	more := false
	err := db.update("prune event log", txPrune, func(tx *bolt.Tx) error {
		snap, more = nil, false
		st, err := readState(tx)
		if err != nil {
			return err
		}
		released, err := releaseTx(tx, &st, db.logCutoff(st), releaseBatch)
		if err != nil {
			return err
		}
		pruned, err := pruneLogTx(tx, &st, db.logCutoff(st))
		if err != nil {
			return err
		}
		more = released == releaseBatch || pruned > 0
		if err := writeState(tx, &st); err != nil {
			return err
		}
		s := takeSnapshot(tx, st)
		snap = &s
		return nil
	})
	if err != nil {
		return false, err
	}
	db.apply(snap)
	return more, nil
}

// releasable reports whether the outbox holds entries of delivered events.
func (db *DB) releasable() bool {
	found := false
	_ = db.bolt.View(func(tx *bolt.Tx) error {
		st, err := readState(tx)
		if err != nil {
			return err
		}
		k, _ := tx.Bucket(bucketOutbox).Cursor().First()
		found = k != nil && seqOf(k) <= st.Delivered
		return nil
	})
	return found
}

// OutboxStats describes the queue; now gives the oldest event's age.
func (db *DB) OutboxStats(now time.Time) edged.OutboxStats {
	s := db.snapshot()
	out := edged.OutboxStats{
		Events:  int(s.Events),
		Bytes:   s.Bytes,
		Oldest:  s.oldest,
		Dropped: s.Dropped,
		LastSeq: s.Seq,
	}
	if s.Events > 0 && !s.oldest.IsZero() && now.After(s.oldest) {
		out.OldestAgeS = int64(now.Sub(s.oldest) / time.Second)
	}
	return out
}

// Notify returns a channel that receives a value (never blocking a commit)
// after each commit that appended events.
func (db *DB) Notify() <-chan struct{} { return db.notify }

// Events returns logged events with seq > after, oldest first, at most limit
// (limit <= 0 or over 10000 means 10000); delivered ones included while
// retained. Errors: EUNAVAILABLE.
func (db *DB) Events(ctx context.Context, after uint64, limit int) ([]edged.Event, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	limit = pageLimit(limit)
	var out []edged.Event
	err := db.bolt.View(func(tx *bolt.Tx) error {
		out = out[:0]
		cur := tx.Bucket(bucketEvents).Cursor()
		for k, v := cur.Seek(u64(after + 1)); k != nil && len(out) < limit; k, v = cur.Next() {
			var e edged.Event
			if err := json.Unmarshal(v, &e); err != nil {
				return internalErr("decode event", err)
			}
			out = append(out, e)
		}
		return nil
	})
	if err != nil {
		return nil, storeErr("read event log", err)
	}
	return out, nil
}

func pageLimit(limit int) int {
	if limit <= 0 || limit > maxPage {
		return maxPage
	}
	return limit
}
