package store

import (
	"context"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
)

// TestDiskFullThenRecovers stands in for a full SD card with RLIMIT_FSIZE:
// the file cannot grow, so writes fail as they would with ENOSPC (EFBIG).
// It changes a process-wide limit, so it must not run in parallel.
func TestDiskFullThenRecovers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edged.db")
	db := openTest(t, path, Options{})
	ctx := context.Background()
	commit(t, db, edged.Change{Events: []edged.Event{deviceEvent(0)}})

	signal.Ignore(syscall.SIGXFSZ)
	defer signal.Reset(syscall.SIGXFSZ)
	var saved syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &saved); err != nil {
		t.Skipf("getrlimit: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	limit := saved
	limit.Cur = uint64(fi.Size())
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &limit); err != nil {
		t.Skipf("setrlimit: %v", err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &saved); err != nil {
				t.Fatalf("restore RLIMIT_FSIZE: %v", err)
			}
		}
	}
	defer restore()

	// A commit big enough to need a larger file.
	big := edged.Change{Rentals: []edged.Rental{{ID: "r-full", State: edged.RentalActive}}}
	pad := `"` + strings.Repeat("x", 1000) + `"`
	for range 200 {
		big.Events = append(big.Events, event(edged.EventRentalResult, `{"rental_id":"r-full","pad":`+pad+`}`))
	}
	_, err = db.Commit(ctx, big)
	if got := edged.ErrorCode(err); got != edged.EUNAVAILABLE {
		t.Fatalf("Commit on a full disk: %v (code %q), want %q", err, got, edged.EUNAVAILABLE)
	}
	t.Logf("commit on a full disk: %v", err)
	if err := db.Healthy(); edged.ErrorCode(err) != edged.EUNAVAILABLE {
		t.Errorf("Healthy on a full disk = %v, want unavailable", err)
	}
	if _, err := db.Rental(ctx, "r-full"); edged.ErrorCode(err) != edged.ENOTFOUND {
		t.Errorf("rental of the failed commit: %v, want not found", err)
	}
	if got := db.OutboxStats(t0); got.LastSeq != 1 || got.Events != 1 {
		t.Errorf("OutboxStats after the failed commit = %+v, want last seq 1 and 1 event", got)
	}

	restore()
	evs, err := db.Commit(ctx, big)
	if err != nil {
		t.Fatalf("Commit once space is back: %v", err)
	}
	if diff := cmp.Diff(span(2, 201), seqs(evs)); diff != "" {
		t.Errorf("seqs after recovery (-want +got):\n%s", diff)
	}
	if err := db.Healthy(); err != nil {
		t.Errorf("Healthy after recovery = %v", err)
	}
	if _, err := db.Rental(ctx, "r-full"); err != nil {
		t.Errorf("rental after recovery: %v", err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openTest(t, path, Options{})
	if got := db.OutboxStats(t0); got.LastSeq != 201 || got.Events != 201 {
		t.Errorf("OutboxStats after reopen = %+v, want last seq 201 and 201 events", got)
	}
}
