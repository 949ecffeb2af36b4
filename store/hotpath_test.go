package store

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
	bolt "go.etcd.io/bbolt"
)

// The bytes Pending hands the uplink are the envelope of §3.3, encoded once
// at commit with the seq the commit assigned.
func TestPendingRawIsTheEnvelope(t *testing.T) {
	db := openTest(t, "", Options{})
	ts := time.Date(2026, 3, 1, 12, 0, 0, 500000000, time.UTC)
	in := []edged.Event{
		{Station: "st-1", Type: edged.EventDeviceEvent, TS: ts, ClockSynced: true,
			Data: json.RawMessage(`{"device_id":"chair-001", "event": {"type":"door","open":true}}`)},
		{Station: "st-1", Type: edged.EventDeviceOnline, TS: t0.In(time.FixedZone("CET", 3600))},
	}
	commit(t, db, edged.Change{Events: in})
	evs, err := db.Pending(context.Background(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		`{"seq":1,"station":"st-1","type":"device.event","ts":"2026-03-01T12:00:00.5Z","clock_synced":true,"data":{"device_id":"chair-001","event":{"type":"door","open":true}}}`,
		`{"seq":2,"station":"st-1","type":"device.online","ts":"2026-03-01T12:00:00Z","clock_synced":false,"data":{}}`,
	}
	var got []string
	for _, e := range evs {
		got = append(got, string(e.Raw))
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Pending's Raw (-want +got):\n%s", diff)
	}
	var stored []string
	if err := db.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketEvents).ForEach(func(_, v []byte) error {
			stored = append(stored, string(v))
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, stored); diff != "" {
		t.Errorf("stored envelopes (-want +got):\n%s", diff)
	}
	// Raw outlives the read transaction.
	commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(3)}})
	if got := string(evs[0].Raw); got != want[0] {
		t.Errorf("Raw changed after a later commit: %s", got)
	}
}

// Pending reads while a commit holds bbolt's writer: it never waits for it.
func TestPendingDoesNotWaitForCommits(t *testing.T) {
	db := openTest(t, "", Options{})
	ctx := context.Background()
	commit(t, db, edged.Change{Events: []edged.Event{rentalEvent("r-1")}})

	inTx, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	db.testHookCommit = func() {
		once.Do(func() {
			close(inTx)
			<-release
		})
	}
	committed := make(chan error, 1)
	go func() {
		_, err := db.Commit(ctx, edged.Change{Rentals: []edged.Rental{{ID: "r-2"}}, Events: []edged.Event{rentalEvent("r-2")}})
		committed <- err
	}()
	<-inTx
	read := make(chan []edged.Event, 1)
	go func() {
		evs, err := db.Pending(ctx, 0, 0)
		if err != nil {
			t.Error(err)
		}
		read <- evs
	}()
	select {
	case evs := <-read:
		if diff := cmp.Diff([]uint64{1}, seqs(evs)); diff != "" {
			t.Errorf("Pending during a commit (-want +got):\n%s", diff)
		}
	case <-time.After(30 * time.Second):
		t.Error("Pending waited for a commit in progress")
	}
	close(release)
	if err := <-committed; err != nil {
		t.Fatal(err)
	}
}

// freshCount counts the undelivered events and their bytes from the
// buckets, as OutboxStats must report them.
func freshCount(t *testing.T, db *DB) (events int, bytes int64) {
	t.Helper()
	if err := db.bolt.View(func(tx *bolt.Tx) error {
		st, err := readState(tx)
		if err != nil {
			return err
		}
		return tx.Bucket(bucketOutbox).ForEach(func(k, v []byte) error {
			if !st.delivered(seqOf(k)) {
				events++
				bytes += decodeEntry(v).size
			}
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	return events, bytes
}

func outboxKeys(t *testing.T, db *DB) int {
	t.Helper()
	n := 0
	if err := db.bolt.View(func(tx *bolt.Tx) error {
		n = tx.Bucket(bucketOutbox).Stats().KeyN
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

// Acks arrive out of order within the window: the watermark moves over
// every seq acked in a row, the others wait above it, all of it survives a
// restart, and the entries of delivered events leave the outbox later in
// the background, the counters exact all along.
func TestAckWatermarkOutOfOrder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{FlushInterval: time.Hour})
	ctx := context.Background()
	var in []edged.Event
	for i := range 20 {
		in = append(in, deviceEvent(i))
	}
	in[6] = event(edged.EventDeviceEvent, `{"device_id":"chair-001","event":{"type":"slow"}}`)
	in[6].TS = t0.Add(time.Minute)
	commit(t, db, edged.Change{Events: in})
	check := func(db *DB, wantPending []uint64) {
		t.Helper()
		evs, err := db.Pending(ctx, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(wantPending, seqs(evs)); diff != "" {
			t.Errorf("Pending (-want +got):\n%s", diff)
		}
		events, bytes := freshCount(t, db)
		if st := db.OutboxStats(t0); st.Events != events || st.Bytes != bytes || st.Events != len(wantPending) {
			t.Errorf("OutboxStats = %d events, %d bytes; the outbox holds %d events, %d bytes, want %d events",
				st.Events, st.Bytes, events, bytes, len(wantPending))
		}
	}
	// A window of acks: 5 and 3 before 1, 2 and 4; 7 left out.
	for _, a := range [][]uint64{{5, 3}, {1, 2}, {4, 6}, {9, 8}} {
		if err := db.Ack(ctx, a...); err != nil {
			t.Fatal(err)
		}
	}
	check(db, append([]uint64{7}, span(10, 20)...))
	if st := db.OutboxStats(t0); !st.Oldest.Equal(t0.Add(time.Minute)) {
		t.Errorf("oldest = %v, want seq 7's %v", st.Oldest, t0.Add(time.Minute))
	}
	// Duplicate and unknown acks change nothing.
	if err := db.Ack(ctx, 1, 5, 9, 999); err != nil {
		t.Fatal(err)
	}
	check(db, append([]uint64{7}, span(10, 20)...))
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db = openTest(t, path, Options{FlushInterval: time.Hour})
	check(db, append([]uint64{7}, span(10, 20)...))
	if err := db.Ack(ctx, 7); err != nil {
		t.Fatal(err)
	}
	check(db, span(10, 20))
	if err := db.pruneLog(); err != nil {
		t.Fatal(err)
	}
	if got := outboxKeys(t, db); got != 11 {
		t.Errorf("the outbox holds %d entries after the release, want 11", got)
	}
	check(db, span(10, 20))
}

// A buffered device state rides in the transaction of the next commit: one
// write transaction for both, and nothing left for the periodic flush.
func TestDeviceStatesRideCommits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{FlushInterval: time.Hour})
	ctx := context.Background()
	db.SaveDeviceState(edged.DeviceState{DeviceID: "chair-001", Status: edged.StatusInUse, Version: 1})
	db.SaveDeviceState(edged.DeviceState{DeviceID: "chair-002", Status: edged.StatusIdle, Version: 1})
	tx0 := committedTxs(t, db)
	commit(t, db, edged.Change{Rentals: []edged.Rental{{ID: "r-1"}}, Events: []edged.Event{rentalEvent("r-1")}})
	if got := committedTxs(t, db) - tx0; got != 1 {
		t.Errorf("the commit took %d write transactions, want 1", got)
	}
	var saved []string
	if err := db.bolt.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDevices).ForEach(func(k, _ []byte) error {
			saved = append(saved, string(k))
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"chair-001", "chair-002"}, saved); diff != "" {
		t.Errorf("device states in the file after the commit (-want +got):\n%s", diff)
	}
	tx1 := committedTxs(t, db)
	if err := db.flushDevices(); err != nil {
		t.Fatal(err)
	}
	if got := committedTxs(t, db) - tx1; got != 0 {
		t.Errorf("the flush wrote %d transactions after the commit took the states, want 0", got)
	}
	// A state saved after the commit took the buffer is still flushed, and
	// a newer state is never overwritten by an older one.
	db.SaveDeviceState(edged.DeviceState{DeviceID: "chair-001", Status: edged.StatusFault, Version: 2})
	if err := db.SaveDeviceStateNow(ctx, edged.DeviceState{DeviceID: "chair-001", Status: edged.StatusIdle, Version: 1}); err != nil {
		t.Fatal(err)
	}
	commit(t, db, edged.Change{Events: []edged.Event{rentalEvent("r-2")}})
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openTest(t, path, Options{FlushInterval: time.Hour})
	states, err := db.DeviceStates(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(states) != 2 || states[0].Status != edged.StatusFault {
		t.Errorf("device states after reopen = %+v, want chair-001 fault (the newer state)", states)
	}
}

// An Ack made while a commit is in flight rides in that commit's
// transaction: one fsync for both, and the Ack returns once it is durable.
func TestAckRidesConcurrentCommit(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{FlushInterval: time.Hour})
	ctx := context.Background()
	commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(1), deviceEvent(2)}})

	tx0 := committedTxs(t, db)
	ackDuringCommit(t, db, edged.Change{Rentals: []edged.Rental{{ID: "r-1"}}, Events: []edged.Event{rentalEvent("r-1")}}, 1, 2)
	if got := committedTxs(t, db) - tx0; got != 1 {
		t.Errorf("the commit and the Ack took %d write transactions, want 1", got)
	}
	if st := db.OutboxStats(t0); st.Events != 1 {
		t.Errorf("OutboxStats.Events = %d after acking 2 of 3, want 1", st.Events)
	}
	// The commit only moved the watermark: the entries leave later.
	if got := outboxKeys(t, db); got != 3 {
		t.Errorf("the outbox holds %d entries right after the ride, want 3 (released later)", got)
	}
	if err := db.pruneLog(); err != nil {
		t.Fatal(err)
	}
	if got := outboxKeys(t, db); got != 1 {
		t.Errorf("the outbox holds %d entries after the release, want 1", got)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openTest(t, path, Options{FlushInterval: time.Hour})
	evs, err := db.Pending(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]uint64{3}, seqs(evs)); diff != "" {
		t.Errorf("Pending after reopen (-want +got):\n%s", diff)
	}
}

// Committers near the quota, a consumer acking each page out of order and
// its acks riding in their commits: every seq is received once or counted
// dropped once, and the counters match the buckets.
func TestRidingAcksWithDropsAccountExactly(t *testing.T) {
	db := openTest(t, "", Options{OutboxMaxBytes: 4 << 10, FlushInterval: time.Hour})
	ctx := context.Background()
	const committers, per = 4, 150
	var wg sync.WaitGroup
	for w := range committers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				e := deviceEvent(i)
				if i%50 == 0 {
					e = rentalEvent(fmt.Sprint(w, "-", i))
				}
				db.SaveDeviceState(edged.DeviceState{DeviceID: fmt.Sprint("chair-", w), Version: uint64(i)})
				if _, err := db.Commit(ctx, edged.Change{Events: []edged.Event{e}}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	received := make(map[uint64]edged.Event)
	var after uint64
	drain := func() int {
		evs, err := db.Pending(ctx, after, 5)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range evs {
			if _, dup := received[e.Seq]; dup {
				t.Errorf("seq %d received twice", e.Seq)
			}
			received[e.Seq] = e
			after = e.Seq
		}
		s := seqs(evs)
		slices.Reverse(s)
		if err := db.Ack(ctx, s...); err != nil {
			t.Fatal(err)
		}
		return len(evs)
	}
	// Let the flood reach the quota first (far more is committed than the
	// quota holds), then drain while the committers go on.
	for i := 0; i < 3000 && db.OutboxStats(t0).Dropped == 0; i++ {
		select {
		case <-done:
		case <-time.After(10 * time.Millisecond):
		}
	}
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
			drain()
		}
	}
	for i := 0; i < 10000 && drain() > 0; i++ {
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
	st := db.OutboxStats(t0)
	events, bytes := freshCount(t, db)
	if st.Events != 0 || events != 0 || bytes != 0 || st.Bytes != 0 || st.Dropped != missing {
		t.Errorf("after the drain: OutboxStats %+v, the buckets hold %d events, %d bytes; want empty, %d dropped", st, events, bytes, missing)
	}
}

// With SingleCommitter, a Change of device events is committed at once
// rather than through bbolt's batch, where a batch of one waits its delay
// out.
func TestSingleCommitterSkipsTheBatch(t *testing.T) {
	db := openTest(t, "", Options{SingleCommitter: true})
	// Through the batch, the commit below would wait an hour.
	db.bolt.MaxBatchDelay = time.Hour
	committed := make(chan error, 1)
	go func() {
		_, err := db.Commit(context.Background(), edged.Change{Events: []edged.Event{deviceEvent(1)}})
		committed <- err
	}()
	select {
	case err := <-committed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the commit waited for a batch")
	}
}

// ackDuringCommit commits ch, and while that commit is inside its
// transaction Acks seqs; it returns once both returned, failing the test
// on an error of either.
func ackDuringCommit(t *testing.T, db *DB, ch edged.Change, seqs ...uint64) {
	t.Helper()
	ctx := context.Background()
	inTx, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	db.testHookCommit = func() { once.Do(func() { close(inTx); <-release }) }
	defer func() { db.testHookCommit = nil }()
	committed := make(chan error, 1)
	go func() {
		_, err := db.Commit(ctx, ch)
		committed <- err
	}()
	<-inTx
	acked := make(chan error, 1)
	go func() { acked <- db.Ack(ctx, seqs...) }()
	waitAcksQueued(t, db, 1)
	close(release)
	if err := <-committed; err != nil {
		t.Fatal(err)
	}
	if err := <-acked; err != nil {
		t.Fatal(err)
	}
}

// waitAcksQueued waits until n Acks wait for a transaction to carry them.
func waitAcksQueued(t *testing.T, db *DB, n int) {
	t.Helper()
	queued := func() bool {
		db.ackMu.Lock()
		defer db.ackMu.Unlock()
		return len(db.acks) == n
	}
	for i := 0; i < 3000 && !queued(); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if !queued() {
		t.Fatalf("%d Acks never queued", n)
	}
}
