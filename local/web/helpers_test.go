package web_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/local/web"
	"github.com/stationedge/edged/store"
)

// The technician of the tests. The password and its hash must never show
// in a response or a log line.
const (
	techUser     = "tech"
	techPassword = "s3cret-Pa55-for-tests"
)

var techHash = func() string {
	h, err := bcrypt.GenerateFromPassword([]byte(techPassword), bcrypt.MinCost)
	if err != nil {
		panic(err)
	}
	return string(h)
}()

// fakeDevices is the device link: it records commands sent.
type fakeDevices struct {
	mu   sync.Mutex
	sent []sentCommand
}

type sentCommand struct {
	Device string
	Cmd    edged.DeviceCommand
}

func (f *fakeDevices) Send(ctx context.Context, id string, c edged.DeviceCommand) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sent = append(f.sent, sentCommand{id, c})
	return nil
}

// last returns the last command sent to device id with action, if any.
func (f *fakeDevices) last(id, action string) (edged.DeviceCommand, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(f.sent) - 1; i >= 0; i-- {
		if s := f.sent[i]; s.Device == id && s.Cmd.Action == action {
			return s.Cmd, true
		}
	}
	return edged.DeviceCommand{}, false
}

// fakeSources are the uplink, bus and broker figures, changeable while the
// server runs.
type fakeSources struct {
	mu     sync.Mutex
	uplink edged.UplinkStatus
	buses  []edged.BusHealth
	broker edged.BrokerStats
	health error
}

func (f *fakeSources) Uplink() edged.UplinkStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.uplink
}

func (f *fakeSources) Buses() []edged.BusHealth {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]edged.BusHealth(nil), f.buses...)
}

func (f *fakeSources) Broker() edged.BrokerStats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.broker
}

func (f *fakeSources) Healthy() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.health
}

func (f *fakeSources) set(fn func(f *fakeSources)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

// syncBuffer is a log sink safe for the server's goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// station is a real Station on a real store, a web server in front of it,
// and the fakes around them.
type station struct {
	t       *testing.T
	db      *store.DB
	st      *edged.Station
	dev     *fakeDevices
	src     *fakeSources
	srv     *web.Server
	log     *syncBuffer
	base    string
	users   []edged.HTTPUser
	bodies  *syncBuffer // every response body read by the helpers
	started time.Time
}

type stationOpt func(*stationOptions)

type stationOptions struct {
	users     []edged.HTTPUser
	devices   []edged.Device
	verifyKey []byte
}

func noUsers(o *stationOptions) { o.users = nil }

func withDevices(d ...edged.Device) stationOpt {
	return func(o *stationOptions) { o.devices = d }
}

var ctx = context.Background()

func newStation(t *testing.T, opts ...stationOpt) *station {
	t.Helper()
	o := stationOptions{
		users: []edged.HTTPUser{{Name: techUser, PasswordHash: techHash}},
		devices: []edged.Device{
			{ID: "chair-1", Kind: "chair", Transport: edged.TransportMQTT, Location: &edged.Location{Lat: 48.8584, Lon: 2.2945}},
			{ID: "chair-2", Kind: "chair", Transport: edged.TransportMQTT},
			{ID: "chair-3", Kind: "chair", Transport: edged.TransportMQTT},
			{ID: "charger-7", Kind: "charger", Transport: edged.TransportSerial, Bus: "bus0", Unit: 7},
		},
	}
	for _, f := range opts {
		f(&o)
	}
	s := &station{t: t, dev: &fakeDevices{}, log: &syncBuffer{}, bodies: &syncBuffer{}, users: o.users,
		src: &fakeSources{uplink: edged.UplinkStatus{State: "connecting"}}, started: time.Now()}
	db, err := store.Open(filepath.Join(t.TempDir(), "edged.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s.db = db
	logger := slog.New(slog.NewTextHandler(s.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	clock := edged.SystemClock{AssumeSynced: true}
	st, err := edged.NewStation(edged.StationOptions{ID: "mall-1", Devices: o.devices, Store: db,
		Commander: s.dev, Clock: clock, VerifyKey: o.verifyKey, Logger: logger.With("system", "rentals")})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Open(ctx); err != nil {
		t.Fatal(err)
	}
	s.st = st
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := web.New(web.Config{
		Listener: ln, Users: o.users, Station: st, Store: db,
		Uplink: s.src.Uplink, Buses: s.src.Buses, Broker: s.src.Broker, Healthy: s.src.Healthy,
		Clock: clock, StationName: "Mall of Tests", Version: "1.2.3-test", StartedAt: s.started,
		Logger: logger.With("system", "http"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	s.srv = srv
	s.base = "http://" + srv.Addr().String()
	return s
}

// online brings a device online with a status.
func (s *station) online(id string, status edged.Status) {
	s.t.Helper()
	if err := s.st.DeviceOnline(ctx, id, true); err != nil {
		s.t.Fatal(err)
	}
	if err := s.st.DeviceState(ctx, id, edged.StateReport{Status: status}); err != nil {
		s.t.Fatal(err)
	}
}

// grant sends a grant from the cloud.
func (s *station) grant(rentalID, deviceID, renterID string, durationS int) {
	s.t.Helper()
	b, _ := json.Marshal(map[string]any{"op": "grant", "rental_id": rentalID, "device_id": deviceID,
		"renter_id": renterID, "duration_s": durationS})
	if err := s.st.Rental(ctx, b); err != nil {
		s.t.Fatal(err)
	}
}

// startRental grants a rental and has the device acknowledge its start.
func (s *station) startRental(rentalID, deviceID, renterID string, durationS int) {
	s.t.Helper()
	s.grant(rentalID, deviceID, renterID, durationS)
	c, ok := s.dev.last(deviceID, edged.ActionStart)
	if !ok || c.RentalID != rentalID {
		s.t.Fatalf("no start sent for %s: %+v", rentalID, c)
	}
	if err := s.st.DeviceAck(ctx, deviceID, edged.CommandAck{CmdID: c.CmdID, OK: true}); err != nil {
		s.t.Fatal(err)
	}
}

// events returns the logged events of type typ, data decoded.
func (s *station) events(typ edged.EventType) []map[string]any {
	s.t.Helper()
	evs, err := s.db.Events(ctx, 0, 10000)
	if err != nil {
		s.t.Fatal(err)
	}
	var out []map[string]any
	for _, e := range evs {
		if e.Type != typ {
			continue
		}
		var d map[string]any
		if err := json.Unmarshal(e.Data, &d); err != nil {
			s.t.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

func basic(user, password string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))
}

// req is one request of a test: the technician's credentials unless
// auth says otherwise ("" for none).
type req struct {
	method, path string
	body         string
	ctype        string
	auth         *string
	header       map[string]string
}

type resp struct {
	code   int
	header http.Header
	body   []byte
}

func (s *station) do(r req) resp {
	s.t.Helper()
	if r.method == "" {
		r.method = http.MethodGet
	}
	var body io.Reader
	if r.body != "" {
		body = strings.NewReader(r.body)
	}
	hr, err := http.NewRequest(r.method, s.base+r.path, body)
	if err != nil {
		s.t.Fatal(err)
	}
	switch {
	case r.auth != nil && *r.auth != "":
		hr.Header.Set("Authorization", *r.auth)
	case r.auth == nil && len(s.users) > 0:
		hr.SetBasicAuth(techUser, techPassword)
	}
	if r.ctype != "" {
		hr.Header.Set("Content-Type", r.ctype)
	}
	for k, v := range r.header {
		hr.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(hr)
	if err != nil {
		s.t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		s.t.Fatal(err)
	}
	fmt.Fprintf(s.bodies, "%s %s -> %d %v\n%s\n", r.method, r.path, res.StatusCode, res.Header, b)
	return resp{code: res.StatusCode, header: res.Header, body: b}
}

// get fetches path as the technician, wants 200 and decodes JSON into v.
func (s *station) get(path string, v any) {
	s.t.Helper()
	r := s.do(req{path: path})
	if r.code != http.StatusOK {
		s.t.Fatalf("GET %s: %d %s", path, r.code, r.body)
	}
	if err := json.Unmarshal(r.body, v); err != nil {
		s.t.Fatalf("GET %s: %v in %s", path, err, r.body)
	}
}

// wantError checks that r is an error of status code with a JSON body.
func wantError(t *testing.T, what string, r resp, code int) {
	t.Helper()
	if r.code != code {
		t.Errorf("%s: status %d, want %d (%s)", what, r.code, code, r.body)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type %q, want application/json", what, ct)
	}
	var e struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(r.body, &e); err != nil || e.Error == "" {
		t.Errorf("%s: body %s is not {\"error\": \"...\"}", what, r.body)
	}
}

func strp(s string) *string { return &s }
