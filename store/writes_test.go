package store

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// writesDelta is what happened between two Writes.
func writesDelta(a, b edged.StoreWrites) edged.StoreWrites {
	d := edged.StoreWrites{Txs: map[string]uint64{}, Fsyncs: b.Fsyncs - a.Fsyncs, Grows: b.Grows - a.Grows,
		Commits: b.Commits - a.Commits, Acks: b.Acks - a.Acks, DeviceStates: b.DeviceStates - a.DeviceStates}
	for k, v := range b.Txs {
		if v != a.Txs[k] {
			d.Txs[k] = v - a.Txs[k]
		}
	}
	return d
}

func fmtTxs(m map[string]uint64) string {
	var parts []string
	for _, k := range txKindNames {
		if m[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
		}
	}
	return strings.Join(parts, " ")
}

// Every write transaction is counted once, under what ran it, with the
// operations it made durable: a commit is one transaction (two fsyncs), an
// Ack riding a commit adds none, an Ack alone adds one. The count matches
// bbolt's own transaction ids, so no write path escapes it.
func TestWritesCountTransactionsAndWhatTheyCarried(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{FlushInterval: time.Hour})
	ctx := context.Background()
	if got := db.Writes().Txs["open"]; got != 1 {
		t.Errorf("a new store counted %d open transactions, want 1", got)
	}
	id0 := committedTxs(t, db)
	check := func(what string, before edged.StoreWrites, want edged.StoreWrites) edged.StoreWrites {
		t.Helper()
		after := db.Writes()
		got := writesDelta(before, after)
		if fmtTxs(got.Txs) != fmtTxs(want.Txs) || got.Commits != want.Commits || got.Acks != want.Acks || got.DeviceStates != want.DeviceStates {
			t.Errorf("%s: transactions %q, commits %d, acks %d, device states %d; want %q, %d, %d, %d", what,
				fmtTxs(got.Txs), got.Commits, got.Acks, got.DeviceStates, fmtTxs(want.Txs), want.Commits, want.Acks, want.DeviceStates)
		}
		if wantF := 2*got.Tx() + got.Grows; got.Fsyncs != wantF {
			t.Errorf("%s: %d fsyncs for %d transactions and %d growths, want %d", what, got.Fsyncs, got.Tx(), got.Grows, wantF)
		}
		// Each transaction's time to the disk is counted once, and it
		// took some: two syncs are never free.
		if timed := after.WriteTime.Count() - before.WriteTime.Count(); timed != got.Tx() {
			t.Errorf("%s: %d write times counted for %d transactions", what, timed, got.Tx())
		}
		if got.Tx() > 0 && after.WriteTime.Sum <= before.WriteTime.Sum {
			t.Errorf("%s: write time went from %v to %v over %d transactions", what, before.WriteTime.Sum, after.WriteTime.Sum, got.Tx())
		}
		return after
	}

	w := db.Writes()
	evs := commit(t, db, edged.Change{Rentals: []edged.Rental{{ID: "r-1"}}, Events: []edged.Event{rentalEvent("r-1"), rentalEvent("r-1b")}})
	w = check("a commit", w, edged.StoreWrites{Txs: map[string]uint64{"commit": 1}, Commits: 1})

	if err := db.Ack(ctx, evs[0].Seq); err != nil {
		t.Fatal(err)
	}
	w = check("an ack alone", w, edged.StoreWrites{Txs: map[string]uint64{"ack": 1}, Acks: 1})

	// An Ack made while a commit is in its transaction rides in it.
	ackDuringCommit(t, db, edged.Change{Rentals: []edged.Rental{{ID: "r-2"}}, Events: []edged.Event{rentalEvent("r-2")}}, evs[1].Seq)
	w = check("an ack riding a commit", w, edged.StoreWrites{Txs: map[string]uint64{"commit": 1}, Commits: 1, Acks: 1})

	for i := range 3 {
		db.SaveDeviceState(edged.DeviceState{DeviceID: fmt.Sprintf("chair-%03d", i), Status: edged.StatusIdle, Version: 1})
	}
	if err := db.flushDevices(); err != nil {
		t.Fatal(err)
	}
	w = check("a flush of 3 device states", w, edged.StoreWrites{Txs: map[string]uint64{"device_flush": 1}, DeviceStates: 3})

	db.SaveDeviceState(edged.DeviceState{DeviceID: "chair-009", Status: edged.StatusIdle, Version: 1})
	commit(t, db, edged.Change{Rentals: []edged.Rental{{ID: "r-3"}}})
	w = check("a commit carrying a device state", w, edged.StoreWrites{Txs: map[string]uint64{"commit": 1}, Commits: 1, DeviceStates: 1})

	if err := db.SaveRegistry(ctx, edged.AppliedRegistry{Version: 1}); err != nil {
		t.Fatal(err)
	}
	w = check("a registry", w, edged.StoreWrites{Txs: map[string]uint64{"registry": 1}})

	if err := db.pruneLog(); err != nil {
		t.Fatal(err)
	}
	w = check("a release of acked events", w, edged.StoreWrites{Txs: map[string]uint64{"prune": 1}})

	// Device events committed at once share transactions (bbolt's batch),
	// each counted once however many commits it carried.
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		wg.Go(func() {
			_, err := db.Commit(ctx, edged.Change{Events: []edged.Event{deviceEvent(i)}})
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	d := writesDelta(w, db.Writes())
	if d.Commits != 16 || d.Txs["commit"] < 1 || d.Txs["commit"] > 16 || d.Tx() != d.Txs["commit"] {
		t.Errorf("16 concurrent commits: %d counted in transactions %q, want 16 in 1 to 16 commit transactions", d.Commits, fmtTxs(d.Txs))
	}

	if got, want := db.Writes().Tx()-1, committedTxs(t, db)-id0; got != want {
		t.Errorf("counted %d write transactions after open, bbolt committed %d", got, want)
	}
	if w := db.Writes(); w.WriteTime.Count() != w.Tx() {
		t.Errorf("write times of %d transactions counted, %d committed (open included)", w.WriteTime.Count(), w.Tx())
	}
}

// A write time lands in the first bucket whose bound it does not exceed;
// one longer than every bound lands in the last.
func TestWriteTimeBuckets(t *testing.T) {
	var w writeCounters
	for _, d := range []time.Duration{0, 250 * time.Microsecond, 251 * time.Microsecond, 5 * time.Millisecond, 7 * time.Millisecond, time.Second, 3 * time.Second} {
		w.wrote(d)
	}
	h := w.writeTimes()
	want := map[time.Duration]uint64{250 * time.Microsecond: 2, 500 * time.Microsecond: 1, 5 * time.Millisecond: 1, 10 * time.Millisecond: 1, time.Second: 1}
	for i, b := range h.Bounds {
		if h.Counts[i] != want[b] {
			t.Errorf("bucket <= %v counted %d, want %d", b, h.Counts[i], want[b])
		}
	}
	if last := h.Counts[len(h.Bounds)]; last != 1 {
		t.Errorf("the bucket above %v counted %d, want 1 (3 s)", h.Bounds[len(h.Bounds)-1], last)
	}
	if want := 4*time.Second + 12*time.Millisecond + 501*time.Microsecond; h.Sum != want {
		t.Errorf("sum %v, want %v", h.Sum, want)
	}
}

// Each growth of the file (one more fsync in bbolt) is counted once, and
// reopening a store writes, and counts, nothing.
func TestWritesCountFileGrowth(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{FlushInterval: time.Hour})
	size := func() int64 {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	g0, last := db.Writes().Grows, size()
	seen := 0
	data := fmt.Sprintf(`{"device_id":"chair-001","event":{"blob":%q}}`, strings.Repeat("x", 4000))
	for i := 0; i < 2000 && seen < 3; i++ {
		commit(t, db, edged.Change{Events: []edged.Event{event(edged.EventDeviceEvent, data)}})
		if s := size(); s > last {
			seen, last = seen+1, s
		}
	}
	if seen < 3 {
		t.Fatalf("the file grew %d times in 2000 commits, want 3 to test", seen)
	}
	if got := db.Writes().Grows - g0; got != uint64(seen) {
		t.Errorf("counted %d growths, the file grew %d times", got, seen)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openTest(t, path, Options{FlushInterval: time.Hour})
	if w := db.Writes(); w.Tx() != 0 || w.Fsyncs != 0 {
		t.Errorf("reopening counted transactions %q and %d fsyncs, want none", fmtTxs(w.Txs), w.Fsyncs)
	}
}

// On a busy station (a commit ended within ackLinger) an Ack waits for the
// next commit to carry it instead of paying a transaction of its own; on
// an idle one it is written at once.
func TestAckRidesTheNextCommitOfABusyStation(t *testing.T) {
	db := openTest(t, filepath.Join(t.TempDir(), "edged.db"), Options{FlushInterval: time.Hour})
	ctx := context.Background()
	db.ackLinger = time.Hour // "busy" whatever the machine's speed: the next commit is the test's
	evs := commit(t, db, edged.Change{Events: []edged.Event{rentalEvent("r-1"), rentalEvent("r-2")}})
	w := db.Writes()
	acked := make(chan error, 1)
	go func() { acked <- db.Ack(ctx, evs[0].Seq) }()
	waitAcksQueued(t, db, 1)
	select {
	case err := <-acked:
		t.Fatalf("the ack was written alone (err %v) although a commit had just ended", err)
	default:
	}
	commit(t, db, edged.Change{Events: []edged.Event{rentalEvent("r-3")}})
	if err := <-acked; err != nil {
		t.Fatal(err)
	}
	d := writesDelta(w, db.Writes())
	if fmtTxs(d.Txs) != "commit=1" || d.Acks != 1 {
		t.Errorf("transactions %q carrying %d acks, want commit=1 carrying the ack", fmtTxs(d.Txs), d.Acks)
	}
	if st := db.OutboxStats(time.Now()); st.Events != 2 {
		t.Errorf("outbox holds %d events after the ack, want 2", st.Events)
	}

	// Idle: nothing committed for longer than the linger.
	db.ackLinger = time.Nanosecond
	w = db.Writes()
	if err := db.Ack(ctx, evs[1].Seq); err != nil {
		t.Fatal(err)
	}
	if d := writesDelta(w, db.Writes()); fmtTxs(d.Txs) != "ack=1" {
		t.Errorf("an idle station's ack made transactions %q, want ack=1", fmtTxs(d.Txs))
	}
}
