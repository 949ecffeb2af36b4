package reliability

import (
	"context"
	"encoding/json"
	"path/filepath"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/store"
)

// jumpClock is the system clock with a wall clock that can jump, as on a
// Pi without an RTC when NTP finally syncs, or when someone sets the date:
// Now carries the real monotonic reading (as time.Now does) but a wall
// reading moved by Offset. Go's time API cannot build such a time, so it
// edits the wall bits; shiftWall checks that this still works.
type jumpClock struct {
	mu     sync.Mutex
	offset time.Duration
	synced bool
}

func (c *jumpClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return shiftWall(time.Now(), c.offset)
}

func (c *jumpClock) Synced() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.synced
}

func (c *jumpClock) set(offset time.Duration, synced bool) {
	c.mu.Lock()
	c.offset, c.synced = offset, synced
	c.mu.Unlock()
}

// shiftWall moves t's wall reading by whole seconds of d and keeps its
// monotonic reading. time.Time is {wall uint64; ext int64; loc}; with the
// monotonic flag (bit 63) set, bits 30..62 of wall hold seconds since 1885.
func shiftWall(t time.Time, d time.Duration) time.Time {
	type rawTime struct {
		wall uint64
		ext  int64
		loc  *time.Location
	}
	r := (*rawTime)(unsafe.Pointer(&t))
	if r.wall&(1<<63) == 0 {
		panic("time without a monotonic reading")
	}
	secs := int64(d / time.Second)
	r.wall = uint64(int64(r.wall) + secs<<30)
	return t
}

func TestShiftWallKeepsMonotonic(t *testing.T) {
	now := time.Now()
	j := shiftWall(now, 3*time.Hour)
	if got := j.Unix() - now.Unix(); got != 3*3600 {
		t.Fatalf("wall moved %d s, want %d", got, 3*3600)
	}
	if d := j.Sub(now); d != 0 {
		t.Fatalf("monotonic difference %v, want 0", d)
	}
	b := shiftWall(now, -5*time.Hour)
	if got := now.Unix() - b.Unix(); got != 5*3600 {
		t.Fatalf("wall moved back %d s", got)
	}
}

// clockRig is a station on the real store with a jumping clock and a
// device link that answers every command at once.
type clockRig struct {
	t     *testing.T
	dir   string
	clock *jumpClock
	db    *store.DB
	st    *edged.Station
	cmds  chan edged.DeviceCommand
}

type instantDevice struct{ rig *clockRig }

func (d instantDevice) Send(ctx context.Context, id string, c edged.DeviceCommand) error {
	d.rig.cmds <- c
	return nil
}

func newClockRig(t *testing.T, clock *jumpClock) *clockRig {
	r := &clockRig{t: t, dir: t.TempDir(), clock: clock, cmds: make(chan edged.DeviceCommand, 100)}
	r.open()
	return r
}

func (r *clockRig) open() {
	t := r.t
	db, err := store.Open(filepath.Join(r.dir, "edged.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st, err := edged.NewStation(edged.StationOptions{ID: "mall-1", Store: db, Clock: r.clock, Commander: instantDevice{r},
		Devices: []edged.Device{{ID: "chair-1", Kind: "chair", Transport: edged.TransportMQTT}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Open(ctx); err != nil {
		t.Fatal(err)
	}
	r.db, r.st = db, st
	if err := st.DeviceOnline(ctx, "chair-1", true); err != nil {
		t.Fatal(err)
	}
	if err := st.DeviceState(ctx, "chair-1", edged.StateReport{Status: edged.StatusIdle}); err != nil {
		t.Fatal(err)
	}
	r.answer()
}

// answer acknowledges every command sent so far.
func (r *clockRig) answer() {
	for {
		select {
		case c := <-r.cmds:
			if err := r.st.DeviceAck(ctx, "chair-1", edged.CommandAck{CmdID: c.CmdID, OK: true}); err != nil {
				r.t.Fatal(err)
			}
		default:
			return
		}
	}
}

// crash drops the station without a goodbye (its store is closed so the
// next open can lock it; nothing is written on the way).
func (r *clockRig) crash() {
	r.db.Close()
}

func (r *clockRig) events(typ edged.EventType) []edged.Event {
	evs, err := r.db.Events(ctx, 0, 0)
	if err != nil {
		r.t.Fatal(err)
	}
	var out []edged.Event
	for _, e := range evs {
		if e.Type == typ {
			out = append(out, e)
		}
	}
	return out
}

// runUntilEnded ticks the station until rental.ended is logged and
// returns how long that took on the monotonic clock.
func (r *clockRig) runUntilEnded(max time.Duration) (edged.RentalEndedData, time.Duration) {
	start := time.Now()
	for time.Since(start) < max {
		r.st.Tick(ctx)
		r.answer()
		if evs := r.events(edged.EventRentalEnded); len(evs) > 0 {
			var d edged.RentalEndedData
			json.Unmarshal(evs[len(evs)-1].Data, &d)
			return d, time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.t.Fatalf("rental did not end within %v", max)
	return edged.RentalEndedData{}, 0
}

func (r *clockRig) grant(id string, secs int) {
	b, _ := json.Marshal(map[string]any{"op": "grant", "rental_id": id, "device_id": "chair-1", "renter_id": "alice", "duration_s": secs})
	if err := r.st.Rental(ctx, b); err != nil {
		r.t.Fatal(err)
	}
	r.answer()
	if len(r.events(edged.EventRentalStarted)) == 0 {
		r.t.Fatal("rental did not start")
	}
}

// TestClockJumpsDuringRental: the wall clock jumps hours forward and back
// while a rental runs; the rental still lasts its duration on the
// monotonic clock, and every event says honestly whether the clock was
// synchronized when it was stamped.
func TestClockJumpsDuringRental(t *testing.T) {
	for _, tc := range []struct {
		name   string
		jump   time.Duration
		synced bool
	}{
		{"forward 5h unsynced", 5 * time.Hour, false},
		{"backward 3h unsynced", -3 * time.Hour, false},
		{"forward 5h synced (NTP step)", 5 * time.Hour, true},
		{"backward 3h synced", -3 * time.Hour, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clock := &jumpClock{synced: !tc.synced}
			r := newClockRig(t, clock)
			defer r.crash()
			const dur = 2
			// From before the grant: the rental starts after this, so
			// however long the sleep below oversleeps on a loaded machine,
			// lasted is never shorter than the rental.
			granted := time.Now()
			r.grant("r-1", dur)
			time.Sleep(300 * time.Millisecond)
			clock.set(tc.jump, tc.synced)
			ended, _ := r.runUntilEnded(10 * time.Second)
			if ended.Reason != edged.ReasonExpired {
				t.Fatalf("rental ended %s, want expired", ended.Reason)
			}
			lasted := time.Since(granted)
			if lasted < dur*time.Second || lasted > dur*time.Second+5*time.Second { // §4: at most 5 s past
				t.Fatalf("rental lasted %v across a %v wall jump, want %ds", lasted, tc.jump, dur)
			}
			if ended.UsedS != dur {
				t.Errorf("used_s = %d, want %d", ended.UsedS, dur)
			}
			evs, _ := r.db.Events(ctx, 0, 0)
			for _, e := range evs {
				if e.Type == edged.EventRentalEnded && e.TS.Sub(time.Now()).Abs() < time.Hour {
					t.Errorf("rental.ended stamped %s: not the (jumped) wall clock", e.TS)
				}
				if e.Type == edged.EventRentalEnded && e.ClockSynced != tc.synced {
					t.Errorf("rental.ended says clock_synced %v, the clock was synced %v", e.ClockSynced, tc.synced)
				}
				if e.Type == edged.EventRentalStarted && e.ClockSynced == tc.synced {
					t.Errorf("rental.started says clock_synced %v, the clock was synced %v", e.ClockSynced, !tc.synced)
				}
			}
			t.Logf("wall jump %v (synced %v): rental of %ds lasted %v, used_s %d", tc.jump, tc.synced, dur, lasted.Round(10*time.Millisecond), ended.UsedS)
		})
	}
}

// TestClockJumpsAcrossRestart: edged restarts during a rental and the wall
// clock has moved meanwhile. Downtime is charged only when both the
// checkpoint and now were synchronized; a clock that went backwards never
// adds time; a clock that jumped forward while unsynchronized (a Pi
// booting with a stale clock) never ends a rental early.
func TestClockJumpsAcrossRestart(t *testing.T) {
	for _, tc := range []struct {
		name              string
		jump              time.Duration
		before, after     bool // synced at the checkpoint, after restart
		endsNow, maxLeftS int64
	}{
		// Synced both sides: 3 h of downtime is real, the rental is over.
		{name: "forward 3h synced", jump: 3 * time.Hour, before: true, after: true, endsNow: 1},
		// Backward while synced: negative downtime must not add time.
		{name: "backward 3h synced", jump: -3 * time.Hour, before: true, after: true, maxLeftS: 60},
		// Unsynced after restart: downtime unmeasured, rental resumes.
		{name: "forward 3h unsynced after", jump: 3 * time.Hour, before: true, after: false, maxLeftS: 60},
		{name: "forward 3h unsynced before", jump: 3 * time.Hour, before: false, after: true, maxLeftS: 60},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := &jumpClock{synced: tc.before}
			r := newClockRig(t, clock)
			r.grant("r-1", 60)
			time.Sleep(100 * time.Millisecond)
			r.st.Tick(ctx)
			r.crash()
			clock.set(tc.jump, tc.after)
			r.open()
			defer r.crash()
			r.st.Tick(ctx)
			r.answer()
			ended := r.events(edged.EventRentalEnded)
			if tc.endsNow == 1 {
				if len(ended) != 1 {
					t.Fatalf("rental still running after 3 h of measured downtime")
				}
				return
			}
			if len(ended) != 0 {
				t.Fatalf("rental ended at restart after a %v jump (synced %v->%v): %s", tc.jump, tc.before, tc.after, ended[0].Data)
			}
			act := r.st.ActiveRentals()
			if len(act) != 1 {
				t.Fatalf("active rentals after restart: %d", len(act))
			}
			left := act[0].Remaining(act[0].Used)
			if left > time.Duration(tc.maxLeftS)*time.Second || left < 50*time.Second {
				t.Fatalf("after a %v jump the rental has %v left, want about 60 s less what it used", tc.jump, left)
			}
			t.Logf("wall jump %v (synced %v->%v): %v left of 60 s", tc.jump, tc.before, tc.after, left.Round(time.Second))
		})
	}
}
