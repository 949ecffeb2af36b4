package web

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/bcrypt"

	"github.com/stationedge/edged"
)

// Auth tuning. bcrypt costs tens of milliseconds per check on a Raspberry
// Pi, and the page polls several times a second: a successful check is
// remembered briefly, a failed one too (so a script retrying a wrong
// password costs one bcrypt per window), and at most bcryptSlots checks
// run at once so a flood of guesses cannot take every core.
const (
	okTTL        = 2 * time.Minute
	failTTL      = 10 * time.Second
	cacheMax     = 1024
	bcryptSlots  = 2
	bcryptWait   = 5 * time.Second
	logEvery     = 10 * time.Second
	realm        = `Basic realm="edged", charset="UTF-8"`
	maxNameBytes = 64
)

// authenticator checks HTTP Basic credentials against bcrypt hashes.
type authenticator struct {
	users map[string][]byte // name -> bcrypt hash
	dummy []byte            // compared for unknown names, so they take as long
	log   *slog.Logger
	slots chan struct{}

	mu    sync.Mutex
	cache map[[32]byte]cached

	failures atomic.Uint64

	logMu      sync.Mutex
	lastLog    time.Time
	suppressed int
}

type cached struct {
	ok      bool
	expires time.Time
}

func newAuthenticator(users []edged.HTTPUser, log *slog.Logger) *authenticator {
	a := &authenticator{users: map[string][]byte{}, log: log,
		slots: make(chan struct{}, bcryptSlots), cache: map[[32]byte]cached{}}
	cost := bcrypt.DefaultCost
	for _, u := range users {
		a.users[u.Name] = []byte(u.PasswordHash)
		if c, err := bcrypt.Cost([]byte(u.PasswordHash)); err == nil {
			cost = c
		}
	}
	if len(users) > 0 {
		// A hash of a random-enough string at the users' cost: never matches.
		a.dummy, _ = bcrypt.GenerateFromPassword([]byte("edged-no-such-user-"+time.Now().String()), cost)
	}
	return a
}

// enabled reports whether credentials are needed at all.
func (a *authenticator) enabled() bool { return len(a.users) > 0 }

// Failures counts requests refused for wrong credentials.
func (a *authenticator) Failures() uint64 { return a.failures.Load() }

// key identifies a (user, password) pair without keeping the password.
func key(user, password string) [32]byte {
	h := sha256.New()
	h.Write([]byte(user))
	h.Write([]byte{0})
	h.Write([]byte(password))
	var k [32]byte
	h.Sum(k[:0])
	return k
}

// check reports whether user and password are valid; err is set only when
// the check could not be made (ctx ended while waiting for a slot).
func (a *authenticator) check(ctx context.Context, user, password string) (bool, error) {
	k := key(user, password)
	now := time.Now()
	a.mu.Lock()
	c, hit := a.cache[k]
	a.mu.Unlock()
	if hit && now.Before(c.expires) {
		return c.ok, nil
	}
	wait, cancel := context.WithTimeout(ctx, bcryptWait)
	defer cancel()
	select {
	case a.slots <- struct{}{}:
	case <-wait.Done():
		return false, wait.Err()
	}
	hash, known := a.users[user]
	if !known {
		hash = a.dummy
	}
	ok := bcrypt.CompareHashAndPassword(hash, []byte(password)) == nil && known
	<-a.slots
	ttl := failTTL
	if ok {
		ttl = okTTL
	}
	a.mu.Lock()
	if len(a.cache) >= cacheMax {
		for ck, cv := range a.cache {
			if !now.Before(cv.expires) {
				delete(a.cache, ck)
			}
		}
		if len(a.cache) >= cacheMax {
			clear(a.cache)
		}
	}
	a.cache[k] = cached{ok: ok, expires: now.Add(ttl)}
	a.mu.Unlock()
	return ok, nil
}

// wrap requires valid credentials for every request but /healthz when
// users are configured.
func (a *authenticator) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !a.enabled() || r.URL.Path == "/healthz" {
			next.ServeHTTP(w, r)
			return
		}
		user, password, present := r.BasicAuth()
		if !present {
			w.Header().Set("WWW-Authenticate", realm)
			writeError(w, http.StatusUnauthorized, "authentication required")
			return
		}
		ok, err := a.check(r.Context(), user, password)
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, "too many logins at once, try again")
			return
		}
		if !ok {
			a.failures.Add(1)
			a.logFailure(user, r.RemoteAddr)
			w.Header().Set("WWW-Authenticate", realm)
			writeError(w, http.StatusUnauthorized, "wrong user name or password")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// logFailure logs a refused login with the name tried and where from, never
// the password; at most one line per logEvery, with a count of the rest.
func (a *authenticator) logFailure(user, remote string) {
	a.logMu.Lock()
	now := time.Now()
	if now.Sub(a.lastLog) < logEvery {
		a.suppressed++
		a.logMu.Unlock()
		return
	}
	n := a.suppressed
	a.lastLog, a.suppressed = now, 0
	a.logMu.Unlock()
	// A name that is no user may be a password typed in the wrong box:
	// only known names are logged.
	if _, known := a.users[user]; !known {
		user = "(unknown)"
	}
	a.log.Warn("http login refused", "user", printable(user), "remote", remote, "more_since_last", n)
}

// printable shortens s and drops anything that is not a printable
// character, so a user name cannot forge log lines.
func printable(s string) string {
	if len(s) > maxNameBytes {
		s = s[:maxNameBytes]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r == utf8.RuneError {
			return -1
		}
		return r
	}, s)
}
