package store

import (
	"cmp"
	"context"
	"encoding/json"
	"slices"
	"sort"

	"github.com/stationedge/edged"
	bolt "go.etcd.io/bbolt"
)

// Rental returns a rental by id. Errors: ENOTFOUND, EUNAVAILABLE.
func (db *DB) Rental(ctx context.Context, id string) (edged.Rental, error) {
	var r edged.Rental
	err := db.get(ctx, bucketRentals, id, "rental", &r)
	return r, err
}

// Command returns a renter command's record. Errors: ENOTFOUND, EUNAVAILABLE.
func (db *DB) Command(ctx context.Context, cmdID string) (edged.CommandRecord, error) {
	var r edged.CommandRecord
	err := db.get(ctx, bucketCommands, cmdID, "command", &r)
	return r, err
}

// Result returns a rental message's result record by its edged.ResultKey.
// Errors: ENOTFOUND, EUNAVAILABLE.
func (db *DB) Result(ctx context.Context, key string) (edged.ResultRecord, error) {
	var r edged.ResultRecord
	err := db.get(ctx, bucketResults, key, "result", &r)
	return r, err
}

// Stops returns every stop record, ordered by device id. Errors:
// EUNAVAILABLE.
func (db *DB) Stops(ctx context.Context) ([]edged.StopRecord, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	var out []edged.StopRecord
	err := db.bolt.View(func(tx *bolt.Tx) error {
		out = out[:0]
		return tx.Bucket(bucketStops).ForEach(func(_, v []byte) error {
			var r edged.StopRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return internalErr("decode stop record", err)
			}
			out = append(out, r)
			return nil
		})
	})
	if err != nil {
		return nil, storeErr("read stops", err)
	}
	return out, nil
}

func (db *DB) get(ctx context.Context, bucket []byte, id, what string, dst any) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	err := db.bolt.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucket).Get([]byte(id))
		if v == nil {
			return &edged.Error{Code: edged.ENOTFOUND, Message: what + " " + id + " not found"}
		}
		if err := json.Unmarshal(v, dst); err != nil {
			return internalErr("decode "+what, err)
		}
		return nil
	})
	return storeErr("read "+what, err)
}

// Rentals returns the rentals in the given states (all when none are given),
// newest grant first, at most limit (0: no limit). Rentals are few (ended
// ones leave after Retention), so it scans them. Errors: EUNAVAILABLE.
func (db *DB) Rentals(ctx context.Context, limit int, states ...edged.RentalState) ([]edged.Rental, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	var out []edged.Rental
	err := db.bolt.View(func(tx *bolt.Tx) error {
		out = out[:0]
		return tx.Bucket(bucketRentals).ForEach(func(_, v []byte) error {
			var r edged.Rental
			if err := json.Unmarshal(v, &r); err != nil {
				return internalErr("decode rental", err)
			}
			if len(states) == 0 || slices.Contains(states, r.State) {
				out = append(out, r)
			}
			return nil
		})
	})
	if err != nil {
		return nil, storeErr("read rentals", err)
	}
	slices.SortFunc(out, func(a, b edged.Rental) int {
		if c := b.GrantedAt.Compare(a.GrantedAt); c != 0 {
			return c
		}
		return cmp.Compare(b.ID, a.ID)
	})
	if limit > 0 && len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}

// recordBatch bounds the records one retention transaction deletes.
const recordBatch = 1000

// pruneRecords deletes ended and rejected rentals, done command records and
// result records older than Retention, a bounded number per transaction.
func (db *DB) pruneRecords() error {
	cutoff := db.opts.Now().Add(-db.opts.Retention)
	rentalOld := func(v []byte) bool {
		var r edged.Rental
		if json.Unmarshal(v, &r) != nil {
			return false
		}
		if r.State != edged.RentalEnded && r.State != edged.RentalRejected {
			return false
		}
		at := r.EndedAt
		if at.IsZero() {
			at = r.GrantedAt
		}
		return at.Before(cutoff)
	}
	commandOld := func(v []byte) bool {
		var r edged.CommandRecord
		if json.Unmarshal(v, &r) != nil {
			return false
		}
		return r.Done && r.At.Before(cutoff)
	}
	resultOld := func(v []byte) bool {
		var r edged.ResultRecord
		if json.Unmarshal(v, &r) != nil {
			return false
		}
		return r.At.Before(cutoff)
	}
	if err := db.pruneBucket(bucketRentals, rentalOld); err != nil {
		return err
	}
	if err := db.pruneBucket(bucketResults, resultOld); err != nil {
		return err
	}
	return db.pruneBucket(bucketCommands, commandOld)
}

func (db *DB) pruneBucket(bucket []byte, old func(v []byte) bool) error {
	for range 100 {
		// Find the candidates in a read transaction, so that a pass with
		// nothing to prune writes nothing.
		var keys [][]byte
		err := db.bolt.View(func(tx *bolt.Tx) error {
			keys = keys[:0]
			c := tx.Bucket(bucket).Cursor()
			for k, v := c.First(); k != nil && len(keys) < recordBatch; k, v = c.Next() {
				if old(v) {
					keys = append(keys, append([]byte(nil), k...))
				}
			}
			return nil
		})
		if err != nil {
			return storeErr("read "+string(bucket), err)
		}
		if len(keys) == 0 {
			return nil
		}
		err = db.update("prune "+string(bucket), txRetention, func(tx *bolt.Tx) error {
			b := tx.Bucket(bucket)
			for _, k := range keys {
				// A commit may have revived the record since.
				if v := b.Get(k); v == nil || !old(v) {
					continue
				}
				if err := b.Delete(k); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if len(keys) < recordBatch {
			return nil
		}
	}
	return nil
}

// SaveDeviceState records the latest state of a device in memory; the
// background loop writes it within FlushInterval, and Close writes it.
func (db *DB) SaveDeviceState(s edged.DeviceState) {
	c := s.Clone()
	db.devMu.Lock()
	db.devVer++
	db.devBuf[s.DeviceID] = bufferedState{state: c, ver: db.devVer}
	db.devMu.Unlock()
}

// SaveDeviceStateNow writes the latest state of a device durably before it
// returns. When a state with a higher Version was saved meanwhile, that one
// is written instead: it is newer and includes s's change. Errors:
// EUNAVAILABLE.
func (db *DB) SaveDeviceStateNow(ctx context.Context, s edged.DeviceState) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	db.devMu.Lock()
	if cur, ok := db.devBuf[s.DeviceID]; !ok || cur.state.Version <= s.Version {
		db.devVer++
		db.devBuf[s.DeviceID] = bufferedState{state: s.Clone(), ver: db.devVer}
	}
	db.devMu.Unlock()
	// The transaction writes whatever the buffer holds for the device
	// then: s or a newer state. When the buffer holds nothing, a commit
	// that took it has written it, durably, since.
	return db.update("save device state", txDeviceNow, func(tx *bolt.Tx) error {
		return db.writeDevices(tx, []string{s.DeviceID})
	})
}

// writeDevices writes the buffered states of ids (those still buffered) in
// tx, and forgets each once tx commits unless it was saved again
// meanwhile. Copying inside the transaction puts the states in the file in
// transaction order, so an older copy never overwrites a newer one.
func (db *DB) writeDevices(tx *bolt.Tx, ids []string) error {
	taken := make([]bufferedState, 0, len(ids))
	db.devMu.Lock()
	for _, id := range ids {
		if b, ok := db.devBuf[id]; ok {
			taken = append(taken, b)
		}
	}
	db.devMu.Unlock()
	if len(taken) == 0 {
		return nil
	}
	b := tx.Bucket(bucketDevices)
	for _, t := range taken {
		v, err := json.Marshal(t.state)
		if err != nil {
			return internalErr("encode device state", err)
		}
		if err := b.Put([]byte(t.state.DeviceID), v); err != nil {
			return err
		}
	}
	tx.OnCommit(func() {
		db.writes.deviceStates.Add(uint64(len(taken)))
		db.devMu.Lock()
		defer db.devMu.Unlock()
		for _, t := range taken {
			if cur, ok := db.devBuf[t.state.DeviceID]; ok && cur.ver == t.ver {
				delete(db.devBuf, t.state.DeviceID)
			}
		}
	})
	return nil
}

// rideDevices writes up to limit buffered device states in the write
// transaction of a commit, once per transaction, so a busy station pays one
// fsync for its events and its states; the periodic flush is left the idle
// times.
func (db *DB) rideDevices(tx *bolt.Tx, limit int) error {
	if db.devTx == tx {
		return nil
	}
	db.devTx = tx
	db.devMu.Lock()
	ids := make([]string, 0, min(len(db.devBuf), limit))
	for id := range db.devBuf {
		if len(ids) == limit {
			break
		}
		ids = append(ids, id)
	}
	db.devMu.Unlock()
	sort.Strings(ids) // in key order, bbolt touches each page once
	return db.writeDevices(tx, ids)
}

// DeviceStates returns the last saved state of every device, the buffered
// ones included, ordered by device id. Errors: EUNAVAILABLE.
func (db *DB) DeviceStates(ctx context.Context) ([]edged.DeviceState, error) {
	if err := ctxErr(ctx); err != nil {
		return nil, err
	}
	// Copy the buffer before reading the file: a buffered state is never
	// older than the saved one, and a flush racing with this call moves an
	// entry from the buffer to the file, so it is seen in one or the other.
	db.devMu.Lock()
	buffered := make([]edged.DeviceState, 0, len(db.devBuf))
	for _, b := range db.devBuf {
		buffered = append(buffered, b.state.Clone())
	}
	db.devMu.Unlock()
	byID := make(map[string]edged.DeviceState)
	err := db.bolt.View(func(tx *bolt.Tx) error {
		clear(byID)
		return tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			var s edged.DeviceState
			if err := json.Unmarshal(v, &s); err != nil {
				return internalErr("decode device state", err)
			}
			byID[string(k)] = s
			return nil
		})
	})
	if err != nil {
		return nil, storeErr("read device states", err)
	}
	for _, s := range buffered {
		byID[s.DeviceID] = s
	}
	out := make([]edged.DeviceState, 0, len(byID))
	for _, s := range byID {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b edged.DeviceState) int { return cmp.Compare(a.DeviceID, b.DeviceID) })
	return out, nil
}

// flushDevices writes the buffered device states, a few hundred per
// transaction: one big transaction would hold bbolt's only writer for long
// enough to stall the rentals' commits. States saved again meanwhile stay
// buffered for the next flush.
func (db *DB) flushDevices() error {
	db.devMu.Lock()
	ids := make([]string, 0, len(db.devBuf))
	for id := range db.devBuf {
		ids = append(ids, id)
	}
	db.devMu.Unlock()
	sort.Strings(ids) // in key order, bbolt touches each page once
	for len(ids) > 0 {
		n := min(len(ids), flushChunk)
		chunk := ids[:n]
		ids = ids[n:]
		db.devMu.Lock()
		buffered := slices.ContainsFunc(chunk, func(id string) bool { _, ok := db.devBuf[id]; return ok })
		db.devMu.Unlock()
		if !buffered { // a commit took them all meanwhile
			continue
		}
		err := db.update("flush device states", txDeviceFlush, func(tx *bolt.Tx) error {
			return db.writeDevices(tx, chunk)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// flushChunk is how many device states one flush transaction, or one
// commit of device events, writes; rideRental is how many a commit of the
// station's own records carries. A grant waits for the transaction in
// flight and then its own: 256 states took 27 ms, a grant's commit
// alone 1 ms.
const (
	flushChunk = 64
	rideRental = 8
)
