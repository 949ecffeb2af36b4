package web

import (
	"context"
	"encoding/json"
	"errors"
	"mime"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/stationedge/edged"
)

// API limits.
const (
	defaultLimit = 100
	maxLimit     = 1000
	maxBody      = 4 << 10
	// actionTimeout bounds a technician's action once accepted: it is not
	// cut short when the browser goes away, so it is applied or not at all.
	actionTimeout = 10 * time.Second
)

// routes builds the handler: security headers, cross-origin protection
// and auth around the routes of §7.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.page)
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(staticFS)))
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{
		ErrorLog: promLogger{s.log}, ErrorHandling: promhttp.ContinueOnError,
	}))
	mux.HandleFunc("GET /api/v1/status", s.getStatus)
	mux.HandleFunc("GET /api/v1/devices", s.getDevices)
	mux.HandleFunc("GET /api/v1/devices/{id}", s.getDevice)
	mux.HandleFunc("POST /api/v1/devices/{id}/maintenance", s.postMaintenance)
	mux.HandleFunc("GET /api/v1/rentals", s.getRentals)
	mux.HandleFunc("POST /api/v1/rentals/{id}/end", s.postEndRental)
	mux.HandleFunc("GET /api/v1/events", s.getEvents)

	// Unmatched paths and methods get the mux's status (404, or 405 with
	// Allow) with a JSON body.
	var h http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := mux.Handler(r); pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		c := &statusCapture{header: http.Header{}}
		mux.ServeHTTP(c, r)
		if allow := c.header.Get("Allow"); allow != "" {
			w.Header().Set("Allow", allow)
		}
		code := c.code
		if code == 0 || code == http.StatusOK {
			code = http.StatusNotFound
		}
		writeError(w, code, http.StatusText(code))
	})
	inner := h
	h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.auth.Load().wrap(inner).ServeHTTP(w, r) // the users of this moment
	})
	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusForbidden, "cross-origin request refused")
	}))
	h = cop.Handler(h)
	return securityHeaders(h)
}

// statusCapture records the status and headers the mux would send.
type statusCapture struct {
	header http.Header
	code   int
}

func (c *statusCapture) Header() http.Header         { return c.header }
func (c *statusCapture) Write(b []byte) (int, error) { return len(b), nil }
func (c *statusCapture) WriteHeader(code int)        { c.code = code }

// csp allows nothing but the page's own script, style and API; no inline
// script or style, no framing.
const csp = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; " +
	"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

func securityHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", csp)
		h.Set("X-Frame-Options", "DENY")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		if len(r.URL.Path) > 8 && r.URL.Path[:8] == "/static/" {
			h.Set("Cache-Control", "no-cache")
		} else {
			h.Set("Cache-Control", "no-store")
		}
		next.ServeHTTP(w, r)
	})
}

type errorBody struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code, b = http.StatusInternalServerError, []byte(`{"error":"internal error"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, errorBody{Error: msg})
}

// httpStatus maps an edged error code to an HTTP status.
func httpStatus(code string) int {
	switch code {
	case edged.EINVALID:
		return http.StatusBadRequest
	case edged.ENOTFOUND:
		return http.StatusNotFound
	case edged.ECONFLICT:
		return http.StatusConflict
	case edged.EUNAVAILABLE:
		return http.StatusServiceUnavailable
	default:
		return http.StatusInternalServerError
	}
}

// fail writes err as JSON with its status; internal errors are logged and
// reported without detail.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	code := httpStatus(edged.ErrorCode(err))
	if code >= 500 {
		s.log.Error("http request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeError(w, code, edged.ErrorMessage(err))
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if s.cfg.Healthy != nil {
		if err := s.cfg.Healthy(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte(err.Error() + "\n"))
			return
		}
	}
	_, _ = w.Write([]byte("ok\n"))
}

// OutboxView is the queue of events not yet delivered upstream (§7).
type OutboxView struct {
	Events     int    `json:"events"`
	Bytes      int64  `json:"bytes"`
	OldestAgeS int64  `json:"oldest_age_s"`
	Dropped    uint64 `json:"dropped"`
}

// UplinkView is the "uplink" of /api/v1/status.
type UplinkView struct {
	State          string     `json:"state"`
	ConnectedSince *time.Time `json:"connected_since"`
	Outbox         OutboxView `json:"outbox"`
	LastAckedSeq   uint64     `json:"last_acked_seq"`
	Reconnects     int        `json:"reconnects"`
	LastError      string     `json:"last_error,omitempty"`
	// The cloud profile (§3.5) and what went up through it.
	Profile      string `json:"profile"`
	Identity     string `json:"identity"`
	MessagesSent uint64 `json:"messages_sent"`
	EventsSent   uint64 `json:"events_sent"`
	Batches      uint64 `json:"batches"`
	PacingWaits  uint64 `json:"pacing_waits"`
	Refused      uint64 `json:"refused"`
	LiveEvents   uint64 `json:"live_events"`
	DownHeld     uint64 `json:"down_held"`
}

// DeviceCounts is the "devices" of /api/v1/status.
type DeviceCounts struct {
	Total       int `json:"total"`
	Online      int `json:"online"`
	InUse       int `json:"in_use"`
	Fault       int `json:"fault"`
	Maintenance int `json:"maintenance"`
}

// BusView is one bus in /api/v1/status.
type BusView struct {
	Name        string          `json:"name"`
	Port        string          `json:"port"`
	PortOpen    bool            `json:"port_open"`
	Opens       uint64          `json:"opens"`
	PortErrors  uint64          `json:"port_errors"`
	Requests    uint64          `json:"requests"`
	Timeouts    uint64          `json:"timeouts"`
	CRCErrors   uint64          `json:"crc_errors"`
	FrameErrors uint64          `json:"frame_errors"`
	Exceptions  uint64          `json:"exceptions"`
	FailedPolls uint64          `json:"failed_polls"`
	LastError   string          `json:"last_error,omitempty"`
	LastErrorAt *time.Time      `json:"last_error_at,omitempty"`
	Devices     []BusDeviceView `json:"devices"`
}

// BusDeviceView is one serial device of a bus.
type BusDeviceView struct {
	DeviceID    string  `json:"device_id"`
	Unit        int     `json:"unit"`
	State       string  `json:"state"`
	Requests    uint64  `json:"requests"`
	Timeouts    uint64  `json:"timeouts"`
	CRCErrors   uint64  `json:"crc_errors"`
	FailedPolls uint64  `json:"failed_polls"`
	PollPeriodS float64 `json:"poll_period_s"`
	LastError   string  `json:"last_error,omitempty"`
}

// BrokerView is the local broker in /api/v1/status.
type BrokerView struct {
	Connected    int    `json:"connected"`
	MessagesIn   uint64 `json:"messages_in"`
	MessagesOut  uint64 `json:"messages_out"`
	AuthFailures uint64 `json:"auth_failures"`
	ACLDenials   uint64 `json:"acl_denials"`
	BadInput     uint64 `json:"bad_input"`
}

// StatusView is the body of GET /api/v1/status: the fields of §7, then
// edged's own.
type StatusView struct {
	Station     string       `json:"station"`
	Version     string       `json:"version"`
	UptimeS     int64        `json:"uptime_s"`
	ClockSynced bool         `json:"clock_synced"`
	Uplink      UplinkView   `json:"uplink"`
	Devices     DeviceCounts `json:"devices"`
	Rentals     struct {
		Active int `json:"active"`
	} `json:"rentals"`

	StationName      string      `json:"station_name"`
	Now              time.Time   `json:"now"`
	Buses            []BusView   `json:"buses"`
	Broker           *BrokerView `json:"broker,omitempty"`
	HTTPAuthFailures uint64      `json:"http_auth_failures"`
	// DeviceList is where the device list came from (§3.6, §9).
	DeviceList *DeviceListView `json:"device_list,omitempty"`
}

// DeviceListView is where the device list came from: "config" or
// "registry" (with its version), when it was applied, and the last
// reload or registry refused, with its reason.
type DeviceListView struct {
	From        string       `json:"from"`
	Version     uint64       `json:"version,omitempty"`
	AppliedAt   time.Time    `json:"applied_at"`
	LastRefusal *RefusalView `json:"last_refusal,omitempty"`
}

// RefusalView is a refused reload or registry.
type RefusalView struct {
	At      time.Time `json:"at"`
	What    string    `json:"what"`
	Version uint64    `json:"version,omitempty"`
	Reason  string    `json:"reason"`
	Errors  []string  `json:"errors,omitempty"`
}

// outboxStatser is what a Store that is also the outbox offers.
type outboxStatser interface {
	OutboxStats(now time.Time) edged.OutboxStats
}

// uplinkStatus is the uplink's status, "disabled" with the store's outbox
// figures when there is no uplink.
func (s *Server) uplinkStatus() edged.UplinkStatus {
	if s.cfg.Uplink != nil {
		return s.cfg.Uplink()
	}
	u := edged.UplinkStatus{State: "disabled"}
	if o, ok := s.cfg.Store.(outboxStatser); ok {
		u.Outbox = o.OutboxStats(s.cfg.Clock.Now())
	}
	return u
}

func (s *Server) buses() []edged.BusHealth {
	if s.cfg.Buses == nil {
		return nil
	}
	return s.cfg.Buses()
}

func countDevices(states []edged.DeviceState) DeviceCounts {
	c := DeviceCounts{Total: len(states)}
	for _, d := range states {
		if d.Online {
			c.Online++
		}
		switch d.Status {
		case edged.StatusInUse:
			c.InUse++
		case edged.StatusFault:
			c.Fault++
		}
		if d.Maintenance {
			c.Maintenance++
		}
	}
	return c
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

func (s *Server) status() StatusView {
	now := s.cfg.Clock.Now()
	u := s.uplinkStatus()
	v := StatusView{
		Station: s.cfg.StationID, StationName: s.cfg.StationName, Version: s.cfg.Version,
		UptimeS:     int64(now.Sub(s.cfg.StartedAt) / time.Second),
		ClockSynced: s.cfg.Clock.Synced(),
		Now:         now.UTC().Round(time.Millisecond),
		Uplink: UplinkView{
			State: u.State, ConnectedSince: timePtr(u.ConnectedSince),
			Outbox: OutboxView{Events: u.Outbox.Events, Bytes: u.Outbox.Bytes,
				OldestAgeS: u.Outbox.OldestAgeS, Dropped: u.Outbox.Dropped},
			LastAckedSeq: u.LastAckedSeq, Reconnects: u.Reconnects, LastError: u.LastError,
			Profile: u.Profile, Identity: u.Identity, MessagesSent: u.MessagesSent, EventsSent: u.EventsSent,
			Batches: u.Batches, PacingWaits: u.PacingWaits, Refused: u.Refused,
			LiveEvents: u.LiveEvents, DownHeld: u.DownHeld,
		},
		Devices:          countDevices(s.cfg.Station.DeviceStates()),
		Buses:            []BusView{},
		HTTPAuthFailures: s.auth.Load().Failures(),
	}
	v.Rentals.Active = len(s.cfg.Station.ActiveRentals())
	for _, b := range s.buses() {
		bv := BusView{Name: b.Name, Port: b.Port, PortOpen: b.PortOpen, Opens: b.Opens, PortErrors: b.PortErrors,
			Requests: b.Requests, Timeouts: b.Timeouts, CRCErrors: b.CRCErrors, FrameErrors: b.FrameErrors,
			Exceptions: b.Exceptions, FailedPolls: b.FailedPolls, LastError: b.LastError,
			LastErrorAt: timePtr(b.LastErrorAt), Devices: []BusDeviceView{}}
		for _, d := range b.Devices {
			bv.Devices = append(bv.Devices, BusDeviceView{DeviceID: d.DeviceID, Unit: d.Unit, State: d.State,
				Requests: d.Requests, Timeouts: d.Timeouts, CRCErrors: d.CRCErrors, FailedPolls: d.FailedPolls,
				PollPeriodS: d.PollPeriod.Seconds(), LastError: d.LastError})
		}
		v.Buses = append(v.Buses, bv)
	}
	if s.cfg.DeviceList != nil {
		dl := s.cfg.DeviceList()
		v.DeviceList = &dl
	}
	if s.cfg.Broker != nil {
		b := s.cfg.Broker()
		v.Broker = &BrokerView{Connected: b.Connected, MessagesIn: b.MessagesIn, MessagesOut: b.MessagesOut,
			AuthFailures: b.AuthFailures, ACLDenials: b.ACLDenials, BadInput: b.BadInput}
	}
	return v
}

func (s *Server) getStatus(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.status())
}

// DeviceView is a device's state as in §3.4, plus the time its rental has
// left by the station's monotonic clock (the page counts it down, so a
// phone with a wrong clock still shows the right time).
type DeviceView struct {
	edged.DeviceState
	TimeLeftS *int64 `json:"time_left_s,omitempty"`
	// RentalState is "starting" until the device acknowledges start.
	RentalState edged.RentalState `json:"rental_state,omitempty"`
	// RentalVia is "device" for a rental relayed by the device (§2): the
	// page marks it.
	RentalVia string `json:"rental_via,omitempty"`
}

func (s *Server) devices() []DeviceView {
	live := map[string]edged.Rental{}
	for _, r := range s.cfg.Station.ActiveRentals() {
		live[r.DeviceID] = r
	}
	states := s.cfg.Station.DeviceStates()
	out := make([]DeviceView, 0, len(states))
	for _, d := range states {
		out = append(out, s.deviceView(d, live))
	}
	return out
}

func (s *Server) deviceView(d edged.DeviceState, live map[string]edged.Rental) DeviceView {
	v := DeviceView{DeviceState: d}
	if r, ok := live[d.DeviceID]; ok {
		v.RentalState, v.RentalVia = r.State, r.Via
		if r.State == edged.RentalActive {
			left := secondsUp(r.Remaining(r.Used))
			v.TimeLeftS = &left
		}
	}
	return v
}

// secondsUp rounds d up to whole seconds, so time left shows 0 only when
// it is over.
func secondsUp(d time.Duration) int64 { return int64((d + time.Second - 1) / time.Second) }

func (s *Server) getDevices(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.devices())
}

func (s *Server) getDevice(w http.ResponseWriter, r *http.Request) {
	d, err := s.cfg.Station.Device(r.PathValue("id"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	live := map[string]edged.Rental{}
	for _, rr := range s.cfg.Station.ActiveRentals() {
		live[rr.DeviceID] = rr
	}
	writeJSON(w, http.StatusOK, s.deviceView(d, live))
}

// decodeBody decodes a small JSON object body into v: 415 unless the
// content type is JSON (which also keeps plain HTML forms out), 400 when
// it is not the object expected.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) (int, string) {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "application/json" {
		return http.StatusUnsupportedMediaType, "the body must be JSON (Content-Type: application/json)"
	}
	d := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return http.StatusRequestEntityTooLarge, "body too large"
		}
		return http.StatusBadRequest, "bad JSON body: " + err.Error()
	}
	if d.More() {
		return http.StatusBadRequest, "bad JSON body: trailing data"
	}
	return 0, ""
}

// user is the technician making r, for the log.
func user(r *http.Request) string {
	if u, _, ok := r.BasicAuth(); ok {
		return printable(u)
	}
	return ""
}

func (s *Server) postMaintenance(w http.ResponseWriter, r *http.Request) {
	var body struct {
		On *bool `json:"on"`
	}
	if code, msg := decodeBody(w, r, &body); code != 0 {
		writeError(w, code, msg)
		return
	}
	if body.On == nil {
		writeError(w, http.StatusBadRequest, `the body must be {"on": true|false}`)
		return
	}
	id := r.PathValue("id")
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), actionTimeout)
	defer cancel()
	if err := s.cfg.Station.SetMaintenance(ctx, id, *body.On); err != nil {
		s.fail(w, r, err)
		return
	}
	s.log.Info("maintenance set by technician", "device", id, "on", *body.On, "user", user(r))
	s.getDevice(w, r)
}

// RentalView is a rental in the API, durations in whole seconds.
type RentalView struct {
	RentalID  string            `json:"rental_id"`
	DeviceID  string            `json:"device_id"`
	RenterID  string            `json:"renter_id"`
	State     edged.RentalState `json:"state"`
	DurationS int64             `json:"duration_s"`
	UsedS     int64             `json:"used_s"`
	// TimeLeftS is counted on the station's monotonic clock; 0 once over.
	TimeLeftS int64        `json:"time_left_s"`
	GrantedAt time.Time    `json:"granted_at"`
	StartedAt *time.Time   `json:"started_at"`
	EndsAt    *time.Time   `json:"ends_at"`
	EndedAt   *time.Time   `json:"ended_at"`
	Reason    edged.Reason `json:"reason,omitempty"`
	// Via is "device" for a rental relayed by the device (§2).
	Via string `json:"via,omitempty"`
}

func rentalView(r edged.Rental) RentalView {
	v := RentalView{RentalID: r.ID, DeviceID: r.DeviceID, RenterID: r.RenterID, State: r.State,
		DurationS: secondsUp(r.Duration), UsedS: int64(r.Used / time.Second),
		GrantedAt: r.GrantedAt.UTC(), StartedAt: timePtr(r.StartedAt), EndsAt: timePtr(r.EndsAt),
		EndedAt: timePtr(r.EndedAt), Reason: r.Reason, Via: r.Via}
	switch r.State {
	case edged.RentalActive:
		v.TimeLeftS = secondsUp(r.Remaining(r.Used))
	case edged.RentalStarting:
		v.TimeLeftS = v.DurationS
	}
	return v
}

// intParam parses an optional decimal query parameter within [min, max].
func intParam(r *http.Request, name string, def, min, max uint64) (uint64, bool) {
	s := r.URL.Query().Get(name)
	if s == "" {
		return def, true
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n < min || n > max {
		return 0, false
	}
	return n, true
}

func (s *Server) getRentals(w http.ResponseWriter, r *http.Request) {
	limit, ok := intParam(r, "limit", defaultLimit, 1, maxLimit)
	if !ok {
		writeError(w, http.StatusBadRequest, "limit must be a whole number from 1 to 1000")
		return
	}
	live := s.cfg.Station.ActiveRentals()
	out := []RentalView{}
	state := r.URL.Query().Get("state")
	switch state {
	case "", "active":
		for _, rr := range live {
			out = append(out, rentalView(rr))
		}
		if len(out) > int(limit) {
			out = out[:limit]
		}
	case "all", string(edged.RentalEnded), string(edged.RentalRejected), string(edged.RentalStarting):
		var states []edged.RentalState
		if state != "all" {
			states = []edged.RentalState{edged.RentalState(state)}
		}
		stored, err := s.cfg.Store.Rentals(r.Context(), int(limit), states...)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		byID := map[string]edged.Rental{}
		for _, rr := range live {
			byID[rr.ID] = rr
		}
		for _, rr := range stored {
			if l, ok := byID[rr.ID]; ok && l.State == rr.State {
				rr = l // the live copy has the time used now, not at the checkpoint
			}
			out = append(out, rentalView(rr))
		}
	default:
		writeError(w, http.StatusBadRequest, "state must be active, all, starting, ended or rejected")
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) postEndRental(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), actionTimeout)
	defer cancel()
	err := s.cfg.Station.EndRental(ctx, id, edged.ReasonOperator)
	if edged.ErrorCode(err) == edged.ENOTFOUND {
		if prev, serr := s.cfg.Store.Rental(ctx, id); serr == nil {
			writeError(w, http.StatusConflict, "rental "+strconv.Quote(id)+" is not running: it is "+string(prev.State))
			return
		}
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.log.Info("rental ended by technician", "rental", id, "user", user(r))
	rr, err := s.cfg.Store.Rental(ctx, id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, rentalView(rr))
}

func (s *Server) getEvents(w http.ResponseWriter, r *http.Request) {
	limit, ok := intParam(r, "limit", defaultLimit, 1, maxLimit)
	if !ok {
		writeError(w, http.StatusBadRequest, "limit must be a whole number from 1 to 1000")
		return
	}
	var after uint64
	if r.URL.Query().Has("after") {
		a, ok := intParam(r, "after", 0, 0, 1<<63)
		if !ok {
			writeError(w, http.StatusBadRequest, "after must be a seq: a whole number")
			return
		}
		after = a
	} else {
		// No after: the newest events, still oldest first.
		last, err := s.lastSeq(r.Context())
		if err != nil {
			s.fail(w, r, err)
			return
		}
		if last > limit {
			after = last - limit
		}
	}
	evs, err := s.cfg.Store.Events(r.Context(), after, int(limit))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if evs == nil {
		evs = []edged.Event{}
	}
	writeJSON(w, http.StatusOK, evs)
}

// lastSeq is the seq of the newest event in the log.
func (s *Server) lastSeq(ctx context.Context) (uint64, error) {
	if o, ok := s.cfg.Store.(outboxStatser); ok {
		return o.OutboxStats(s.cfg.Clock.Now()).LastSeq, nil
	}
	if s.cfg.Uplink != nil {
		return s.cfg.Uplink().Outbox.LastSeq, nil
	}
	// A store that cannot say: walk the log.
	var last uint64
	for {
		evs, err := s.cfg.Store.Events(ctx, last, maxLimit)
		if err != nil {
			return 0, err
		}
		if len(evs) == 0 {
			return last, nil
		}
		last = evs[len(evs)-1].Seq
	}
}
