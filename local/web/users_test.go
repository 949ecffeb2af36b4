package web_test

import (
	"net/http"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"github.com/stationedge/edged"
)

// A reload of http.users takes effect at once: the new technician gets
// in, the removed one is refused; a bad table changes nothing.
func TestSetUsers(t *testing.T) {
	s := newStation(t)
	auth := func(user, pass string) *string { a := basic(user, pass); return &a }
	if r := s.do(req{path: "/api/v1/status", auth: auth(techUser, techPassword)}); r.code != http.StatusOK {
		t.Fatalf("before: HTTP %d", r.code)
	}
	h, _ := bcrypt.GenerateFromPassword([]byte("night-shift"), bcrypt.MinCost)
	if err := s.srv.SetUsers([]edged.HTTPUser{{Name: "night", PasswordHash: string(h)}}); err != nil {
		t.Fatal(err)
	}
	if r := s.do(req{path: "/api/v1/status", auth: auth("night", "night-shift")}); r.code != http.StatusOK {
		t.Errorf("new user: HTTP %d, want 200", r.code)
	}
	if r := s.do(req{path: "/api/v1/status", auth: auth(techUser, techPassword)}); r.code != http.StatusUnauthorized {
		t.Errorf("removed user: HTTP %d, want 401", r.code)
	}
	if err := s.srv.SetUsers([]edged.HTTPUser{{Name: "x", PasswordHash: "plain"}}); edged.ErrorCode(err) != edged.EINVALID {
		t.Fatalf("bad hash: %v, want EINVALID", err)
	}
	if r := s.do(req{path: "/api/v1/status", auth: auth("night", "night-shift")}); r.code != http.StatusOK {
		t.Errorf("after a refused table: HTTP %d, want 200", r.code)
	}
}
