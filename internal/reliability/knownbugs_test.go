package reliability

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/store"
)

// failingStore is the real store whose commits fail as on a full disk
// while full is set.
type failingStore struct {
	*store.DB
	full atomic.Bool
}

func (f *failingStore) Commit(ctx context.Context, c edged.Change) ([]edged.Event, error) {
	if f.full.Load() {
		return nil, edged.Errorf(edged.EUNAVAILABLE, "write edged.db: no space left on device")
	}
	return f.DB.Commit(ctx, c)
}

type recordingDevices struct{ sent chan edged.DeviceCommand }

func (r recordingDevices) Send(ctx context.Context, id string, c edged.DeviceCommand) error {
	r.sent <- c
	return nil
}

// TestFullStoreStillStopsExpiredRental: a rental that reaches its end
// while the disk is full must still be stopped (enforcement does not
// wait for the disk), and the station must not spin retrying the commit.
func TestFullStoreStillStopsExpiredRental(t *testing.T) {
	db, err := store.Open(filepath.Join(t.TempDir(), "edged.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	fs := &failingStore{DB: db}
	clock := &jumpClock{synced: true}
	devs := recordingDevices{sent: make(chan edged.DeviceCommand, 10)}
	st, err := edged.NewStation(edged.StationOptions{ID: "mall-1", Store: fs, Clock: clock, Commander: devs,
		Devices: []edged.Device{{ID: "chair-1", Kind: "chair", Transport: edged.TransportMQTT}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Open(ctx); err != nil {
		t.Fatal(err)
	}
	st.DeviceOnline(ctx, "chair-1", true)
	st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusIdle})
	b, _ := json.Marshal(map[string]any{"op": "grant", "rental_id": "r-1", "device_id": "chair-1", "renter_id": "alice", "duration_s": 1})
	if err := st.Rental(ctx, b); err != nil {
		t.Fatal(err)
	}
	start := <-devs.sent
	st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: start.CmdID, OK: true})

	fs.full.Store(true)
	time.Sleep(1100 * time.Millisecond)
	before := clock.Now()
	next := st.Tick(ctx)
	select {
	case c := <-devs.sent:
		if c.Action != edged.ActionStop {
			t.Fatalf("sent %s at the rental's end, want stop", c.Action)
		}
	default:
		t.Fatalf("no stop sent at the rental's end while the disk is full")
	}
	if d := next.Sub(before); d < 100*time.Millisecond { // against the clock the station read, not the time the test got to run
		t.Errorf("Tick wants to run again in %v: a busy loop while the disk is full", d)
	}
	// Space returns: rental.ended is recorded once.
	// The station retries with backoff (1 s at first), so give it a few
	// seconds of ticks.
	fs.full.Store(false)
	n := 0
	for i := 0; i < 40 && n == 0; i++ {
		st.Tick(ctx)
		time.Sleep(100 * time.Millisecond)
		evs, _ := db.Events(ctx, 0, 0)
		for _, e := range evs {
			if e.Type == edged.EventRentalEnded && strings.Contains(string(e.Data), `"r-1"`) {
				n++
			}
		}
	}
	for i := 0; i < 5; i++ {
		st.Tick(ctx)
	}
	evs, _ := db.Events(ctx, 0, 0)
	n = 0
	for _, e := range evs {
		if e.Type == edged.EventRentalEnded && strings.Contains(string(e.Data), `"r-1"`) {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("rental.ended logged %d times after space returned, want 1", n)
	}
}

// TestStoreOversizeIDIsInvalid: an id too long for a bbolt key is a bad
// request, not a sick disk: it must be EINVALID and leave the store
// healthy (an unhealthy store stops the watchdog pings and gets edged
// restarted).
func TestStoreOversizeIDIsInvalid(t *testing.T) {
	db, err := store.Open(filepath.Join(t.TempDir(), "edged.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	_, err = db.Commit(ctx, edged.Change{Rentals: []edged.Rental{{ID: strings.Repeat("r", 40000), State: edged.RentalEnded}}})
	if edged.ErrorCode(err) != edged.EINVALID {
		t.Errorf("commit of an oversize id: %v (code %q), want invalid", err, edged.ErrorCode(err))
	}
	if err := db.Healthy(); err != nil {
		t.Errorf("store unhealthy after refusing a bad id: %v", err)
	}
}
