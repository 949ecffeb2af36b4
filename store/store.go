// Package store keeps edged's durable state in a bbolt file: the event log
// and its outbox (§3.3), rentals, command records and the latest state of
// every device. It implements edged.Store and edged.Outbox.
//
// # Layout
//
// One bbolt file under data_dir, with these buckets:
//
//	meta      "version" -> 1; "state" -> JSON of the counters below
//	events    seq (8 bytes big-endian) -> the event envelope, JSON (§3.3):
//	          the log, delivered and undelivered events alike
//	outbox    seq -> class (1 byte: 1 droppable, 0 kept), envelope size
//	          (4 bytes), event ts in Unix ns (8 bytes): the index of
//	          undelivered events (and of delivered ones not yet
//	          released, see Delivery); the envelope itself stays in events
//	rentals   rental id -> JSON edged.Rental
//	commands  cmd id -> JSON edged.CommandRecord
//	results   edged.ResultKey -> JSON edged.ResultRecord: the result each
//	          rental message got, for redeliveries (§3.1)
//	stops     device id -> JSON edged.StopRecord: stops not yet delivered
//	devices   device id -> JSON edged.DeviceState
//
// The meta "state" record holds the last seq, the outbox's size (events,
// bytes, droppable bytes), the total of dropped events, the delivered
// watermark and a few scan positions. It is rewritten in the same transaction as every change to the
// outbox, so the counters can never disagree with the buckets, and the seq
// survives restarts without gaps.
//
// # Commits
//
// A Commit of device events runs in bbolt's DB.Batch, which groups
// concurrent committers into one fsynced transaction; any other Commit
// (the station's, which merges its changes itself) runs at once. Every
// commit's transaction also carries the Acks waiting and up to 256
// buffered device states, so a busy station pays one fsync for all of it.
// A batch function may run more than once, so it derives everything from
// the transaction (never from memory) and the in-memory copy of the
// counters is replaced only after the transaction succeeded: each
// transaction bumps a generation number and the newest generation wins.
// Each event is encoded once, in the transaction that assigns its seq; the
// stored envelope is what Pending returns in Event.Raw, for the uplink to
// publish as is.
//
// # Delivery
//
// Pending reads in a bbolt read transaction, concurrent with the writer.
// Ack moves a persisted watermark: every event at or below "delivered" is
// delivered, and the few seqs acked out of order beyond it (within the
// uplink's window) are listed beside it; the outbox counters move in the
// same write, so OutboxStats stays exact. An Ack rides in a commit in
// flight, or writes alone (taking a bounded release along) when there is
// none; either way it is durable when it returns, so a crash repeats at
// most the uplink's window. The outbox entries of delivered events are
// released later, a bounded batch per transaction, in the background.
//
// # Quota
//
// When the undelivered bytes exceed Options.OutboxMaxBytes, the oldest
// droppable events (device.event, device.online, device.offline) are removed
// from the outbox and the log, down to 85% of the quota, so a flood at the
// quota costs one drop every 15% of the quota rather than one per commit.
// The gap is recorded by an outbox.dropped event whose count, first_seq and
// last_seq are exact: every seq ever assigned is either delivered or counted
// in exactly one outbox.dropped. While the newest outbox.dropped event is
// still queued, is the newest non-droppable event, was created by this
// process and has not yet been handed to the uplink by Pending, a later drop
// extends it in place (count added, range widened) instead of appending
// another, so a tiny quota flooded while offline yields a single
// outbox.dropped. Its range may then include seqs that were kept; count is
// the number actually dropped. Events returned by Pending are never
// rewritten, because the cloud deduplicates by seq and would keep the first
// version. For the same reason an event Pending has handed out is not
// dropped while this process runs: it may already be in the cloud, and
// counting it as dropped too would break the accounting. (After a crash, the
// few events the previous process had in flight are droppable again.)
// Rental and command events are never dropped: when only events that are
// kept remain, the outbox exceeds its quota and a warning is logged. Only a
// commit that may cross the quota (judged from the counters before it)
// drops, holding off Pending from its decision to its commit; commits that
// each stay under the quota may together cross it by a group's size, and
// the next commit drops.
//
// # Log and retention
//
// Delivered events stay in the log until they are older than the newest
// Options.LogRetain events; they are pruned a bounded number at a time in
// the background (and by an Ack written alone). Dropped events leave the log at once. Ended and
// rejected rentals, done command records and result records older than
// Options.Retention are pruned in the background; starting and active
// rentals and stop records never are.
//
// # Device state
//
// SaveDeviceState keeps the latest state per device in memory, to spare the
// SD card one fsync per telemetry message. Commits and acks carry the
// buffer along; a background loop writes what is left every
// Options.FlushInterval (idle times) and on Close. States are copied from
// the buffer inside the transaction that writes them, so they reach the
// file in transaction order.
//
// # Counting writes
//
// Every write transaction runs its function through one wrapper that
// counts it once it commits, under the operation that ran it, beside the
// operations it made durable (commits, acks, device states). bbolt pays
// two fdatasyncs per committed transaction and one fsync per growth of the
// file; Writes reports all of it for /metrics, so the fsyncs a station
// pays can be read beside the changes they carried.
//
// # Errors
//
// A failed write (a full disk, an I/O error, a closed store) is an
// *edged.Error with code EUNAVAILABLE wrapping the cause, and Healthy reports
// it until a later write succeeds. Nothing is cached that a failed write
// could leave inconsistent, so the store recovers by itself once space
// returns.
package store

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stationedge/edged"
	bolt "go.etcd.io/bbolt"
)

// Options tune a DB. The zero value is usable.
type Options struct {
	// OutboxMaxBytes is the quota of undelivered events
	// (uplink.outbox_max_mb); 0 means 64 MiB.
	OutboxMaxBytes int64
	// LogRetain is how many of the newest events the log keeps once they
	// are delivered, for the status page and the API; 0 means 10000.
	LogRetain int
	// FlushInterval is how often buffered device states are written;
	// 0 means 10s.
	FlushInterval time.Duration
	// Retention is how long ended or rejected rentals and done command
	// records are kept as idempotency records; 0 means 7 days.
	Retention time.Duration
	// SingleCommitter says the caller groups its changes itself and
	// commits them from one goroutine (the station's committer): Commit
	// then never waits out bbolt's batch delay for partners that cannot
	// come. Acks and device states ride along either way.
	SingleCommitter bool
	// Now is the clock used for retention; nil means time.Now.
	Now func() time.Time
	// Logger receives the store's warnings; nil discards them.
	Logger *slog.Logger
}

// Defaults of Options.
const (
	DefaultOutboxMaxBytes = 64 << 20
	DefaultLogRetain      = 10000
	DefaultFlushInterval  = 10 * time.Second
	DefaultRetention      = 7 * 24 * time.Hour
)

// lockTimeout bounds the wait for the file lock, so that a second edged on
// the same data_dir fails at once with a clear message.
var lockTimeout = time.Second

// maintainEvery is how often rentals and commands past retention are pruned.
const maintainEvery = time.Hour

// lowWaterPercent is where a drop stops: a share of the quota.
const lowWaterPercent = 85

// maxPage bounds what one call of Events or Pending returns.
const maxPage = 10000

var (
	bucketMeta     = []byte("meta")
	bucketEvents   = []byte("events")
	bucketOutbox   = []byte("outbox")
	bucketRentals  = []byte("rentals")
	bucketCommands = []byte("commands")
	bucketDevices  = []byte("devices")
	bucketResults  = []byte("results")
	bucketStops    = []byte("stops")

	keyVersion = []byte("version")
	keyState   = []byte("state")
)

const schemaVersion = 1

// DB is edged's bbolt store. It implements edged.Store and edged.Outbox and
// is safe for concurrent use.
type DB struct {
	bolt   *bolt.DB
	path   string // the file's, kept here: bbolt's own is cleared by Close
	opts   Options
	logger *slog.Logger

	// startSeq is the last seq at Open: outbox.dropped events at or below it
	// may have been published by an earlier process and are never rewritten.
	startSeq uint64

	// handMu orders Pending against drops: Pending holds it shared while
	// it reads (in a bbolt read transaction) and marks what it handed out;
	// only a commit that may drop events (the outbox is near its quota)
	// holds it exclusively, from its decision to its commit, so an event is
	// never dropped or rewritten after Pending returned it. Other commits
	// and Ack never take it.
	handMu sync.RWMutex
	// handed is the highest seq Pending has returned.
	handed atomic.Uint64

	statsMu sync.Mutex
	stats   snapshot

	notify chan struct{}

	health atomic.Pointer[error]

	// Device states are copied from devBuf inside the write transaction
	// that stores them, so they reach the file in transaction order and an
	// older copy never overwrites a newer one.
	devMu  sync.Mutex
	devBuf map[string]bufferedState
	devVer uint64
	// devTx is the write transaction that last took buffered states, so
	// the functions of one batch take them once. Only bbolt's single
	// writer touches it, under bbolt's writer lock.
	devTx *bolt.Tx

	// kick asks the background loop to release delivered events now;
	// releaseBacklog is about how many wait.
	kick           chan struct{}
	releaseBacklog atomic.Uint64

	// acks wait (under ackMu) for a write transaction to carry them;
	// ackTx is the transaction that last took them (writer only, like
	// devTx). committing counts commits in flight; endCh is closed and
	// replaced (under endMu) as each ends, for an Ack waiting to ride.
	ackMu      sync.Mutex
	acks       []*ackReq
	ackTx      *bolt.Tx
	committing atomic.Int64
	endMu      sync.Mutex
	endCh      chan struct{}
	lastEnd    atomic.Int64 // when the last commit ended, unix ns
	ackLinger  time.Duration

	// writes counts write transactions, fsyncs and what they carried.
	writes writeCounters

	warnMu       sync.Mutex
	lastOverWarn time.Time

	// testHookCommit, when set, runs at the start of every run of a commit's
	// batch function.
	testHookCommit  func()
	testAlwaysBatch bool // tests: every commit through bbolt.Batch

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
	closed    atomic.Bool
}

type bufferedState struct {
	state edged.DeviceState
	ver   uint64
}

// state is the meta record, rewritten with every change to the outbox.
type state struct {
	// Seq is the last seq assigned.
	Seq uint64 `json:"seq"`
	// Gen rises by one per transaction that writes state, so the newest
	// in-memory snapshot wins whatever order committers return in.
	Gen uint64 `json:"gen"`
	// Events and Bytes are the outbox's size; DropBytes the part of Bytes
	// in droppable events.
	Events    int64 `json:"outbox_events"`
	Bytes     int64 `json:"outbox_bytes"`
	DropBytes int64 `json:"outbox_droppable_bytes"`
	// Dropped is the total of events ever dropped.
	Dropped uint64 `json:"dropped"`
	// DropFrom: every queued event below it is kept (not droppable), so a
	// drop scans from here.
	DropFrom uint64 `json:"drop_from"`
	// LastKept is the newest non-droppable event; LastDropped the newest
	// outbox.dropped event.
	LastKept    uint64 `json:"last_kept"`
	LastDropped uint64 `json:"last_dropped"`
	// LogFrom: every logged event below it is either pruned or still
	// queued (an Ack of it prunes it).
	LogFrom uint64 `json:"log_from"`
	// Delivered is the watermark: every event at or below it is
	// delivered. Their outbox entries are deleted lazily, in bounded
	// batches; until then they are skipped. Above holds the seqs acked
	// out of order beyond the watermark (a few: the uplink's window).
	Delivered uint64   `json:"delivered,omitempty"`
	Above     []uint64 `json:"above,omitempty"`
}

// delivered reports whether the queued event seq is delivered.
func (st *state) delivered(seq uint64) bool {
	if seq <= st.Delivered {
		return true
	}
	_, found := slices.BinarySearch(st.Above, seq)
	return found
}

// snapshot is the in-memory copy of the counters after a transaction.
type snapshot struct {
	state
	oldest time.Time
}

// Open opens or creates the store file at path. Its directory must exist.
// When another process holds the file, Open fails after about a second
// with an EUNAVAILABLE error saying so.
func Open(path string, opts Options) (*DB, error) {
	if opts.OutboxMaxBytes <= 0 {
		opts.OutboxMaxBytes = DefaultOutboxMaxBytes
	}
	if opts.LogRetain <= 0 {
		opts.LogRetain = DefaultLogRetain
	}
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = DefaultFlushInterval
	}
	if opts.Retention <= 0 {
		opts.Retention = DefaultRetention
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout: lockTimeout,
		// The freelist is rebuilt on open rather than written by every
		// commit: fewer bytes written per event, for the SD card.
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
	})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, &edged.Error{Code: edged.EUNAVAILABLE, Err: err,
			Message: fmt.Sprintf("store %s is locked by another process (is another edged running on this data_dir?)", path)}
	}
	if err != nil {
		return nil, &edged.Error{Code: edged.EUNAVAILABLE, Message: "open store " + path, Err: err}
	}
	// Batches form while the previous transaction fsyncs; a short delay
	// keeps a lone committer's latency low.
	bdb.MaxBatchDelay = 2 * time.Millisecond
	db := &DB{
		bolt:      bdb,
		path:      path,
		opts:      opts,
		logger:    logger,
		notify:    make(chan struct{}, 1),
		devBuf:    make(map[string]bufferedState),
		kick:      make(chan struct{}, 1),
		endCh:     make(chan struct{}),
		ackLinger: ackLinger,
		stop:      make(chan struct{}),
	}
	if fi, err := os.Stat(path); err == nil {
		db.writes.size.Store(fi.Size()) // bbolt's own file creation is not counted
	}
	if err := db.init(); err != nil {
		bdb.Close()
		return nil, err
	}
	db.setHealth(nil)
	db.wg.Add(1)
	go db.background()
	return db, nil
}

// init creates the buckets and loads the counters. A store that has them
// all is only read: nothing is written at open, so edged restarts on a full
// disk (§4), and the SD card is spared a write per start.
func (db *DB) init() error {
	buckets := [][]byte{bucketMeta, bucketEvents, bucketOutbox, bucketRentals, bucketCommands, bucketDevices, bucketResults, bucketStops}
	ready := true
	err := db.bolt.View(func(tx *bolt.Tx) error {
		for _, name := range buckets {
			if tx.Bucket(name) == nil {
				ready = false
				return nil
			}
		}
		ready = tx.Bucket(bucketMeta).Get(keyVersion) != nil
		return nil
	})
	if err != nil {
		return storeErr("open store", err)
	}
	var snap snapshot
	load := func(tx *bolt.Tx) error {
		if tx.Writable() {
			for _, name := range buckets {
				if _, err := tx.CreateBucketIfNotExists(name); err != nil {
					return err
				}
			}
		}
		meta := tx.Bucket(bucketMeta)
		if v := meta.Get(keyVersion); v == nil {
			if err := meta.Put(keyVersion, u64(schemaVersion)); err != nil {
				return err
			}
		} else if len(v) != 8 || binary.BigEndian.Uint64(v) != schemaVersion {
			return edged.Errorf(edged.EINTERNAL, "store schema version %x is not %d", v, schemaVersion)
		}
		st, err := readState(tx)
		if err != nil {
			return err
		}
		snap = takeSnapshot(tx, st)
		return nil
	}
	if ready {
		err = db.bolt.View(load)
	} else {
		err = db.bolt.Update(db.counted(txOpen, load))
	}
	if err != nil {
		return storeErr("open store", err)
	}
	db.stats = snap
	db.startSeq = snap.Seq
	return nil
}

// Close flushes buffered device states, stops the background work and
// closes the file. Later calls return the first call's result.
func (db *DB) Close() error {
	db.closeOnce.Do(func() {
		close(db.stop)
		db.wg.Wait()
		flushErr := db.flushDevices()
		db.closed.Store(true)
		closeErr := db.bolt.Close()
		db.closeErr = errors.Join(flushErr, closeErr)
	})
	return db.closeErr
}

// Healthy reports whether the store can write: nil when the last write
// succeeded, else that write's EUNAVAILABLE error. It does not write.
func (db *DB) Healthy() error {
	if db.closed.Load() {
		return edged.Errorf(edged.EUNAVAILABLE, "store is closed")
	}
	if p := db.health.Load(); p != nil {
		return *p
	}
	return nil
}

// setHealth records the outcome of a write. Only unavailability counts:
// an invalid request says nothing about the disk.
func (db *DB) setHealth(err error) {
	if err != nil && edged.ErrorCode(err) != edged.EUNAVAILABLE {
		return
	}
	db.health.Store(&err)
}

// background flushes device states and prunes, until Close.
func (db *DB) background() {
	defer db.wg.Done()
	flush := time.NewTicker(db.opts.FlushInterval)
	defer flush.Stop()
	maintain := time.NewTicker(maintainEvery)
	defer maintain.Stop()
	// First pass soon after start, so a station restarted often still prunes.
	first := time.NewTimer(time.Minute)
	defer first.Stop()
	for {
		select {
		case <-db.stop:
			return
		case <-flush.C:
			if err := db.flushDevices(); err != nil {
				db.logger.Warn("device state flush failed", "err", err)
			}
			if err := db.pruneLog(); err != nil {
				db.logger.Warn("event log prune failed", "err", err)
			}
		case <-db.kick:
			if err := db.pruneLog(); err != nil {
				db.logger.Warn("event log prune failed", "err", err)
			}
		case <-first.C:
			db.maintain()
		case <-maintain.C:
			db.maintain()
		}
	}
}

func (db *DB) maintain() {
	if err := db.pruneRecords(); err != nil {
		db.logger.Warn("retention prune failed", "err", err)
	}
}

// update runs a write transaction, counts it under kind, records the outcome for Healthy and
// returns an *edged.Error. Callers check for work first (in memory or in a
// read transaction): with NoFreelistSync, rolling a write transaction back
// rescans the whole file for free pages, and committing an empty one still
// writes and fsyncs a meta page.
func (db *DB) update(op string, kind txKind, fn func(tx *bolt.Tx) error) error {
	err := db.bolt.Update(db.counted(kind, fn))
	if errors.Is(err, errNothingToWrite) {
		return nil
	}
	err = storeErr(op, err)
	db.setHealth(err)
	return err
}

// errNothingToWrite rolls back an update that found nothing to do: bbolt
// would otherwise commit it, two fsyncs for an unchanged file.
var errNothingToWrite = errors.New("nothing to write")

// storeErr turns an error of bbolt into an *edged.Error: edged's own errors
// pass through; anything else (I/O errors, a full disk, a closed file; bbolt
// does not always keep the cause's type) is EUNAVAILABLE.
func storeErr(op string, err error) error {
	if err == nil {
		return nil
	}
	var e *edged.Error
	if errors.As(err, &e) {
		return err
	}
	return &edged.Error{Code: edged.EUNAVAILABLE, Message: op, Err: err}
}

func internalErr(op string, err error) error {
	return &edged.Error{Code: edged.EINTERNAL, Message: op, Err: err}
}

func readState(tx *bolt.Tx) (state, error) {
	var st state
	v := tx.Bucket(bucketMeta).Get(keyState)
	if v == nil {
		return st, nil
	}
	if err := json.Unmarshal(v, &st); err != nil {
		return st, internalErr("read store state", err)
	}
	return st, nil
}

func writeState(tx *bolt.Tx, st *state) error {
	st.Gen++
	v, err := json.Marshal(st)
	if err != nil {
		return internalErr("write store state", err)
	}
	return tx.Bucket(bucketMeta).Put(keyState, v)
}

// takeSnapshot reads the oldest queued event's ts to go with st.
func takeSnapshot(tx *bolt.Tx, st state) snapshot {
	s := snapshot{state: st}
	cur := tx.Bucket(bucketOutbox).Cursor()
	for k, v := cur.Seek(u64(st.Delivered + 1)); k != nil; k, v = cur.Next() {
		if !st.delivered(seqOf(k)) {
			s.oldest = decodeEntry(v).ts
			break
		}
	}
	return s
}

// apply installs s if it is newer than the current snapshot.
func (db *DB) apply(s *snapshot) {
	if s == nil {
		return
	}
	db.statsMu.Lock()
	if s.Gen > db.stats.Gen {
		db.stats = *s
	}
	db.statsMu.Unlock()
}

func (db *DB) snapshot() snapshot {
	db.statsMu.Lock()
	defer db.statsMu.Unlock()
	return db.stats
}

func u64(n uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, n)
	return b
}

func seqOf(k []byte) uint64 {
	if len(k) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(k)
}

// entry is an outbox value.
type entry struct {
	droppable bool
	size      int64
	ts        time.Time
}

const entryLen = 13

func encodeEntry(e entry) []byte {
	b := make([]byte, entryLen)
	if e.droppable {
		b[0] = 1
	}
	binary.BigEndian.PutUint32(b[1:5], uint32(e.size))
	if !e.ts.IsZero() {
		binary.BigEndian.PutUint64(b[5:13], uint64(e.ts.UnixNano()))
	}
	return b
}

func decodeEntry(b []byte) entry {
	if len(b) < entryLen {
		return entry{}
	}
	e := entry{droppable: b[0] == 1, size: int64(binary.BigEndian.Uint32(b[1:5]))}
	if ns := binary.BigEndian.Uint64(b[5:13]); ns != 0 {
		e.ts = time.Unix(0, int64(ns)).UTC()
	}
	return e
}

func ctxErr(ctx context.Context) error {
	if ctx == nil {
		return nil
	}
	return ctx.Err()
}
