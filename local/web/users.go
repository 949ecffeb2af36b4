package web

import (
	"github.com/stationedge/edged"
	"golang.org/x/crypto/bcrypt"
)

// SetUsers replaces the technicians allowed in (a reload of http.users),
// at once and whole: a request is checked against the old table or the
// new one, never a mix. Errors: EINVALID for a missing or repeated name or
// a hash that is not bcrypt, and the old table stays; also for no users
// while listening beyond loopback.
func (s *Server) SetUsers(users []edged.HTTPUser) error {
	seen := map[string]bool{}
	for i, u := range users {
		if u.Name == "" || seen[u.Name] {
			return edged.Errorf(edged.EINVALID, "http.users[%d]: missing or repeated name", i)
		}
		seen[u.Name] = true
		if _, err := bcrypt.Cost([]byte(u.PasswordHash)); err != nil {
			return edged.Errorf(edged.EINVALID, "http.users[%d] (%s): password_hash is not a bcrypt hash", i, u.Name)
		}
	}
	if len(users) == 0 && !edged.LoopbackAddr(s.Addr().String()) {
		return edged.Errorf(edged.EINVALID, "http: with no http.users, edged serves only a loopback address")
	}
	a := newAuthenticator(users, s.log)
	a.failures.Store(s.auth.Load().Failures()) // the counter of /metrics never goes down
	s.auth.Store(a)
	return nil
}
