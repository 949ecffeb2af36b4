package store

import (
	"context"
	"encoding/json"
	"time"

	"github.com/stationedge/edged"
	bolt "go.etcd.io/bbolt"
)

var _ edged.Store = (*DB)(nil)
var _ edged.Outbox = (*DB)(nil)

// Commit applies c in one fsynced transaction, grouped with concurrent
// commits. The events get consecutive seqs and are returned as stored (an
// event with no data gets {}); an outbox.dropped event the quota required is
// stored after them but not returned. Errors: EINVALID for a rental or
// command without an id or an event whose data is not JSON, EUNAVAILABLE
// when the disk refuses the write, EINTERNAL otherwise.
func (db *DB) Commit(ctx context.Context, c edged.Change) ([]edged.Event, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	if err := validChange(c); err != nil {
		return nil, err
	}
	if c.Empty() {
		return []edged.Event{}, nil
	}
	rentals := make([][]byte, len(c.Rentals))
	for i, r := range c.Rentals {
		v, err := json.Marshal(r)
		if err != nil {
			return nil, internalErr("encode rental", err)
		}
		rentals[i] = v
	}
	commands := make([][]byte, len(c.Commands))
	for i, r := range c.Commands {
		v, err := json.Marshal(r)
		if err != nil {
			return nil, internalErr("encode command record", err)
		}
		commands[i] = v
	}
	results := make([][]byte, len(c.Results))
	for i, r := range c.Results {
		v, err := json.Marshal(r)
		if err != nil {
			return nil, internalErr("encode result record", err)
		}
		results[i] = v
	}
	stops := make([][]byte, len(c.Stops))
	for i, r := range c.Stops {
		if r.Done {
			continue
		}
		v, err := json.Marshal(r)
		if err != nil {
			return nil, internalErr("encode stop record", err)
		}
		stops[i] = v
	}

	// Only a commit that may cross the quota may drop, and it excludes
	// Pending from its decision to its commit (see handMu). Concurrent
	// commits that each stay under it may together cross it: the next
	// commit drops.
	mayDrop := db.mayDrop(c)
	if mayDrop {
		db.handMu.Lock()
		defer db.handMu.Unlock()
	}
	db.committing.Add(1)
	defer func() {
		db.committing.Add(-1)
		db.lastEnd.Store(time.Now().UnixNano())
		db.endMu.Lock()
		close(db.endCh)
		db.endCh = make(chan struct{})
		db.endMu.Unlock()
	}()
	group := (groupable(c) && !db.opts.SingleCommitter) || db.testAlwaysBatch
	ride := rideRental
	if groupable(c) {
		ride = flushChunk
	}
	var res commitResult
	fn := func(tx *bolt.Tx) error {
		if db.testHookCommit != nil {
			db.testHookCommit()
		}
		// A batch function may run again after a rollback: start over.
		res = commitResult{}
		// Waiting acks and buffered device states ride along: one fsync.
		acks, err := db.takeAcks(tx)
		if err != nil {
			return err
		}
		if err := db.rideDevices(tx, ride); err != nil {
			return err
		}
		if err := db.commitTx(tx, c, encoded{rentals, commands, results, stops}, mayDrop, &res); err != nil {
			return err
		}
		if len(acks) > 0 {
			snap := res.snap
			if snap == nil {
				st, err := readState(tx)
				if err != nil {
					return err
				}
				s := takeSnapshot(tx, st)
				snap = &s
			}
			db.ackedOnCommit(tx, *snap, acks)
		}
		return nil
	}
	var err error
	if group {
		err = db.bolt.Batch(db.counted(txCommit, fn))
	} else {
		err = db.bolt.Update(db.counted(txCommit, fn))
	}
	err = storeErr("commit", err)
	db.setHealth(err)
	if err != nil {
		return nil, err
	}
	db.writes.commits.Add(1)
	db.apply(res.snap)
	if len(res.events) > 0 {
		select {
		case db.notify <- struct{}{}:
		default:
		}
	}
	if res.dropped.Count > 0 {
		db.logger.Warn("outbox over quota: dropped events",
			"count", res.dropped.Count, "first_seq", res.dropped.FirstSeq, "last_seq", res.dropped.LastSeq,
			"quota_bytes", db.opts.OutboxMaxBytes)
	}
	if res.snap != nil && res.snap.Bytes > db.opts.OutboxMaxBytes {
		db.warnOverQuota(res.snap.Bytes)
	}
	return res.events, nil
}

// envelopeOverhead bounds an envelope's bytes besides its station, type
// and data: the keys, a seq of 20 digits and a ts of 35 characters.
const envelopeOverhead = 160

// mayDrop reports whether committing c may take the outbox over its quota,
// judged from the last snapshot and an upper bound of c's envelopes.
func (db *DB) mayDrop(c edged.Change) bool {
	if len(c.Events) == 0 {
		return false
	}
	var add int64
	for _, e := range c.Events {
		add += int64(len(e.Station)+len(e.Type)+len(e.Data)) + envelopeOverhead
	}
	s := db.snapshot()
	return s.Bytes+add > db.opts.OutboxMaxBytes
}

// groupable reports whether c is worth waiting for a group commit: device
// events arrive from many connections at once and share one fsync. The
// station's own changes (rentals, command records, presence) are made one
// at a time under its lock, so a batch would only ever hold one of them
// and each would wait out bbolt's batch delay for nothing.
func groupable(c edged.Change) bool {
	if len(c.Rentals) > 0 || len(c.Commands) > 0 || len(c.Results) > 0 || len(c.Stops) > 0 {
		return false
	}
	for _, e := range c.Events {
		if e.Type != edged.EventDeviceEvent {
			return false
		}
	}
	return true
}

type commitResult struct {
	events  []edged.Event
	snap    *snapshot
	dropped edged.OutboxDroppedData
}

// maxIDLen bounds rental and command ids as keys. The contract's ids are at
// most 128 characters (512 bytes of UTF-8); a longer one is a bad request,
// not a sick disk, and must not fail inside bbolt as one.
const maxIDLen = 512

func validChange(c edged.Change) error {
	for _, r := range c.Rentals {
		if r.ID == "" || len(r.ID) > maxIDLen {
			return edged.Errorf(edged.EINVALID, "rental id must be 1 to %d bytes", maxIDLen)
		}
	}
	for _, r := range c.Commands {
		if r.CmdID == "" || len(r.CmdID) > maxIDLen {
			return edged.Errorf(edged.EINVALID, "cmd_id must be 1 to %d bytes", maxIDLen)
		}
	}
	for _, r := range c.Results {
		if r.RentalID == "" || len(r.Key()) > 2*maxIDLen {
			return edged.Errorf(edged.EINVALID, "result record needs a rental id of 1 to %d bytes", maxIDLen)
		}
	}
	for _, r := range c.Stops {
		if r.DeviceID == "" || len(r.DeviceID) > maxIDLen {
			return edged.Errorf(edged.EINVALID, "stop record needs a device id of 1 to %d bytes", maxIDLen)
		}
	}
	for _, e := range c.Events {
		if e.Type == "" {
			return edged.Errorf(edged.EINVALID, "event without a type")
		}
		if len(e.Data) > 0 && !json.Valid(e.Data) {
			return edged.Errorf(edged.EINVALID, "data of %s event is not JSON", e.Type)
		}
	}
	return nil
}

// encoded holds a change's records as JSON, encoded once outside the
// transaction.
type encoded struct {
	rentals, commands, results, stops [][]byte
}

// commitTx is the body of a commit. It reads everything it needs from tx,
// so it may run any number of times.
func (db *DB) commitTx(tx *bolt.Tx, c edged.Change, enc encoded, mayDrop bool, res *commitResult) error {
	rb := tx.Bucket(bucketRentals)
	for i, r := range c.Rentals {
		if err := rb.Put([]byte(r.ID), enc.rentals[i]); err != nil {
			return err
		}
	}
	cb := tx.Bucket(bucketCommands)
	for i, r := range c.Commands {
		if err := cb.Put([]byte(r.CmdID), enc.commands[i]); err != nil {
			return err
		}
	}
	xb := tx.Bucket(bucketResults)
	for i, r := range c.Results {
		if err := xb.Put([]byte(r.Key()), enc.results[i]); err != nil {
			return err
		}
	}
	sb := tx.Bucket(bucketStops)
	for i, r := range c.Stops {
		var err error
		if r.Done {
			err = sb.Delete([]byte(r.DeviceID))
		} else {
			err = sb.Put([]byte(r.DeviceID), enc.stops[i])
		}
		if err != nil {
			return err
		}
	}
	if len(c.Events) == 0 {
		return nil
	}
	st, err := readState(tx)
	if err != nil {
		return err
	}
	res.events = make([]edged.Event, len(c.Events))
	for i, e := range c.Events {
		if len(e.Data) == 0 {
			e.Data = json.RawMessage("{}")
		}
		st.Seq++
		e.Seq = st.Seq
		e.TS = e.TS.UTC() // §3.3: times in UTC, in the stored envelope too
		e.Raw = nil
		if _, err := appendEvent(tx, &st, e); err != nil {
			return err
		}
		res.events[i] = e
	}
	if mayDrop && st.Bytes > db.opts.OutboxMaxBytes && st.DropBytes > 0 {
		last := c.Events[len(c.Events)-1]
		if err := db.drop(tx, &st, last, res); err != nil {
			return err
		}
	}
	if err := writeState(tx, &st); err != nil {
		return err
	}
	snap := takeSnapshot(tx, st)
	res.snap = &snap
	return nil
}

// appendEvent logs e and queues it in the outbox. It returns the envelope
// as stored: the bytes the uplink publishes (§3.3).
func appendEvent(tx *bolt.Tx, st *state, e edged.Event) ([]byte, error) {
	v, err := json.Marshal(e)
	if err != nil {
		return nil, internalErr("encode event", err)
	}
	k := u64(e.Seq)
	if err := tx.Bucket(bucketEvents).Put(k, v); err != nil {
		return nil, err
	}
	en := entry{droppable: e.Type.Droppable(), size: int64(len(v)), ts: e.TS}
	if err := tx.Bucket(bucketOutbox).Put(k, encodeEntry(en)); err != nil {
		return nil, err
	}
	st.Events++
	st.Bytes += en.size
	if en.droppable {
		st.DropBytes += en.size
	} else {
		st.LastKept = e.Seq
	}
	return v, nil
}

// drop removes the oldest droppable events until the outbox is at the low
// water mark or holds no droppable event, and records them in an
// outbox.dropped event, extending the newest one when it may. like gives
// the station, ts and clock_synced of a new outbox.dropped event.
func (db *DB) drop(tx *bolt.Tx, st *state, like edged.Event, res *commitResult) error {
	low := db.opts.OutboxMaxBytes * lowWaterPercent / 100
	ob, ev := tx.Bucket(bucketOutbox), tx.Bucket(bucketEvents)
	var d edged.OutboxDroppedData
	// Events Pending handed out may be on their way to the cloud: dropping
	// one would count it both delivered and dropped, so they are kept.
	// Delivered events are not queued any more, whatever the outbox still
	// holds of them.
	base := max(st.DropFrom, st.Delivered+1)
	from := max(base, db.handed.Load()+1)
	cur := ob.Cursor()
	k, v := cur.Seek(u64(from))
	for k != nil && st.Bytes > low && st.DropBytes > 0 {
		en := decodeEntry(v)
		seq := seqOf(k)
		if !en.droppable || st.delivered(seq) {
			k, v = cur.Next()
			continue
		}
		key := u64(seq)
		if err := ob.Delete(key); err != nil {
			return err
		}
		if err := ev.Delete(key); err != nil {
			return err
		}
		st.Events--
		st.Bytes -= en.size
		st.DropBytes -= en.size
		if d.Count == 0 {
			d.FirstSeq = seq
		}
		d.Count++
		d.LastSeq = seq
		// Deleting under a cursor may skip keys: seek again.
		k, v = cur.Seek(u64(seq + 1))
	}
	// Every queued event below DropFrom is kept. Handed-out events are kept
	// only for this process's life (after a restart they are droppable
	// again), so DropFrom stays put when the scan skipped them.
	if from == base {
		if k == nil {
			st.DropFrom = st.Seq + 1
		} else {
			st.DropFrom = seqOf(k)
		}
	}
	if d.Count == 0 {
		return nil
	}
	st.Dropped += d.Count
	res.dropped = d

	if ok, err := db.extendDropped(tx, st, d); ok || err != nil {
		return err
	}
	data, err := json.Marshal(d)
	if err != nil {
		return internalErr("encode outbox.dropped", err)
	}
	st.Seq++
	e := edged.Event{Seq: st.Seq, Station: like.Station, Type: edged.EventOutboxDropped,
		TS: like.TS, ClockSynced: like.ClockSynced, Data: data}
	if e.TS.IsZero() {
		e.TS = db.opts.Now().UTC()
	}
	if _, err := appendEvent(tx, st, e); err != nil {
		return err
	}
	st.LastDropped = e.Seq
	return nil
}

// extendDropped adds d to the newest outbox.dropped event when that is
// safe: it is still queued, nothing non-droppable was queued after it, it
// was created by this process and Pending has not handed it out (the cloud
// keeps the first version of a seq it sees).
func (db *DB) extendDropped(tx *bolt.Tx, st *state, d edged.OutboxDroppedData) (bool, error) {
	seq := st.LastDropped
	if seq == 0 || seq != st.LastKept || seq <= db.startSeq || seq <= db.handed.Load() || st.delivered(seq) {
		return false, nil
	}
	key := u64(seq)
	ob, ev := tx.Bucket(bucketOutbox), tx.Bucket(bucketEvents)
	ov, v := ob.Get(key), ev.Get(key)
	if ov == nil || v == nil {
		return false, nil
	}
	var e edged.Event
	if err := json.Unmarshal(v, &e); err != nil {
		return false, internalErr("decode outbox.dropped", err)
	}
	var old edged.OutboxDroppedData
	if err := json.Unmarshal(e.Data, &old); err != nil {
		return false, internalErr("decode outbox.dropped", err)
	}
	old.Count += d.Count
	old.FirstSeq = min(old.FirstSeq, d.FirstSeq)
	old.LastSeq = max(old.LastSeq, d.LastSeq)
	data, err := json.Marshal(old)
	if err != nil {
		return false, internalErr("encode outbox.dropped", err)
	}
	e.Data = data
	nv, err := json.Marshal(e)
	if err != nil {
		return false, internalErr("encode outbox.dropped", err)
	}
	if err := ev.Put(key, nv); err != nil {
		return false, err
	}
	en := decodeEntry(ov)
	st.Bytes += int64(len(nv)) - en.size
	en.size = int64(len(nv))
	return true, ob.Put(key, encodeEntry(en))
}

// warnOverQuota logs, at most once a minute, that only events that are
// never dropped remain and they exceed the quota.
func (db *DB) warnOverQuota(bytes int64) {
	now := time.Now()
	db.warnMu.Lock()
	defer db.warnMu.Unlock()
	if now.Sub(db.lastOverWarn) < time.Minute {
		return
	}
	db.lastOverWarn = now
	db.logger.Warn("outbox over quota with nothing left to drop: rental, command and in-flight events are kept",
		"bytes", bytes, "quota_bytes", db.opts.OutboxMaxBytes)
}
