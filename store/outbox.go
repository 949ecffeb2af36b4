package store

import (
	"context"
	"encoding/json"
	"time"

	"github.com/stationedge/edged"
	bolt "go.etcd.io/bbolt"
)

// pruneBatch bounds the log events pruned by one transaction.
const pruneBatch = 512

// Pending returns up to limit queued events with seq > after, in seq order
// (limit <= 0 or over 10000 means 10000). Errors: EUNAVAILABLE.
func (db *DB) Pending(ctx context.Context, after uint64, limit int) ([]edged.Event, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	limit = pageLimit(limit)
	// Exclusive against commits, so no commit can rewrite an event between
	// this read and the mark of what was handed out.
	db.outMu.Lock()
	defer db.outMu.Unlock()
	var out []edged.Event
	err := db.bolt.View(func(tx *bolt.Tx) error {
		out = out[:0]
		ev := tx.Bucket(bucketEvents)
		cur := tx.Bucket(bucketOutbox).Cursor()
		for k, _ := cur.Seek(u64(after + 1)); k != nil && len(out) < limit; k, _ = cur.Next() {
			v := ev.Get(k)
			if v == nil {
				return edged.Errorf(edged.EINTERNAL, "queued event %d is missing from the log", seqOf(k))
			}
			var e edged.Event
			if err := json.Unmarshal(v, &e); err != nil {
				return internalErr("decode event", err)
			}
			out = append(out, e)
		}
		return nil
	})
	if err != nil {
		return nil, storeErr("read outbox", err)
	}
	if n := len(out); n > 0 {
		if last := out[n-1].Seq; last > db.handed.Load() {
			db.handed.Store(last)
		}
	}
	return out, nil
}

// Ack removes delivered events from the outbox; they stay in the log until
// log retention prunes them. Unknown seqs are ignored. Errors: EUNAVAILABLE.
func (db *DB) Ack(ctx context.Context, seqs ...uint64) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	if len(seqs) == 0 {
		return nil
	}
	var snap *snapshot
	// One releaser at a time (the uplink's acker) calls Ack: a batch would
	// only add bbolt's batch delay to every release.
	err := db.bolt.Update(func(tx *bolt.Tx) error {
		snap = nil
		st, err := readState(tx)
		if err != nil {
			return err
		}
		ob, ev := tx.Bucket(bucketOutbox), tx.Bucket(bucketEvents)
		cutoff := db.logCutoff(st)
		changed := false
		for _, seq := range seqs {
			k := u64(seq)
			v := ob.Get(k)
			if v == nil {
				continue
			}
			en := decodeEntry(v)
			if err := ob.Delete(k); err != nil {
				return err
			}
			// An old event acked after the log prune passed it.
			if seq <= cutoff && seq < st.LogFrom {
				if err := ev.Delete(k); err != nil {
					return err
				}
			}
			st.Events--
			st.Bytes -= en.size
			if en.droppable {
				st.DropBytes -= en.size
			}
			changed = true
		}
		if n, err := pruneLogTx(tx, &st, cutoff); err != nil {
			return err
		} else if n > 0 {
			changed = true
		}
		if !changed {
			return nil
		}
		if err := writeState(tx, &st); err != nil {
			return err
		}
		s := takeSnapshot(tx, st)
		snap = &s
		return nil
	})
	err = storeErr("ack", err)
	if snap != nil || err != nil {
		db.setHealth(err)
	}
	if err != nil {
		return err
	}
	db.apply(snap)
	return nil
}

// logCutoff is the newest seq the log may prune once delivered.
func (db *DB) logCutoff(st state) uint64 {
	if st.Seq <= uint64(db.opts.LogRetain) {
		return 0
	}
	return st.Seq - uint64(db.opts.LogRetain)
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
		if ob.Get(k) != nil {
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

// pruneLog prunes the log in bounded transactions until it is within
// retention, writing nothing when there is nothing to prune.
func (db *DB) pruneLog() error {
	for range 64 {
		if s := db.snapshot(); s.LogFrom > db.logCutoff(s.state) {
			return nil
		}
		var snap *snapshot
		err := db.update("prune event log", func(tx *bolt.Tx) error {
			snap = nil
			st, err := readState(tx)
			if err != nil {
				return err
			}
			if _, err := pruneLogTx(tx, &st, db.logCutoff(st)); err != nil {
				return err
			}
			if err := writeState(tx, &st); err != nil {
				return err
			}
			s := takeSnapshot(tx, st)
			snap = &s
			return nil
		})
		if err != nil {
			return err
		}
		db.apply(snap)
	}
	return nil
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
