package local

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// Why a CONNECT was refused; the strings go to the log.
var (
	errUnknownDevice = errors.New("unknown device")
	errWrongSecret   = errors.New("wrong secret")
	errClientID      = errors.New("client id differs from username")
	errWillRefused   = errors.New("will refused")
	errAuthBusy      = errors.New("too many authentications in progress")
	errNoPassword    = errors.New("no password")
)

const (
	// authCacheTTL is how long a verified (device, secret) pair skips
	// bcrypt: long enough to absorb a reconnect storm, short enough that a
	// leaked session of the process memory ages out.
	authCacheTTL = 10 * time.Minute
	// wrongCacheTTL is how long a refused secret is refused without bcrypt.
	wrongCacheTTL = time.Minute
	// authWait bounds how long a CONNECT waits for a bcrypt slot before it
	// is refused as busy.
	authWait = 5 * time.Second
)

// secrets checks device secrets against their bcrypt hashes. bcrypt at cost
// 10 takes 50–80 ms on a Pi, so a verified pair is remembered (as a SHA-256
// of the secret, never the secret) and concurrent checks are bounded, so a
// flood of bad CONNECTs cannot take every core.
type secrets struct {
	hashes map[string][]byte // device id -> bcrypt hash
	slots  chan struct{}
	now    func() time.Time

	mu    sync.Mutex
	cache map[string]cachedSecret // device id -> last verified secret
	// wrong remembers each device's last refused secret for a while, so
	// a misconfigured device retrying in a loop costs no bcrypt either.
	wrong map[string]cachedSecret
}

type cachedSecret struct {
	sum     [sha256.Size]byte
	expires time.Time
}

func newSecrets(hashes map[string][]byte, parallel int) *secrets {
	if parallel < 1 {
		parallel = 1
	}
	return &secrets{
		hashes: hashes,
		slots:  make(chan struct{}, parallel),
		now:    time.Now,
		cache:  make(map[string]cachedSecret),
		wrong:  make(map[string]cachedSecret),
	}
}

// check reports nil when password is the secret of device id.
func (s *secrets) check(ctx context.Context, id string, password []byte) error {
	hash, ok := s.hashes[id]
	if !ok {
		// No bcrypt for unknown ids: device ids are printed on the devices,
		// not secrets, and a flood of made-up ids must stay cheap.
		return errUnknownDevice
	}
	if len(password) == 0 {
		return errNoPassword
	}
	sum := sha256.Sum256(password)
	now := s.now()
	s.mu.Lock()
	c, hit := s.cache[id]
	w, miss := s.wrong[id]
	s.mu.Unlock()
	if hit && now.Before(c.expires) && subtle.ConstantTimeCompare(c.sum[:], sum[:]) == 1 {
		return nil
	}
	if miss && now.Before(w.expires) && subtle.ConstantTimeCompare(w.sum[:], sum[:]) == 1 {
		return errWrongSecret
	}

	ctx, cancel := context.WithTimeout(ctx, authWait)
	defer cancel()
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		return errAuthBusy
	}
	err := bcrypt.CompareHashAndPassword(hash, password)
	<-s.slots
	if err != nil {
		s.mu.Lock()
		s.wrong[id] = cachedSecret{sum: sum, expires: now.Add(wrongCacheTTL)}
		s.mu.Unlock()
		return errWrongSecret
	}
	s.mu.Lock()
	s.cache[id] = cachedSecret{sum: sum, expires: now.Add(authCacheTTL)}
	s.mu.Unlock()
	return nil
}
