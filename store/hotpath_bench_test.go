package store

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
	bolt "go.etcd.io/bbolt"
)

// committedTxs is the id of the last committed write transaction: bbolt
// numbers them one by one, and each costs two fdatasyncs (pages, then meta).
func committedTxs(tb testing.TB, db *DB) uint64 {
	var id int
	if err := db.bolt.View(func(tx *bolt.Tx) error { id = tx.ID(); return nil }); err != nil {
		tb.Fatal(err)
	}
	return uint64(id)
}

// BenchmarkCommitGroup commits small device-event Changes from 1, 8 and 64
// goroutines and reports commits/s and the fsyncs each commit cost.
func BenchmarkCommitGroup(b *testing.B) {
	for _, committers := range []int{1, 8, 64} {
		b.Run(fmt.Sprintf("committers=%d", committers), func(b *testing.B) {
			db := openTest(b, filepath.Join(b.TempDir(), "edged.db"), Options{FlushInterval: time.Hour})
			ctx := context.Background()
			e := deviceEvent(0)
			tx0 := committedTxs(b, db)
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			per := b.N / committers
			for w := range committers {
				n := per
				if w == 0 {
					n += b.N % committers
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range n {
						if _, err := db.Commit(ctx, edged.Change{Events: []edged.Event{e}}); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			txs := committedTxs(b, db) - tx0
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "commits/s")
			b.ReportMetric(2*float64(txs)/float64(b.N), "fsyncs/commit")
		})
	}
}

// BenchmarkDrain drains 100,000 queued events the way the uplink does:
// Pending pages of 100, each acked as one PUBACK acks a batch.
func BenchmarkDrain(b *testing.B) {
	const total, page = 100000, 100
	for range b.N {
		b.StopTimer()
		db := openTest(b, filepath.Join(b.TempDir(), "edged.db"), Options{FlushInterval: time.Hour})
		ctx := context.Background()
		batch := make([]edged.Event, 1000)
		for i := range batch {
			batch[i] = deviceEvent(i)
		}
		for range total / len(batch) {
			if _, err := db.Commit(ctx, edged.Change{Events: batch}); err != nil {
				b.Fatal(err)
			}
		}
		tx0 := committedTxs(b, db)
		b.StartTimer()
		start := time.Now()
		var after uint64
		drained := 0
		for drained < total {
			evs, err := db.Pending(ctx, after, page)
			if err != nil {
				b.Fatal(err)
			}
			if len(evs) == 0 {
				b.Fatalf("drained %d of %d", drained, total)
			}
			s := make([]uint64, len(evs))
			for i, e := range evs {
				s[i] = e.Seq
			}
			if err := db.Ack(ctx, s...); err != nil {
				b.Fatal(err)
			}
			after = s[len(s)-1]
			drained += len(evs)
		}
		elapsed := time.Since(start)
		b.StopTimer()
		if st := db.OutboxStats(time.Now()); st.Events != 0 {
			b.Fatalf("outbox holds %d events after the drain", st.Events)
		}
		b.ReportMetric(float64(total)/elapsed.Seconds(), "events/s")
		b.ReportMetric(float64(committedTxs(b, db)-tx0), "write-txs")
		db.Close()
	}
}

// BenchmarkDrainBusy drains 20,000 queued events while 8 goroutines keep
// committing device events, as a busy station does after its uplink
// returns. It reports the drain rate, the commit rate beside it and the
// write transactions per Ack: an Ack that joins the commits' group costs
// no fsync of its own.
func BenchmarkDrainBusy(b *testing.B) {
	const total, page, committers = 20000, 16, 8
	for range b.N {
		b.StopTimer()
		db := openTest(b, filepath.Join(b.TempDir(), "edged.db"), Options{FlushInterval: time.Hour})
		ctx := context.Background()
		batch := make([]edged.Event, 1000)
		for i := range batch {
			batch[i] = deviceEvent(i)
		}
		for range total / len(batch) {
			if _, err := db.Commit(ctx, edged.Change{Events: batch}); err != nil {
				b.Fatal(err)
			}
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var commits sync.Map
		for w := range committers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				n := 0
				defer func() { commits.Store(w, n) }()
				for {
					select {
					case <-stop:
						return
					default:
					}
					if _, err := db.Commit(ctx, edged.Change{Events: []edged.Event{deviceEvent(n)}}); err != nil {
						b.Error(err)
						return
					}
					n++
				}
			}()
		}
		tx0 := committedTxs(b, db)
		b.StartTimer()
		start := time.Now()
		var after uint64
		drained, acks := 0, 0
		for drained < total {
			evs, err := db.Pending(ctx, after, page)
			if err != nil {
				b.Fatal(err)
			}
			if len(evs) == 0 {
				b.Fatalf("drained %d of %d", drained, total)
			}
			s := make([]uint64, len(evs))
			for i, e := range evs {
				s[i] = e.Seq
			}
			if err := db.Ack(ctx, s...); err != nil {
				b.Fatal(err)
			}
			acks++
			after = s[len(s)-1]
			drained += len(evs)
		}
		elapsed := time.Since(start)
		b.StopTimer()
		close(stop)
		wg.Wait()
		txs := committedTxs(b, db) - tx0
		n := 0
		commits.Range(func(_, v any) bool { n += v.(int); return true })
		b.ReportMetric(float64(total)/elapsed.Seconds(), "drained/s")
		b.ReportMetric(float64(n)/elapsed.Seconds(), "commits/s")
		b.ReportMetric(float64(txs)/float64(acks), "write-txs/ack")
		db.Close()
	}
}

// BenchmarkCommitMerged commits what a station's committer merges from
// many decisions: 64 rentals, 64 command records and 256 events in one
// Change. It reports the events committed per second and the fsyncs per
// Change (two: one transaction).
func BenchmarkCommitMerged(b *testing.B) {
	db := openTest(b, filepath.Join(b.TempDir(), "edged.db"), Options{FlushInterval: time.Hour})
	ctx := context.Background()
	var c edged.Change
	for i := range 64 {
		id := fmt.Sprintf("r-%d", i)
		c.Rentals = append(c.Rentals, edged.Rental{ID: id, DeviceID: "chair-001", State: edged.RentalActive, GrantedAt: t0})
		c.Commands = append(c.Commands, edged.CommandRecord{CmdID: fmt.Sprintf("c-%d", i), DeviceID: "chair-001", Done: true, At: t0})
		c.Events = append(c.Events, rentalEvent(id), deviceEvent(i), deviceEvent(i+1), deviceEvent(i+2))
	}
	for i := range 64 {
		db.SaveDeviceState(edged.DeviceState{DeviceID: fmt.Sprintf("chair-%03d", i), Status: edged.StatusIdle})
	}
	tx0 := committedTxs(b, db)
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if _, err := db.Commit(ctx, c); err != nil {
			b.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N*len(c.Events))/elapsed.Seconds(), "events/s")
	b.ReportMetric(2*float64(committedTxs(b, db)-tx0)/float64(b.N), "fsyncs/commit")
}
