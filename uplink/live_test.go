package uplink

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/cloudemu"
)

// TestLiveResultOvertakesBacklog: on aliyun's and aws's limits, a rental.result
// committed while a backlog drains reaches the cloud before the drain
// reaches its seq (by order of arrival), in the profile's form (a batch, or
// a bare envelope with batch_events 1); the
// drain still delivers every seq in order with no gap, that result again
// in its place; a device event committed with it waits its turn; and no
// rule of the cloud is broken.
func TestLiveResultOvertakesBacklog(t *testing.T) {
	for _, tc := range []struct {
		profile  string
		n, batch int
	}{
		{edged.ProfileAliyun, 6000, 50}, // 120 messages at 25/s: about 5 s of drain
		{edged.ProfileAWS, 400, 1},      // bare envelopes, 90/s: about 4 s
	} {
		t.Run(tc.profile, func(t *testing.T) { testLiveResult(t, tc.profile, tc.n, tc.batch) })
	}
}

func testLiveResult(t *testing.T, profile string, n, batch int) {
	c := startCloud(t, profile, t.TempDir(), "", cloudemu.Options{})
	events, _, _ := upTopics(profile)
	rec := record(t, c, events)
	db := openStore(t, filepath.Join(t.TempDir(), "edged.db"))
	defer db.Close()
	fillStore(t, db, n)
	s := newStation()
	cfg := cloudConfig(t, s, c, profile, c.URL())
	cfg.Outbox = db
	cfg.Window = 256
	cfg.BatchEvents = batch
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 30*time.Second, "the drain under way", func() bool {
		seqs, _ := rec.eventSeqs(t, events, batch, u.maxBytes)
		return highest(seqs) >= uint64(batch)
	})
	evs, err := db.Commit(context.Background(), edged.Change{Events: []edged.Event{
		{Station: "st-1", TS: time.Now(), ClockSynced: true, Type: edged.EventDeviceEvent,
			Data: json.RawMessage(`{"device_id":"dev-01","event":{"type":"door"}}`)},
		{Station: "st-1", TS: time.Now(), ClockSynced: true, Type: edged.EventRentalResult,
			Data: json.RawMessage(`{"rental_id":"live-1","device_id":"dev-01","op":"grant","ok":true}`)},
	}})
	if err != nil {
		t.Fatal(err)
	}
	device, result := evs[0].Seq, evs[1].Seq
	committed := time.Now()
	if seqs, _ := rec.eventSeqs(t, events, batch, u.maxBytes); highest(seqs) >= uint64(n-2*batch) {
		t.Skipf("the drain was at seq %d of %d when the result was committed: nothing left to overtake", highest(seqs), n)
	}
	waitFor(t, 60*time.Second, "the backlog and the fresh events drained", func() bool {
		seqs, _ := rec.eventSeqs(t, events, batch, u.maxBytes)
		return highest(seqs) == result
	})
	seqs, types := rec.eventSeqs(t, events, batch, u.maxBytes)
	if types[result] != string(edged.EventRentalResult) {
		t.Fatalf("seq %d is %s", result, types[result])
	}
	first := slices.Index(seqs, result)
	if h := highest(seqs[:first]); h >= device {
		t.Fatalf("the rental.result (seq %d) arrived after the drain reached seq %d", result, h)
	}
	rest := slices.Delete(slices.Clone(seqs), first, first+1)
	if slices.Contains(rest[:first], result) || slices.Contains(seqs[:first], device) {
		t.Fatalf("the device event or a second copy of the result went ahead")
	}
	checkOrder(t, rest, result, 0) // every seq in order, no gap, no other repeat

	// Where each copy arrived: messages and time between them.
	msgs := rec.messages(events)
	liveMsg, inOrderMsg := -1, -1
	for i, m := range msgs {
		var b struct{ Events []edged.Event }
		if batch == 1 {
			b.Events = make([]edged.Event, 1)
			err = json.Unmarshal(m.payload, &b.Events[0])
		} else {
			err = json.Unmarshal(m.payload, &b)
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range b.Events {
			if e.Seq == result && liveMsg < 0 {
				liveMsg = i
			} else if e.Seq == result {
				inOrderMsg = i
			}
		}
	}
	rec.mu.Lock()
	liveAt, inOrderAt := rec.at[liveMsg], rec.at[inOrderMsg]
	rec.mu.Unlock()
	noViolations(t, c)
	waitFor(t, 10*time.Second, "outbox released", func() bool { return db.OutboxStats(time.Now()).Events == 0 })
	st := u.Status()
	if st.LiveEvents != 1 || st.Connects != 1 || st.Refused != 0 {
		t.Errorf("status %+v: want 1 live event, 1 connect, nothing refused", st)
	}
	t.Logf("rental.result seq %d: live copy in message %d, %v after commit; in-order copy in message %d, %v later (%d events of backlog before it)",
		result, liveMsg, liveAt.Sub(committed).Round(time.Millisecond), inOrderMsg, inOrderAt.Sub(liveAt).Round(time.Millisecond),
		slices.Index(rest, result)-first)
}

// appendResult queues a rental.result on the fake outbox, as the station
// does when it answers a grant.
func (o *fakeOutbox) appendResult(id string) uint64 {
	o.mu.Lock()
	seq := o.nextSeq
	o.nextSeq++
	o.events = append(o.events, edged.Event{Seq: seq, Station: "st-1", Type: edged.EventRentalResult,
		TS: time.Unix(1700000000, 0), ClockSynced: true,
		Data: json.RawMessage(`{"rental_id":"` + id + `","device_id":"dev-01","op":"grant","ok":true}`)})
	o.mu.Unlock()
	select {
	case o.notify <- struct{}{}:
	default:
	}
	return seq
}

// TestLiveLaneLeavesRoomForTheDrain: rental results arriving faster than
// the cloud's rate during a drain (aws with bare envelopes: one result per
// message at 90/s, results at about 200/s) go ahead on the live lane, yet
// the drain still reaches the end of the backlog while they keep coming
// (the lane takes at most every other message), and every seq arrives in
// order.
func TestLiveLaneLeavesRoomForTheDrain(t *testing.T) {
	const n, batch = 100, 1
	c := startCloud(t, edged.ProfileAWS, t.TempDir(), "", cloudemu.Options{})
	events, _, _ := upTopics(edged.ProfileAWS)
	rec := record(t, c, events)
	s := newStation()
	s.outbox.Append(n, 20)
	cfg := cloudConfig(t, s, c, edged.ProfileAWS, c.URL())
	cfg.BatchEvents = batch
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	runUplink(t, u)
	waitFor(t, 30*time.Second, "the drain under way", func() bool {
		seqs, _ := rec.eventSeqs(t, events, batch, u.maxBytes)
		return highest(seqs) >= 1
	})
	stop := make(chan struct{})
	done := make(chan uint64)
	go func() {
		var last uint64
		defer func() { done <- last }()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			for j := range 10 {
				last = s.outbox.appendResult(fmt.Sprintf("burst-%d-%d", i, j))
			}
		}
	}()
	waitFor(t, 30*time.Second, "the backlog drained while results keep coming", func() bool {
		seqs, _ := rec.eventSeqs(t, events, batch, u.maxBytes)
		return highest(seqs) >= n
	})
	close(stop)
	last := <-done
	if st := u.Status(); st.LiveEvents == 0 {
		t.Fatalf("no result went on the live lane: %+v", st)
	}
	waitFor(t, 60*time.Second, "every result drained", func() bool {
		seqs, _ := rec.eventSeqs(t, events, batch, u.maxBytes)
		return highest(seqs) >= last
	})
	seqs, _ := rec.eventSeqs(t, events, batch, u.maxBytes)
	// Set the live copies aside (a seq arriving above the in-order high
	// mark); the rest is the drain: in order, no gap.
	var drain []uint64
	var high uint64
	live := 0
	for _, q := range seqs {
		if q > high+1 {
			live++
			continue
		}
		drain = append(drain, q)
		high = max(high, q)
	}
	checkOrder(t, drain, last, 0)
	noViolations(t, c)
	st := u.Status()
	t.Logf("%d results appended during the drain of %d events, %d sent ahead (%d live copies seen); %d messages, %d pacing waits",
		last-uint64(n), n, st.LiveEvents, live, st.MessagesSent, st.PacingWaits)
}
