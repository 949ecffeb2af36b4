package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
	bolt "go.etcd.io/bbolt"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func openTest(t testing.TB, path string, opts Options) *DB {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "edged.db")
	}
	db, err := Open(path, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func event(typ edged.EventType, data string) edged.Event {
	return edged.Event{Station: "st-1", Type: typ, TS: t0, ClockSynced: true, Data: json.RawMessage(data)}
}

func deviceEvent(i int) edged.Event {
	return event(edged.EventDeviceEvent, fmt.Sprintf(`{"device_id":"chair-001","event":{"type":"tick","n":%d}}`, i))
}

func rentalEvent(id string) edged.Event {
	return event(edged.EventRentalResult, fmt.Sprintf(`{"rental_id":%q,"device_id":"chair-001","ok":true}`, id))
}

func commit(t testing.TB, db *DB, c edged.Change) []edged.Event {
	t.Helper()
	evs, err := db.Commit(context.Background(), c)
	if err != nil {
		t.Fatalf("Commit: %v", err)
	}
	return evs
}

// writes counts the writes to the file so far.
func writes(db *DB) int64 {
	st := db.bolt.Stats()
	return st.TxStats.GetWrite()
}

func seqs(evs []edged.Event) []uint64 {
	out := make([]uint64, len(evs))
	for i, e := range evs {
		out[i] = e.Seq
	}
	return out
}

func span(from, to uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

func TestSeqGapFreeConcurrentAndAcrossRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	const workers, per = 50, 200
	var mu sync.Mutex
	var got []uint64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				evs, err := db.Commit(context.Background(), edged.Change{Events: []edged.Event{deviceEvent(w*per + i)}})
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				got = append(got, seqs(evs)...)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Commit: %v", err)
	}
	slices.Sort(got)
	if diff := cmp.Diff(span(1, workers*per), got); diff != "" {
		t.Fatalf("seqs (-want +got):\n%s", diff)
	}
	if got := db.OutboxStats(t0).LastSeq; got != workers*per {
		t.Errorf("LastSeq = %d, want %d", got, workers*per)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db = openTest(t, path, Options{})
	evs := commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(0), rentalEvent("r1")}})
	if diff := cmp.Diff([]uint64{workers*per + 1, workers*per + 2}, seqs(evs)); diff != "" {
		t.Errorf("seqs after reopen (-want +got):\n%s", diff)
	}
	var logged []uint64
	for i := 0; i < 10; i++ {
		page, err := db.Events(context.Background(), uint64(len(logged)), 3000)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		logged = append(logged, seqs(page)...)
	}
	if diff := cmp.Diff(span(1, workers*per+2), logged); diff != "" {
		t.Errorf("logged seqs (-want +got):\n%s", diff)
	}
}

func TestCommitStoresEverythingTogether(t *testing.T) {
	db := openTest(t, "", Options{})
	ctx := context.Background()
	rental := edged.Rental{ID: "r-1", DeviceID: "chair-001", RenterID: "u-1", State: edged.RentalActive,
		Duration: 30 * time.Minute, GrantedAt: t0, StartedAt: t0, EndsAt: t0.Add(30 * time.Minute)}
	cmd := edged.CommandRecord{CmdID: "c-1", DeviceID: "chair-001", RenterID: "u-1", Action: "pause", Done: true, OK: true, At: t0}
	in := []edged.Event{rentalEvent("r-1"), event(edged.EventRentalStarted, `{"rental_id":"r-1"}`), event(edged.EventUnrentedUse, "")}
	evs := commit(t, db, edged.Change{Rentals: []edged.Rental{rental}, Commands: []edged.CommandRecord{cmd}, Events: in})

	want := slices.Clone(in)
	for i := range want {
		want[i].Seq = uint64(i + 1)
	}
	want[2].Data = json.RawMessage(`{}`)
	if diff := cmp.Diff(want, evs); diff != "" {
		t.Errorf("returned events (-want +got):\n%s", diff)
	}
	logged, err := db.Events(ctx, 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, logged); diff != "" {
		t.Errorf("logged events (-want +got):\n%s", diff)
	}
	gotR, err := db.Rental(ctx, "r-1")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(rental, gotR); diff != "" {
		t.Errorf("rental (-want +got):\n%s", diff)
	}
	gotC, err := db.Command(ctx, "c-1")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(cmd, gotC); diff != "" {
		t.Errorf("command (-want +got):\n%s", diff)
	}

	// The envelope on disk is exactly §3.3's.
	var raw map[string]any
	if err := db.bolt.View(func(tx *bolt.Tx) error {
		return json.Unmarshal(tx.Bucket(bucketEvents).Get(u64(1)), &raw)
	}); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for k := range raw {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if diff := cmp.Diff([]string{"clock_synced", "data", "seq", "station", "ts", "type"}, keys); diff != "" {
		t.Errorf("envelope keys (-want +got):\n%s", diff)
	}
}

func TestCommitRejectsInvalidChangeWholly(t *testing.T) {
	db := openTest(t, "", Options{})
	ctx := context.Background()
	tests := []struct {
		name string
		c    edged.Change
	}{
		{"rental without id", edged.Change{Rentals: []edged.Rental{{}}, Events: []edged.Event{rentalEvent("x")}}},
		{"command without id", edged.Change{Commands: []edged.CommandRecord{{}}}},
		{"event data not JSON", edged.Change{Rentals: []edged.Rental{{ID: "r-bad"}}, Events: []edged.Event{event(edged.EventDeviceEvent, "{")}}},
		{"event without type", edged.Change{Events: []edged.Event{{}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := db.Commit(ctx, tt.c)
			if got := edged.ErrorCode(err); got != edged.EINVALID {
				t.Fatalf("Commit error = %v (code %q), want %q", err, got, edged.EINVALID)
			}
		})
	}
	if _, err := db.Rental(ctx, "r-bad"); edged.ErrorCode(err) != edged.ENOTFOUND {
		t.Errorf("rental of a refused commit: err = %v, want not found", err)
	}
	if got := db.OutboxStats(t0).LastSeq; got != 0 {
		t.Errorf("LastSeq = %d after refused commits, want 0", got)
	}
}

func TestNotFound(t *testing.T) {
	db := openTest(t, "", Options{})
	ctx := context.Background()
	_, err := db.Rental(ctx, "nope")
	if got := edged.ErrorCode(err); got != edged.ENOTFOUND {
		t.Errorf("Rental: code %q (%v), want %q", got, err, edged.ENOTFOUND)
	}
	_, err = db.Command(ctx, "nope")
	if got := edged.ErrorCode(err); got != edged.ENOTFOUND {
		t.Errorf("Command: code %q (%v), want %q", got, err, edged.ENOTFOUND)
	}
}

func TestRentalsNewestGrantFirst(t *testing.T) {
	db := openTest(t, "", Options{})
	ctx := context.Background()
	var rs []edged.Rental
	states := []edged.RentalState{edged.RentalEnded, edged.RentalActive, edged.RentalRejected, edged.RentalStarting, edged.RentalActive}
	for i, st := range states {
		rs = append(rs, edged.Rental{ID: fmt.Sprintf("r-%d", i), State: st, GrantedAt: t0.Add(time.Duration(i) * time.Minute)})
	}
	commit(t, db, edged.Change{Rentals: rs})
	ids := func(rs []edged.Rental) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.ID)
		}
		return out
	}
	tests := []struct {
		limit  int
		states []edged.RentalState
		want   []string
	}{
		{0, nil, []string{"r-4", "r-3", "r-2", "r-1", "r-0"}},
		{2, nil, []string{"r-4", "r-3"}},
		{0, []edged.RentalState{edged.RentalActive}, []string{"r-4", "r-1"}},
		{0, []edged.RentalState{edged.RentalActive, edged.RentalStarting}, []string{"r-4", "r-3", "r-1"}},
		{1, []edged.RentalState{edged.RentalEnded}, []string{"r-0"}},
	}
	for _, tt := range tests {
		got, err := db.Rentals(ctx, tt.limit, tt.states...)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(tt.want, ids(got)); diff != "" {
			t.Errorf("Rentals(%d, %v) (-want +got):\n%s", tt.limit, tt.states, diff)
		}
	}
}

func TestPendingAckOrder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{})
	ctx := context.Background()
	var in []edged.Event
	for i := range 10 {
		in = append(in, deviceEvent(i))
	}
	commit(t, db, edged.Change{Events: in[:4]})
	commit(t, db, edged.Change{Events: in[4:]})

	pending := func(db *DB, after uint64, limit int) []uint64 {
		t.Helper()
		evs, err := db.Pending(ctx, after, limit)
		if err != nil {
			t.Fatal(err)
		}
		return seqs(evs)
	}
	if diff := cmp.Diff(span(1, 3), pending(db, 0, 3)); diff != "" {
		t.Errorf("Pending(0, 3) (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(span(4, 10), pending(db, 3, 100)); diff != "" {
		t.Errorf("Pending(3, 100) (-want +got):\n%s", diff)
	}
	if err := db.Ack(ctx, 1, 2, 5, 999); err != nil {
		t.Fatal(err)
	}
	want := []uint64{3, 4, 6, 7, 8, 9, 10}
	if diff := cmp.Diff(want, pending(db, 0, 0)); diff != "" {
		t.Errorf("Pending after Ack (-want +got):\n%s", diff)
	}
	st := db.OutboxStats(t0.Add(90 * time.Second))
	if st.Events != 7 || st.OldestAgeS != 90 || !st.Oldest.Equal(t0) || st.LastSeq != 10 {
		t.Errorf("OutboxStats = %+v, want 7 events, oldest %v aged 90s, last seq 10", st, t0)
	}
	logged, err := db.Events(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(span(1, 10), seqs(logged)); diff != "" {
		t.Errorf("the log keeps acked events (-want +got):\n%s", diff)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openTest(t, path, Options{})
	if diff := cmp.Diff(want, pending(db, 0, 0)); diff != "" {
		t.Errorf("Pending after reopen (-want +got):\n%s", diff)
	}
	if got, want := db.OutboxStats(t0), st; got.Events != want.Events || got.Bytes != want.Bytes {
		t.Errorf("OutboxStats after reopen = %+v, want %+v", got, want)
	}
	if err := db.Ack(ctx, want...); err != nil {
		t.Fatal(err)
	}
	if got := db.OutboxStats(t0); got.Events != 0 || got.Bytes != 0 || !got.Oldest.IsZero() {
		t.Errorf("OutboxStats after acking all = %+v, want empty", got)
	}
}

func TestNotify(t *testing.T) {
	db := openTest(t, "", Options{})
	commit(t, db, edged.Change{Rentals: []edged.Rental{{ID: "r-1"}}})
	select {
	case <-db.Notify():
		t.Fatal("notified after a commit without events")
	default:
	}
	commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(1)}})
	commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(2)}})
	select {
	case <-db.Notify():
	default:
		t.Fatal("no notification after a commit of events")
	}
}

func TestLogRetention(t *testing.T) {
	db := openTest(t, "", Options{LogRetain: 10})
	ctx := context.Background()
	for i := range 100 {
		commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(i)}})
	}
	var acked []uint64
	for s := uint64(1); s <= 100; s++ {
		if s != 5 {
			acked = append(acked, s)
		}
	}
	if err := db.Ack(ctx, acked...); err != nil {
		t.Fatal(err)
	}
	logged := func() []uint64 {
		t.Helper()
		evs, err := db.Events(ctx, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		return seqs(evs)
	}
	// Acking prunes at once; seq 5 is undelivered, so it stays.
	want := append([]uint64{5}, span(91, 100)...)
	if diff := cmp.Diff(want, logged()); diff != "" {
		t.Errorf("log after Ack (-want +got):\n%s", diff)
	}
	// Undelivered events are never pruned, however old.
	for i := range 20 {
		commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(i)}})
	}
	if err := db.pruneLog(); err != nil {
		t.Fatal(err)
	}
	want = append([]uint64{5}, span(101, 120)...)
	if diff := cmp.Diff(want, logged()); diff != "" {
		t.Errorf("log after commits and prune (-want +got):\n%s", diff)
	}
	if err := db.Ack(ctx, 5); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(span(101, 120), logged()); diff != "" {
		t.Errorf("log after acking the old event (-want +got):\n%s", diff)
	}
	// Nothing left to prune: no write.
	before := writes(db)
	if err := db.pruneLog(); err != nil {
		t.Fatal(err)
	}
	if got := writes(db); got != before {
		t.Errorf("idle prune wrote %d times, want none", got-before)
	}
}

func TestLogRetentionBoundedPerTransaction(t *testing.T) {
	db := openTest(t, "", Options{LogRetain: 1})
	ctx := context.Background()
	const n = 3*pruneBatch + 7
	var all []edged.Event
	for i := range n {
		all = append(all, deviceEvent(i))
	}
	commit(t, db, edged.Change{Events: all})
	if err := db.Ack(ctx, span(1, n)...); err != nil {
		t.Fatal(err)
	}
	evs, err := db.Events(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := len(evs), n-pruneBatch; got != want {
		t.Errorf("after one Ack the log holds %d events, want %d (one bounded prune)", got, want)
	}
	if err := db.pruneLog(); err != nil {
		t.Fatal(err)
	}
	evs, err = db.Events(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]uint64{n}, seqs(evs)); diff != "" {
		t.Errorf("log after background prune (-want +got):\n%s", diff)
	}
}

// account checks that every seq up to the last one is either queued or
// counted by an outbox.dropped event, and that only droppable events were
// dropped. It returns the queued outbox.dropped events.
func account(t *testing.T, db *DB, types map[uint64]edged.EventType) []edged.OutboxDroppedData {
	t.Helper()
	queued, err := db.Pending(context.Background(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	last := db.OutboxStats(t0).LastSeq
	present := make(map[uint64]bool)
	var drops []edged.OutboxDroppedData
	var counted uint64
	for _, e := range queued {
		present[e.Seq] = true
		if e.Type == edged.EventOutboxDropped {
			var d edged.OutboxDroppedData
			if err := json.Unmarshal(e.Data, &d); err != nil {
				t.Fatal(err)
			}
			drops = append(drops, d)
			counted += d.Count
			// An extended outbox.dropped may cover seqs after its own.
			if d.FirstSeq > d.LastSeq || d.Count > d.LastSeq-d.FirstSeq+1 {
				t.Errorf("outbox.dropped %d has range %d..%d", e.Seq, d.FirstSeq, d.LastSeq)
			}
		}
	}
	var missing uint64
	for s := uint64(1); s <= last; s++ {
		if present[s] {
			continue
		}
		missing++
		if typ, ok := types[s]; ok && !typ.Droppable() {
			t.Errorf("seq %d (%s) was dropped", s, typ)
		}
		in := false
		for _, d := range drops {
			in = in || (s >= d.FirstSeq && s <= d.LastSeq)
		}
		if !in {
			t.Errorf("seq %d is missing and in no outbox.dropped range", s)
		}
	}
	if counted != missing {
		t.Errorf("outbox.dropped events count %d, but %d seqs are missing", counted, missing)
	}
	if got := db.OutboxStats(t0).Dropped; got != missing {
		t.Errorf("OutboxStats.Dropped = %d, want %d", got, missing)
	}
	return drops
}

func TestQuota(t *testing.T) {
	tests := []struct {
		name string
		// every gives the type of the i-th event committed.
		every      func(i int) edged.EventType
		n          int
		wantDrops  int // outbox.dropped events; -1: at least one, at most maxDrops
		maxDrops   int
		overQuota  bool
		wantDroped bool
	}{
		{"flood of device events gives one outbox.dropped",
			func(int) edged.EventType { return edged.EventDeviceEvent }, 1000, 1, 0, false, true},
		{"rental events among the flood are kept",
			func(i int) edged.EventType {
				if i%200 == 0 {
					return edged.EventRentalResult
				}
				return edged.EventDeviceOnline
			}, 1000, -1, 5, false, true},
		{"only rental and command events: over quota, nothing dropped",
			func(i int) edged.EventType {
				if i%2 == 0 {
					return edged.EventRentalResult
				}
				return edged.EventCommandResult
			}, 200, 0, 0, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const quota = 8 << 10
			db := openTest(t, "", Options{OutboxMaxBytes: quota})
			types := make(map[uint64]edged.EventType)
			for i := range tt.n {
				e := event(tt.every(i), fmt.Sprintf(`{"device_id":"chair-001","n":%d}`, i))
				evs := commit(t, db, edged.Change{Events: []edged.Event{e}})
				types[evs[0].Seq] = e.Type
				if st := db.OutboxStats(t0); !tt.overQuota && st.Bytes > quota {
					t.Fatalf("after commit %d the outbox holds %d bytes, over the quota %d", i, st.Bytes, quota)
				}
			}
			drops := account(t, db, types)
			switch {
			case tt.wantDrops >= 0 && len(drops) != tt.wantDrops:
				t.Errorf("%d outbox.dropped events, want %d: %+v", len(drops), tt.wantDrops, drops)
			case tt.wantDrops < 0 && (len(drops) == 0 || len(drops) > tt.maxDrops):
				t.Errorf("%d outbox.dropped events, want 1..%d", len(drops), tt.maxDrops)
			}
			st := db.OutboxStats(t0)
			if got := st.Bytes > quota; got != tt.overQuota {
				t.Errorf("outbox bytes %d over quota %d: %v, want %v", st.Bytes, quota, got, tt.overQuota)
			}
			if got := st.Dropped > 0; got != tt.wantDroped {
				t.Errorf("dropped %d, want some: %v", st.Dropped, tt.wantDroped)
			}
		})
	}
}

func TestQuotaNeverRewritesHandedOutEvents(t *testing.T) {
	const quota = 4 << 10
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{OutboxMaxBytes: quota})
	ctx := context.Background()
	types := make(map[uint64]edged.EventType)
	flood := func(db *DB, n int) {
		for i := range n {
			evs := commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(i)}})
			types[evs[0].Seq] = edged.EventDeviceEvent
		}
	}
	flood(db, 200)
	handed, err := db.Pending(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	flood(db, 200)
	if drops := account(t, db, types); len(drops) != 2 {
		t.Errorf("%d outbox.dropped events, want 2 (the first was handed out)", len(drops))
	}
	now, err := db.Pending(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range handed {
		if i := slices.IndexFunc(now, func(e edged.Event) bool { return e.Seq == h.Seq }); i >= 0 {
			if diff := cmp.Diff(h, now[i]); diff != "" {
				t.Errorf("event %d changed after Pending returned it (-then +now):\n%s", h.Seq, diff)
			}
		}
	}

	// After a restart, a queued outbox.dropped may have been published by
	// the process before: it is not extended either.
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openTest(t, path, Options{OutboxMaxBytes: quota})
	flood(db, 200)
	if drops := account(t, db, types); len(drops) != 3 {
		t.Errorf("%d outbox.dropped events after restart, want 3", len(drops))
	}
	if got, want := db.OutboxStats(t0).Dropped, uint64(len(types))-uint64(db.OutboxStats(t0).Events-3); got != want {
		t.Errorf("Dropped after restart = %d, want %d", got, want)
	}
}

func TestBatchFunctionRunsTwice(t *testing.T) {
	db := openTest(t, "", Options{OutboxMaxBytes: 2 << 10})
	// Fill the outbox to the quota first, so the retried batch also drops.
	for i := range 15 {
		commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(i)}})
	}
	base := db.OutboxStats(t0).LastSeq
	db.bolt.MaxBatchDelay = 200 * time.Millisecond
	db.testAlwaysBatch = true // rental changes take bbolt.Update otherwise
	var runs atomic.Int64
	db.testHookCommit = func() { runs.Add(1) }

	const committers = 8
	var wg sync.WaitGroup
	got := make([][]edged.Event, committers)
	for i := range committers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			evs, err := db.Commit(context.Background(), edged.Change{
				Rentals: []edged.Rental{{ID: fmt.Sprintf("r-%d", i)}},
				Events:  []edged.Event{deviceEvent(100 + i), rentalEvent(fmt.Sprintf("r-%d", i))}})
			if err != nil {
				t.Error(err)
			}
			got[i] = evs
		}()
	}
	// Join the same batch and fail once: bbolt rolls the batch back and
	// runs every other function again.
	time.Sleep(50 * time.Millisecond)
	var failed atomic.Bool
	err := db.bolt.Batch(func(*bolt.Tx) error {
		if failed.CompareAndSwap(false, true) {
			return errors.New("fail once")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if runs.Load() <= committers {
		t.Fatalf("commit functions ran %d times for %d commits: the batch was not retried", runs.Load(), committers)
	}
	// The seqs of this batch are the committed events and the
	// outbox.dropped events the quota added, without gaps.
	var all []uint64
	for _, evs := range got {
		all = append(all, seqs(evs)...)
	}
	queued, err := db.Pending(context.Background(), base, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range queued {
		if e.Type == edged.EventOutboxDropped {
			all = append(all, e.Seq)
		}
	}
	slices.Sort(all)
	if diff := cmp.Diff(span(base+1, db.OutboxStats(t0).LastSeq), all); diff != "" {
		t.Errorf("seqs (-want +got):\n%s", diff)

	}
	if len(all) == 2*committers {
		t.Errorf("no outbox.dropped event in the batch: the test does not exercise the quota")
	}
	// The in-memory counters match a fresh count of the outbox.
	var events, bytes int64
	var last uint64
	if err := db.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketOutbox).ForEach(func(k, v []byte) error {
			events++
			bytes += decodeEntry(v).size
			last = max(last, seqOf(k))
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	st := db.OutboxStats(t0)
	if st.Events != int(events) || st.Bytes != bytes || st.LastSeq < last {
		t.Errorf("OutboxStats = %+v; the outbox holds %d events, %d bytes, last seq %d", st, events, bytes, last)
	}
	types := map[uint64]edged.EventType{}
	for _, evs := range got {
		for _, e := range evs {
			types[e.Seq] = e.Type
		}
	}
	account(t, db, types)
}

func TestDeviceStateBufferedAndFlushed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{FlushInterval: time.Hour})
	ctx := context.Background()
	seen := t0
	state := func(id string, st edged.Status, n float64) edged.DeviceState {
		return edged.DeviceState{DeviceID: id, Kind: "chair", Transport: edged.TransportMQTT, Online: true, Status: st,
			Telemetry: map[string]any{"n": n}, LastSeen: &seen, UpdatedAt: t0}
	}
	before := writes(db)
	for i := range 1000 {
		db.SaveDeviceState(state("chair-001", edged.StatusIdle, float64(i)))
	}
	last := state("chair-001", edged.StatusInUse, 1000)
	db.SaveDeviceState(last)
	db.SaveDeviceState(state("chair-002", edged.StatusFault, 1))
	if got := writes(db); got != before {
		t.Errorf("SaveDeviceState wrote to disk %d times, want none before the flush", got-before)
	}
	last.Telemetry["n"] = -1.0 // the store keeps its own copy

	want := []edged.DeviceState{state("chair-001", edged.StatusInUse, 1000), state("chair-002", edged.StatusFault, 1)}
	got, err := db.DeviceStates(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("DeviceStates before flush (-want +got):\n%s", diff)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openTest(t, path, Options{FlushInterval: 10 * time.Millisecond})
	got, err = db.DeviceStates(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("DeviceStates after Close and reopen (-want +got):\n%s", diff)
	}

	// The background flush writes the buffer without Close.
	db.SaveDeviceState(state("chair-003", edged.StatusIdle, 3))
	saved := func() int {
		n := 0
		db.bolt.View(func(tx *bolt.Tx) error {
			n = tx.Bucket(bucketDevices).Stats().KeyN
			return nil
		})
		return n
	}
	for i := 0; i < 500 && saved() != 3; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if got := saved(); got != 3 {
		t.Errorf("%d device states on disk after the flush interval, want 3", got)
	}
}

func TestRetentionPrunesOldRecords(t *testing.T) {
	now := t0
	db := openTest(t, "", Options{Retention: 24 * time.Hour, Now: func() time.Time { return now }})
	ctx := context.Background()
	old, recent := t0.Add(-48*time.Hour), t0.Add(-time.Hour)
	commit(t, db, edged.Change{
		Rentals: []edged.Rental{
			{ID: "active-old", State: edged.RentalActive, GrantedAt: old},
			{ID: "starting-old", State: edged.RentalStarting, GrantedAt: old},
			{ID: "ended-old", State: edged.RentalEnded, GrantedAt: old, EndedAt: old},
			{ID: "ended-recent", State: edged.RentalEnded, GrantedAt: old, EndedAt: recent},
			{ID: "rejected-old", State: edged.RentalRejected, GrantedAt: old},
		},
		Commands: []edged.CommandRecord{
			{CmdID: "done-old", Done: true, At: old},
			{CmdID: "waiting-old", At: old},
			{CmdID: "done-recent", Done: true, At: recent},
		},
	})
	if err := db.pruneRecords(); err != nil {
		t.Fatal(err)
	}
	rs, err := db.Rentals(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range rs {
		ids = append(ids, r.ID)
	}
	slices.Sort(ids)
	if diff := cmp.Diff([]string{"active-old", "ended-recent", "starting-old"}, ids); diff != "" {
		t.Errorf("rentals after prune (-want +got):\n%s", diff)
	}
	for _, tt := range []struct {
		id   string
		want string
	}{{"done-old", edged.ENOTFOUND}, {"waiting-old", ""}, {"done-recent", ""}} {
		_, err := db.Command(ctx, tt.id)
		if got := edged.ErrorCode(err); got != tt.want {
			t.Errorf("Command(%q) code %q, want %q", tt.id, got, tt.want)
		}
	}
}

func TestLockedFileFailsFast(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	openTest(t, path, Options{})
	defer func(d time.Duration) { lockTimeout = d }(lockTimeout)
	lockTimeout = 100 * time.Millisecond
	start := time.Now()
	db, err := Open(path, Options{})
	if err == nil {
		db.Close()
		t.Fatal("second Open of a held file succeeded")
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("second Open took %v", time.Since(start))
	}
	if edged.ErrorCode(err) != edged.EUNAVAILABLE || !strings.Contains(err.Error(), "locked") {
		t.Errorf("second Open: %v, want an unavailable error saying the store is locked", err)
	}
}

func TestClosedStore(t *testing.T) {
	db := openTest(t, "", Options{})
	if err := db.Healthy(); err != nil {
		t.Fatalf("Healthy on a fresh store: %v", err)
	}
	db.Close()
	_, err := db.Commit(context.Background(), edged.Change{Events: []edged.Event{deviceEvent(1)}})
	if got := edged.ErrorCode(err); got != edged.EUNAVAILABLE {
		t.Errorf("Commit after Close: %v, want code %q", err, edged.EUNAVAILABLE)
	}
	if err := db.Healthy(); edged.ErrorCode(err) != edged.EUNAVAILABLE {
		t.Errorf("Healthy after Close = %v, want unavailable", err)
	}
}

// TestQuotaAccountingSeenByConsumer floods a tiny outbox while a consumer
// drains it like the uplink, keeping the first version of each seq as the
// cloud does: every seq must be received or counted as dropped.
func TestQuotaAccountingSeenByConsumer(t *testing.T) {
	db := openTest(t, "", Options{OutboxMaxBytes: 2 << 10})
	ctx := context.Background()
	const n = 600
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range n {
			e := deviceEvent(i)
			if i%97 == 0 {
				e = rentalEvent(fmt.Sprint(i))
			}
			if _, err := db.Commit(ctx, edged.Change{Events: []edged.Event{e}}); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	received := make(map[uint64]edged.Event)
	var after uint64
	drain := func() {
		evs, err := db.Pending(ctx, after, 2)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range evs {
			if _, ok := received[e.Seq]; !ok {
				received[e.Seq] = e
			}
			after = e.Seq
		}
		if err := db.Ack(ctx, seqs(evs)...); err != nil {
			t.Fatal(err)
		}
	}
	for running := true; running; {
		select {
		case <-done:
			running = false
		case <-time.After(10 * time.Millisecond):
			drain()
		}
	}
	for range 1000 {
		drain()
	}
	last := db.OutboxStats(t0).LastSeq
	var counted, missing uint64
	for _, e := range received {
		if e.Type == edged.EventOutboxDropped {
			var d edged.OutboxDroppedData
			if err := json.Unmarshal(e.Data, &d); err != nil {
				t.Fatal(err)
			}
			counted += d.Count
		}
	}
	for s := uint64(1); s <= last; s++ {
		if _, ok := received[s]; !ok {
			missing++
		}
	}
	if counted != missing {
		t.Errorf("received outbox.dropped events count %d dropped, but %d of %d seqs never arrived", counted, missing, last)
	}
	if missing == 0 {
		t.Errorf("nothing was dropped: the test does not exercise the quota")
	}
	if got := db.OutboxStats(t0).Dropped; got != missing {
		t.Errorf("OutboxStats.Dropped = %d, want %d", got, missing)
	}
}

func TestGroupable(t *testing.T) {
	cases := []struct {
		name string
		c    edged.Change
		want bool
	}{
		{"device events", edged.Change{Events: []edged.Event{deviceEvent(1), deviceEvent(2)}}, true},
		{"a rental", edged.Change{Rentals: []edged.Rental{{ID: "r"}}}, false},
		{"a command record", edged.Change{Commands: []edged.CommandRecord{{CmdID: "c"}}}, false},
		{"a rental event", edged.Change{Events: []edged.Event{rentalEvent("r")}}, false},
		{"device online", edged.Change{Events: []edged.Event{{Type: edged.EventDeviceOnline}}}, false},
	}
	for _, tc := range cases {
		if got := groupable(tc.c); got != tc.want {
			t.Errorf("%s: groupable = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// Many devices flush in several transactions, and every state survives.
func TestFlushManyDevicesInChunks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{FlushInterval: time.Hour})
	const n = 3*flushChunk + 7
	for i := range n {
		db.SaveDeviceState(edged.DeviceState{DeviceID: fmt.Sprintf("dev-%04d", i), Status: edged.StatusIdle, Telemetry: map[string]any{"i": float64(i)}})
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openTest(t, path, Options{})
	got, err := db.DeviceStates(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != n {
		t.Fatalf("%d device states after reopen, want %d", len(got), n)
	}
}

func TestResultAndStopRecords(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{})
	ctx := context.Background()
	grant := edged.ResultRecord{RentalID: "r1", Op: edged.OpGrant, DeviceID: "chair-001", OK: false, Reason: edged.ReasonCancelled, At: t0}
	ext := edged.ResultRecord{RentalID: "r1", Op: edged.OpExtend, DurationS: 900, DeviceID: "chair-001", OK: true, At: t0}
	commit(t, db, edged.Change{
		Results: []edged.ResultRecord{grant, ext},
		Stops:   []edged.StopRecord{{DeviceID: "chair-001", RentalID: "r1", Since: t0}, {DeviceID: "chair-002", Since: t0}},
		Events:  []edged.Event{rentalEvent("r1")},
	})
	commit(t, db, edged.Change{Stops: []edged.StopRecord{{DeviceID: "chair-002", Done: true}}})
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openTest(t, path, Options{})
	for _, want := range []edged.ResultRecord{grant, ext} {
		got, err := db.Result(ctx, want.Key())
		if err != nil {
			t.Fatalf("Result(%q): %v", want.Key(), err)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("result record (-want +got):\n%s", diff)
		}
	}
	// Another extend duration is another message; a grant is one message
	// whatever its duration.
	if _, err := db.Result(ctx, edged.ResultKey("r1", edged.OpExtend, 600)); edged.ErrorCode(err) != edged.ENOTFOUND {
		t.Errorf("extend to 600: %v, want not found", err)
	}
	if _, err := db.Result(ctx, edged.ResultKey("r1", edged.OpGrant, 60)); err != nil {
		t.Errorf("grant with another duration: %v, want the grant's record", err)
	}
	stops, err := db.Stops(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]edged.StopRecord{{DeviceID: "chair-001", RentalID: "r1", Since: t0}}, stops); diff != "" {
		t.Errorf("stops after a done record and a reopen (-want +got):\n%s", diff)
	}
}

func TestRetentionPrunesOldResults(t *testing.T) {
	db := openTest(t, "", Options{Retention: 24 * time.Hour, Now: func() time.Time { return t0 }})
	ctx := context.Background()
	old := edged.ResultRecord{RentalID: "old", Op: edged.OpCancel, At: t0.Add(-48 * time.Hour)}
	recent := edged.ResultRecord{RentalID: "recent", Op: edged.OpCancel, At: t0.Add(-time.Hour)}
	commit(t, db, edged.Change{Results: []edged.ResultRecord{old, recent}, Stops: []edged.StopRecord{{DeviceID: "d", Since: t0.Add(-48 * time.Hour)}}})
	if err := db.pruneRecords(); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Result(ctx, old.Key()); edged.ErrorCode(err) != edged.ENOTFOUND {
		t.Errorf("old result: %v, want pruned", err)
	}
	if _, err := db.Result(ctx, recent.Key()); err != nil {
		t.Errorf("recent result: %v", err)
	}
	if stops, _ := db.Stops(ctx); len(stops) != 1 {
		t.Errorf("stops = %v: a stop is never pruned", stops)
	}
}

func TestSaveDeviceStateNowIsDurable(t *testing.T) {
	db := openTest(t, "", Options{FlushInterval: time.Hour})
	ctx := context.Background()
	onDisk := func(id string) (edged.DeviceState, bool) {
		var s edged.DeviceState
		var ok bool
		db.bolt.View(func(tx *bolt.Tx) error {
			if v := tx.Bucket(bucketDevices).Get([]byte(id)); v != nil {
				ok = json.Unmarshal(v, &s) == nil
			}
			return nil
		})
		return s, ok
	}
	db.SaveDeviceState(edged.DeviceState{DeviceID: "chair-001", Status: edged.StatusIdle, Version: 1})
	if err := db.SaveDeviceStateNow(ctx, edged.DeviceState{DeviceID: "chair-001", Status: edged.StatusIdle, Maintenance: true, Version: 2}); err != nil {
		t.Fatal(err)
	}
	if s, ok := onDisk("chair-001"); !ok || !s.Maintenance {
		t.Fatalf("on disk after SaveDeviceStateNow: %+v (found %v), want maintenance", s, ok)
	}
	// A newer buffered state wins over an older one saved now.
	db.SaveDeviceState(edged.DeviceState{DeviceID: "chair-002", Status: edged.StatusInUse, Maintenance: true, Version: 5})
	if err := db.SaveDeviceStateNow(ctx, edged.DeviceState{DeviceID: "chair-002", Status: edged.StatusIdle, Version: 4}); err != nil {
		t.Fatal(err)
	}
	if s, _ := onDisk("chair-002"); s.Status != edged.StatusInUse || !s.Maintenance {
		t.Fatalf("on disk = %+v, want the newer buffered state", s)
	}
	db.Close()
	if err := db.SaveDeviceStateNow(ctx, edged.DeviceState{DeviceID: "chair-003", Version: 1}); edged.ErrorCode(err) != edged.EUNAVAILABLE {
		t.Fatalf("SaveDeviceStateNow on a closed store: %v, want unavailable", err)
	}
}

// Reopening a store that has every bucket writes nothing, so edged comes
// up on a full disk; one from before the result and stop buckets gets them.
func TestOpenWritesOnlyWhatIsMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{})
	commit(t, db, edged.Change{Events: []edged.Event{rentalEvent("r1")}})
	if err := db.bolt.Update(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(bucketResults); err != nil {
			return err
		}
		return tx.DeleteBucket(bucketStops)
	}); err != nil {
		t.Fatal(err)
	}
	db.Close()
	db = openTest(t, path, Options{})
	if _, err := db.Stops(context.Background()); err != nil {
		t.Fatalf("stops after an upgrade: %v", err)
	}
	db.Close()
	db = openTest(t, path, Options{})
	if w := writes(db); w != 0 {
		t.Fatalf("open wrote %d times", w)
	}
	if got := db.OutboxStats(t0).LastSeq; got != 1 {
		t.Fatalf("last seq after reopen = %d, want 1", got)
	}
}
