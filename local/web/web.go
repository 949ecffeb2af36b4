// Package web is the technicians' HTTP side of edged (contract §7): the
// status page, the JSON API, Prometheus metrics and /healthz, behind HTTP
// Basic auth.
//
// It reads the station and the store through the small interfaces Station
// and History, and the uplink, the serial buses and the local broker
// through the funcs of Config returning edged's status types, so it
// imports none of those packages.
package web

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/bcrypt"

	"github.com/stationedge/edged"
)

// Config configures a Server.
type Config struct {
	// Listen is http.listen, such as "127.0.0.1:8080".
	Listen string
	// Listener, when set, is used instead of listening on Listen (tests
	// pass one on 127.0.0.1:0).
	Listener net.Listener
	// Users are the technicians allowed in. With none, no auth is asked,
	// and New refuses any address but a loopback one.
	Users []edged.HTTPUser
	// Station is read for devices, rentals and counters, and asked for
	// maintenance and operator ends.
	Station Station
	// Store gives events and rentals of the past. When it is also the
	// outbox (it has OutboxStats), the page shows the queue from it while
	// there is no uplink.
	Store History
	// Uplink reports the cloud link; nil means offline-only operation.
	Uplink func() edged.UplinkStatus
	// Buses reports the RS-485 buses; nil means there are none.
	Buses func() []edged.BusHealth
	// Broker reports the local broker's counters; nil means none.
	Broker func() edged.BrokerStats
	// DeviceList says where the device list came from and the last
	// refused reload or registry; nil means the config, never reloaded.
	DeviceList func() DeviceListView
	// Healthy is nil while the store is writable and the broker is
	// serving (/healthz); nil means always healthy.
	Healthy func() error
	Clock   edged.Clock
	// StationID, StationName and Version are shown on the page and in
	// /api/v1/status.
	StationID, StationName, Version string
	// StartedAt is when the daemon started, for uptime.
	StartedAt time.Time
	Logger    *slog.Logger
}

// Station is what the page reads of the station and asks of it;
// *edged.Station is one. It is declared here, where it is used, so the
// page depends on these seven methods and nothing else of the station.
type Station interface {
	ID() string
	DeviceStates() []edged.DeviceState
	// Device errors: ENOTFOUND.
	Device(id string) (edged.DeviceState, error)
	ActiveRentals() []edged.Rental
	Stats() edged.StationStats
	// SetMaintenance errors: ENOTFOUND, EUNAVAILABLE.
	SetMaintenance(ctx context.Context, id string, on bool) error
	// EndRental errors: ENOTFOUND, EUNAVAILABLE.
	EndRental(ctx context.Context, rentalID string, reason edged.Reason) error
}

// History is the part of the store the page reads: rentals and the event
// log of the past. Any edged.Store is one; the page never writes to it.
type History interface {
	// Rental errors: ENOTFOUND.
	Rental(ctx context.Context, id string) (edged.Rental, error)
	Rentals(ctx context.Context, limit int, states ...edged.RentalState) ([]edged.Rental, error)
	Events(ctx context.Context, after uint64, limit int) ([]edged.Event, error)
}

// Server timeouts: short, against slow clients holding connections open
// on a small gateway.
const (
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 60 * time.Second
	maxHeaderBytes    = 16 << 10
	shutdownTimeout   = 3 * time.Second
)

// Server is the technicians' HTTP server. Create it with New, then Start;
// Close stops it.
type Server struct {
	cfg     Config
	log     *slog.Logger
	auth    atomic.Pointer[authenticator] // swapped whole by SetUsers
	reg     *prometheus.Registry
	handler http.Handler
	srv     *http.Server

	mu   sync.Mutex
	ln   net.Listener
	done chan struct{} // closed when Serve returns
}

// New checks cfg and builds the server. Errors: EINVALID when cfg lacks the
// station, store or clock, when a user's hash is not a bcrypt hash, or when
// there are no users and the address is not loopback.
func New(cfg Config) (*Server, error) {
	if cfg.Station == nil || cfg.Store == nil || cfg.Clock == nil {
		return nil, edged.Errorf(edged.EINVALID, "http: needs a station, a store and a clock")
	}
	if cfg.Listener == nil && cfg.Listen == "" {
		return nil, edged.Errorf(edged.EINVALID, "http: no listen address")
	}
	if len(cfg.Users) == 0 {
		addr := cfg.Listen
		if cfg.Listener != nil {
			addr = cfg.Listener.Addr().String()
		}
		if !edged.LoopbackAddr(addr) {
			return nil, edged.Errorf(edged.EINVALID, "http: with no http.users, edged listens only on a loopback address, not %q", addr)
		}
	}
	seen := map[string]bool{}
	for i, u := range cfg.Users {
		if u.Name == "" || seen[u.Name] {
			return nil, edged.Errorf(edged.EINVALID, "http.users[%d]: missing or repeated name", i)
		}
		seen[u.Name] = true
		if _, err := bcrypt.Cost([]byte(u.PasswordHash)); err != nil {
			// Never echo the hash.
			return nil, edged.Errorf(edged.EINVALID, "http.users[%d] (%s): password_hash is not a bcrypt hash", i, u.Name)
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.StationID == "" {
		cfg.StationID = cfg.Station.ID()
	}
	if cfg.Version == "" {
		cfg.Version = edged.Version
	}
	if cfg.StartedAt.IsZero() {
		cfg.StartedAt = cfg.Clock.Now()
	}
	s := &Server{cfg: cfg, log: cfg.Logger}
	s.auth.Store(newAuthenticator(cfg.Users, s.log))
	s.reg = s.newRegistry()
	s.handler = s.routes()
	s.srv = &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	return s, nil
}

// Handler returns the server's handler, for tests and embedding.
func (s *Server) Handler() http.Handler { return s.handler }

// Start listens (unless Config.Listener was given) and serves in the
// background; it returns once connections are accepted. ctx bounds the
// listening only: Close stops the server.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done != nil {
		return edged.Errorf(edged.ECONFLICT, "http: already started")
	}
	ln := s.cfg.Listener
	if ln == nil {
		var lc net.ListenConfig
		l, err := lc.Listen(ctx, "tcp", s.cfg.Listen)
		if err != nil {
			return fmt.Errorf("http: listen: %w", err)
		}
		ln = l
	}
	s.srv.BaseContext = func(net.Listener) context.Context { return context.WithoutCancel(ctx) }
	s.ln = ln
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("http server stopped", "err", err)
		}
	}()
	s.log.Info("http serving", "addr", ln.Addr().String(), "auth", len(s.cfg.Users) > 0)
	return nil
}

// Addr returns the address the server listens on, nil before Start.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Close stops the server: it lets requests in flight finish for a few
// seconds, then closes what is left.
func (s *Server) Close() error {
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		err = s.srv.Close()
	}
	if done != nil {
		<-done
	}
	if err != nil {
		return fmt.Errorf("http: close: %w", err)
	}
	return nil
}
