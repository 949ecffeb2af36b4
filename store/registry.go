package store

import (
	"context"
	"encoding/json"

	bolt "go.etcd.io/bbolt"

	"github.com/stationedge/edged"
)

// The applied device registry (§3.6) lives in a bucket of its own, created
// with the first registry: a store written before registries existed
// opens unchanged.
var (
	bucketRegistry = []byte("registry")
	keyApplied     = []byte("applied")
	keyRetiring    = []byte("retiring")
)

// Registry returns the applied registry; ok is false when none was ever
// applied.
func (db *DB) Registry(ctx context.Context) (edged.AppliedRegistry, bool, error) {
	var r edged.AppliedRegistry
	var ok bool
	err := db.bolt.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRegistry)
		if b == nil {
			return nil
		}
		v := b.Get(keyApplied)
		if v == nil {
			return nil
		}
		ok = true
		return json.Unmarshal(v, &r)
	})
	if err != nil {
		return r, false, edged.Errorf(edged.EINTERNAL, "read registry: %v", err)
	}
	return r, ok, nil
}

// SaveRegistry makes r the applied registry, durably (fsync) before it
// returns. Errors: EUNAVAILABLE when the store cannot write.
func (db *DB) SaveRegistry(ctx context.Context, r edged.AppliedRegistry) error {
	v, err := json.Marshal(r)
	if err != nil {
		return edged.Errorf(edged.EINVALID, "encode registry: %v", err)
	}
	err = db.bolt.Update(db.counted(txRegistry, func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketRegistry)
		if err != nil {
			return err
		}
		return b.Put(keyApplied, v)
	}))
	if err != nil {
		return &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonUnavailable, Message: "save registry", Err: err}
	}
	return nil
}

// Retiring returns the removed devices kept while their rentals end, as
// SaveRetiring last wrote them.
func (db *DB) Retiring(ctx context.Context) ([]edged.Device, error) {
	var devs []edged.Device
	err := db.bolt.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRegistry)
		if b == nil {
			return nil
		}
		if v := b.Get(keyRetiring); v != nil {
			return json.Unmarshal(v, &devs)
		}
		return nil
	})
	if err != nil {
		return nil, edged.Errorf(edged.EINTERNAL, "read retiring devices: %v", err)
	}
	return devs, nil
}

// SaveRetiring keeps the entries of removed devices whose rentals still
// run, durably, so a restart resumes those rentals. Errors: EUNAVAILABLE.
func (db *DB) SaveRetiring(ctx context.Context, devs []edged.Device) error {
	v, err := json.Marshal(devs)
	if err != nil {
		return edged.Errorf(edged.EINVALID, "encode retiring devices: %v", err)
	}
	err = db.bolt.Update(db.counted(txRegistry, func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketRegistry)
		if err != nil {
			return err
		}
		return b.Put(keyRetiring, v)
	}))
	if err != nil {
		return &edged.Error{Code: edged.EUNAVAILABLE, Reason: edged.ReasonUnavailable, Message: "save retiring devices", Err: err}
	}
	return nil
}

var _ edged.RegistryStore = (*DB)(nil)
