package web_test

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/local/web"
	"github.com/stationedge/edged/store"
)

type fuzzClock struct{}

func (fuzzClock) Now() time.Time { return time.Now() }
func (fuzzClock) Synced() bool   { return true }

// FuzzQuery: whatever path and query a technician's browser (or anyone on
// the LAN) sends, the API never panics, never answers 5xx on a working
// store, never lets an unauthenticated request past /healthz, and answers
// errors as JSON.
func FuzzQuery(f *testing.F) {
	for _, s := range []string{
		"/api/v1/events?after=0&limit=10", "/api/v1/events?after=-1", "/api/v1/events?limit=99999999999999999999",
		"/api/v1/events?after=18446744073709551615&limit=1", "/api/v1/rentals?state=all&limit=0",
		"/api/v1/rentals?state=active", "/api/v1/rentals?state=%00", "/api/v1/devices/chair-1",
		"/api/v1/devices/..%2F..%2Fetc", "/api/v1/status", "/healthz", "/metrics", "/?x=<script>",
		"/api/v1/rentals?limit=1&limit=2", "/api/v1/events?after=1e3",
	} {
		f.Add(s, true)
		f.Add(s, false)
	}
	db, err := store.Open(filepath.Join(f.TempDir(), "edged.db"), store.Options{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { db.Close() })
	st, err := edged.NewStation(edged.StationOptions{ID: "mall-1", Store: db, Clock: fuzzClock{},
		Devices: []edged.Device{{ID: "chair-1", Kind: "chair", Transport: edged.TransportMQTT}}})
	if err != nil {
		f.Fatal(err)
	}
	if err := st.Open(ctx); err != nil {
		f.Fatal(err)
	}
	srv, err := web.New(web.Config{Listen: "127.0.0.1:0", Station: st, Store: db, Clock: fuzzClock{},
		Users: []edged.HTTPUser{{Name: techUser, PasswordHash: techHash}}, StationID: "mall-1"})
	if err != nil {
		f.Fatal(err)
	}
	h := srv.Handler()
	f.Fuzz(func(t *testing.T, target string, auth bool) {
		u, err := url.ParseRequestURI(target)
		if err != nil || !strings.HasPrefix(u.Path, "/") {
			return
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1"+u.RequestURI(), nil)
		if err != nil {
			return
		}
		req.RemoteAddr = "192.0.2.7:40000"
		if auth {
			req.SetBasicAuth(techUser, techPassword)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		code := rec.Code
		if code >= 500 && !(u.Path == "/healthz" && code == http.StatusServiceUnavailable) {
			t.Fatalf("GET %s: %d %s", target, code, rec.Body.String())
		}
		if !auth && code == http.StatusOK && u.Path != "/healthz" {
			t.Fatalf("GET %s without auth: 200", target)
		}
		if strings.Contains(rec.Body.String(), techHash) {
			t.Fatalf("GET %s shows the password hash", target)
		}
		if code >= 400 && strings.HasPrefix(u.Path, "/api/") &&
			!strings.HasPrefix(rec.Header().Get("Content-Type"), "application/json") {
			t.Fatalf("GET %s: error %d as %q", target, code, rec.Header().Get("Content-Type"))
		}
	})
}
