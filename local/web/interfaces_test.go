package web_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/local/web"
)

// The page takes the real station and store; the compiler checks they
// still offer what it reads.
var (
	_ web.Station = (*edged.Station)(nil)
	_ web.History = edged.Store(nil)
)

// fakeStation is a station with two devices and one rental running, that
// records maintenance asked of it.
type fakeStation struct {
	mu    sync.Mutex
	maint map[string]bool
}

func (f *fakeStation) ID() string { return "fake-1" }

func (f *fakeStation) DeviceStates() []edged.DeviceState {
	return []edged.DeviceState{
		{DeviceID: "chair-1", Online: true, Status: edged.StatusInUse},
		{DeviceID: "chair-2", Status: edged.StatusFault},
	}
}

func (f *fakeStation) Device(id string) (edged.DeviceState, error) {
	for _, d := range f.DeviceStates() {
		if d.DeviceID == id {
			return d, nil
		}
	}
	return edged.DeviceState{}, edged.Errorf(edged.ENOTFOUND, "no device %s", id)
}

func (f *fakeStation) ActiveRentals() []edged.Rental {
	return []edged.Rental{{ID: "r-1", DeviceID: "chair-1", State: edged.RentalActive}}
}

// Stats has nil maps, as a station may before anything happened.
func (f *fakeStation) Stats() edged.StationStats { return edged.StationStats{Started: 1} }

func (f *fakeStation) SetMaintenance(ctx context.Context, id string, on bool) error {
	if _, err := f.Device(id); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.maint[id] = on
	return nil
}

func (f *fakeStation) EndRental(ctx context.Context, rentalID string, reason edged.Reason) error {
	return edged.Errorf(edged.ENOTFOUND, "no rental %s", rentalID)
}

// fakeHistory is a log of n events and no rentals. It is not the outbox,
// so the page must find the newest event by reading the log.
type fakeHistory struct{ n uint64 }

func (f fakeHistory) Rental(ctx context.Context, id string) (edged.Rental, error) {
	return edged.Rental{}, edged.Errorf(edged.ENOTFOUND, "no rental %s", id)
}

func (f fakeHistory) Rentals(ctx context.Context, limit int, states ...edged.RentalState) ([]edged.Rental, error) {
	return nil, nil
}

func (f fakeHistory) Events(ctx context.Context, after uint64, limit int) ([]edged.Event, error) {
	var out []edged.Event
	for seq := after + 1; seq <= f.n && len(out) < limit; seq++ {
		out = append(out, edged.Event{Seq: seq, Station: "fake-1", Type: edged.EventDeviceOnline})
	}
	return out, nil
}

// TestPageNeedsOnlyItsInterfaces serves the page from a station and a store
// that are neither edged's nor the bbolt one: what the technician sees
// comes from the small interfaces alone.
func TestPageNeedsOnlyItsInterfaces(t *testing.T) {
	st := &fakeStation{maint: map[string]bool{}}
	srv, err := web.New(web.Config{Listen: "127.0.0.1:0", Station: st, Store: fakeHistory{n: 2500},
		Clock: edged.SystemClock{}})
	if err != nil {
		t.Fatal(err)
	}
	do := func(method, path, body string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(method, path, strings.NewReader(body))
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		srv.Handler().ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			t.Fatalf("%s %s: %d %s", method, path, rec.Code, rec.Body)
		}
		return rec
	}

	var status struct {
		Station string
		Uplink  struct{ State string }
		Devices struct{ Total, Online, Fault int }
		Rentals struct{ Active int }
	}
	if err := json.Unmarshal(do("GET", "/api/v1/status", "").Body.Bytes(), &status); err != nil {
		t.Fatal(err)
	}
	if status.Station != "fake-1" || status.Uplink.State != "disabled" || status.Devices.Total != 2 ||
		status.Devices.Online != 1 || status.Devices.Fault != 1 || status.Rentals.Active != 1 {
		t.Errorf("status = %+v", status)
	}

	var evs []edged.Event
	if err := json.Unmarshal(do("GET", "/api/v1/events?limit=3", "").Body.Bytes(), &evs); err != nil {
		t.Fatal(err)
	}
	if len(evs) != 3 || evs[0].Seq != 2498 || evs[2].Seq != 2500 {
		t.Errorf("newest events = %+v, want seqs 2498..2500", evs)
	}

	do("POST", "/api/v1/devices/chair-2/maintenance", `{"on": true}`)
	st.mu.Lock()
	on := st.maint["chair-2"]
	st.mu.Unlock()
	if !on {
		t.Error("maintenance did not reach the station")
	}

	metrics := do("GET", "/metrics", "").Body.String()
	for _, want := range []string{`edged_rentals_ended_total{reason="expired"} 0`, "edged_rentals_started_total 1",
		`edged_devices_status{status="fault"} 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}
