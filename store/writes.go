package store

import (
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/stationedge/edged"
	bolt "go.etcd.io/bbolt"
)

// txKind is the operation that runs a write transaction; see
// edged.StoreWrites.Txs.
type txKind int

const (
	txCommit txKind = iota
	txAck
	txDeviceFlush
	txDeviceNow
	txPrune
	txRetention
	txRegistry
	txOpen
	numTxKinds
)

var txKindNames = [numTxKinds]string{"commit", "ack", "device_flush", "device_now", "prune", "retention", "registry", "open"}

// fsyncsPerTx is what bbolt v1.4 pays per committed write transaction:
// Tx.Commit fdatasyncs the dirty pages (even when there are none), then
// the meta page. Growing the file adds a truncate and an fsync (DB.grow).
const fsyncsPerTx = 2

// writeCounters counts committed write transactions, file growths and the
// operations the transactions carried. Every write transaction of the
// store runs its function through counted, so none is missed.
type writeCounters struct {
	txs                         [numTxKinds]atomic.Uint64
	grows                       atomic.Uint64
	commits, acks, deviceStates atomic.Uint64
	// size is the file's size last seen; it only grows (bbolt truncates
	// upwards only), so each increase is one growth.
	size atomic.Int64
	// writeTime counts the transactions by the time bbolt took to write
	// and sync them (edged.WriteTimeBounds), writeSum is their total in
	// nanoseconds.
	writeTime [writeBuckets]atomic.Uint64
	writeSum  atomic.Int64
	// tx is the write transaction counted last (writer only, like devTx):
	// the functions of one batch share a transaction, counted once.
	tx *bolt.Tx
}

// counted wraps fn, a write transaction's function, to count the
// transaction under kind once it commits. In a batch the first function
// names the transaction; in the store only commits are batched.
func (db *DB) counted(kind txKind, fn func(*bolt.Tx) error) func(*bolt.Tx) error {
	return func(tx *bolt.Tx) error {
		w := &db.writes
		if w.tx != tx {
			w.tx = tx
			// bbolt grows the file only in a commit: looking once it
			// committed is enough (a growth by a commit that then failed
			// is seen with the next one's).
			tx.OnCommit(func() {
				w.txs[kind].Add(1)
				st := tx.Stats()
				w.wrote(st.GetWriteTime())
				db.sawGrowth()
			})
		}
		return fn(tx)
	}
}

// writeBuckets is one per edged.WriteTimeBounds, and one for longer
// writes.
const writeBuckets = len(edged.WriteTimeBounds) + 1

// wrote counts a transaction that took d to write and sync.
func (w *writeCounters) wrote(d time.Duration) {
	i, _ := slices.BinarySearch(edged.WriteTimeBounds[:], d) // the first bound >= d
	w.writeTime[i].Add(1)
	w.writeSum.Add(int64(d))
}

// writeTimes returns the write times counted so far.
func (w *writeCounters) writeTimes() edged.DurationHistogram {
	h := edged.DurationHistogram{
		Bounds: slices.Clone(edged.WriteTimeBounds[:]),
		Counts: make([]uint64, writeBuckets),
		Sum:    time.Duration(w.writeSum.Load()),
	}
	for i := range h.Counts {
		h.Counts[i] = w.writeTime[i].Load()
	}
	return h
}

// sawGrowth counts a growth of the file since it last looked, after every
// commit: one stat per write transaction.
func (db *DB) sawGrowth() {
	fi, err := os.Stat(db.path) // not bolt.Path(): a commit handler may run during Close
	if err != nil {
		return
	}
	w := &db.writes
	for n := fi.Size(); ; {
		old := w.size.Load()
		if n <= old {
			return
		}
		if w.size.CompareAndSwap(old, n) {
			w.grows.Add(1)
			return
		}
	}
}

// Writes reports the store's write transactions, the fsyncs they made and
// what they carried, since Open. The fsyncs bbolt makes when it creates a
// new file are not counted.
func (db *DB) Writes() edged.StoreWrites {
	w := &db.writes
	out := edged.StoreWrites{
		Txs:          make(map[string]uint64, numTxKinds),
		Grows:        w.grows.Load(),
		Commits:      w.commits.Load(),
		Acks:         w.acks.Load(),
		DeviceStates: w.deviceStates.Load(),
	}
	var n uint64
	for k := range numTxKinds {
		v := w.txs[k].Load()
		out.Txs[txKindNames[k]] = v
		n += v
	}
	out.Fsyncs = fsyncsPerTx*n + out.Grows
	out.WriteTime = w.writeTimes()
	return out
}
