package local

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
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
	// wrongCacheTTL is how long a refused secret is refused without bcrypt.
	wrongCacheTTL = time.Minute
	// authWait bounds how long a CONNECT waits for bcrypt (its device's
	// turn, a worker, the hash itself) before it is refused as busy.
	authWait = 5 * time.Second
	// verifierSaveDelay gathers the verifiers a reconnect storm creates
	// into a few writes of the file, not one each.
	verifierSaveDelay = time.Second
	// VerifierFile is the file under Config.DataDir that keeps the login
	// verifiers across restarts.
	VerifierFile  = "login-verifiers"
	verifierMagic = "edged login verifiers v1"
)

// secrets checks device secrets against their bcrypt hashes. bcrypt at cost
// 10 takes 50–80 ms on a Pi, so once bcrypt has accepted a secret the
// device gets a verifier, HMAC-SHA256(key, id, hash, secret) with a random
// key of this installation, and its later logins cost one HMAC. The
// verifiers are kept in a file (0600) so they survive a restart, when every
// device reconnects at once. A verifier covers the bcrypt hash too, so a
// changed hash makes it useless at once.
//
// bcrypt runs on a few worker goroutines, not on mochi's client goroutine
// (its deep stack would stay with the client), and never for a login its
// verifier settles, so a flood of wrong passwords cannot delay a device
// that has one. Each device has at most one bcrypt queued or running, and
// devices with a recent wrong secret wait behind the others.
type secrets struct {
	key  [32]byte
	path string // "" keeps the verifiers in memory only
	log  *slog.Logger
	now  func() time.Time
	wait atomic.Int64 // authWait in ns; tests hold logins longer

	parallel int // bcrypt workers

	fresh, suspect chan *bcryptJob
	stop           chan struct{}
	workers        sync.WaitGroup
	closeOnce      sync.Once

	// bcrypts counts the hashes computed, so tests can tell the fast path;
	// beforeBcrypt, when set (tests), runs on the worker before each.
	bcrypts      atomic.Uint64
	beforeBcrypt atomic.Pointer[func()]

	mu       sync.RWMutex
	hashes   map[string][]byte   // device id -> bcrypt hash
	verified map[string][32]byte // device id -> verifier of its accepted secret
	// wrong remembers each device's last refused secret (as an HMAC) for
	// a while, so a misconfigured device retrying in a loop costs no
	// bcrypt either.
	wrong map[string]wrongSecret
	// turn holds a token while a bcrypt of the device is queued or runs.
	turn map[string]chan struct{}

	saveMu  sync.Mutex // serializes writes of the file
	dirty   chan struct{}
	unsaved atomic.Bool // a verifier changed since the last write
	saver   sync.WaitGroup
}

type wrongSecret struct {
	mac     [32]byte
	expires time.Time
}

// bcryptJob is one bcrypt handed to a worker. The worker records the
// result and hands back the device's turn, also when the waiting CONNECT
// has given up.
type bcryptJob struct {
	ctx          context.Context
	id           string
	hash, secret []byte
	mac          [32]byte
	turn         chan struct{}
	done         chan error
}

// newSecrets loads the verifiers from dataDir (none: in memory only) and
// starts parallel bcrypt workers; close stops them.
func newSecrets(hashes map[string][]byte, parallel int, dataDir string, log *slog.Logger) *secrets {
	if parallel < 1 {
		parallel = 1
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &secrets{
		log:      log,
		now:      time.Now,
		parallel: parallel,
		fresh:    make(chan *bcryptJob, len(hashes)+1),
		suspect:  make(chan *bcryptJob, len(hashes)+1),
		stop:     make(chan struct{}),
		hashes:   hashes,
		verified: make(map[string][32]byte),
		wrong:    make(map[string]wrongSecret),
		turn:     make(map[string]chan struct{}),
		dirty:    make(chan struct{}, 1),
	}
	if dataDir != "" {
		s.path = filepath.Join(dataDir, VerifierFile)
	}
	s.wait.Store(int64(authWait))
	s.load()
	for range parallel {
		s.workers.Add(1)
		go s.work()
	}
	if s.path != "" {
		s.saver.Add(1)
		go s.saveLoop()
	}
	return s
}

// close stops the workers and writes the verifiers.
func (s *secrets) close() {
	s.closeOnce.Do(func() {
		close(s.stop)
		s.workers.Wait()
		s.saver.Wait()
		if s.unsaved.Load() {
			s.save()
		}
	})
}

// setHashes replaces the hash table (device id -> bcrypt hash). The
// verifiers and refusals of a device whose hash changed or went are
// dropped; they would not match anyway, as they cover the hash.
func (s *secrets) setHashes(hashes map[string][]byte) {
	s.mu.Lock()
	for id := range s.verified {
		if h, ok := hashes[id]; !ok || !bytes.Equal(h, s.hashes[id]) {
			delete(s.verified, id)
			delete(s.wrong, id)
		}
	}
	s.hashes = hashes
	s.mu.Unlock()
	s.markDirty()
}

// mac is the verifier of secret as device id's secret under hash.
func (s *secrets) mac(id string, hash, secret []byte) [32]byte {
	m := hmac.New(sha256.New, s.key[:])
	var n [4]byte
	for _, p := range [][]byte{[]byte(id), hash, secret} {
		n[0], n[1], n[2], n[3] = byte(len(p)>>24), byte(len(p)>>16), byte(len(p)>>8), byte(len(p))
		m.Write(n[:])
		m.Write(p)
	}
	var out [32]byte
	m.Sum(out[:0])
	return out
}

// known settles a login from the verifiers and the refusals, without
// bcrypt: decided is false when it takes a bcrypt.
func (s *secrets) known(id string, mac [32]byte) (decided bool, err error) {
	s.mu.RLock()
	v, ok := s.verified[id]
	w, refused := s.wrong[id]
	s.mu.RUnlock()
	if ok && hmac.Equal(v[:], mac[:]) {
		return true, nil
	}
	if refused && s.now().Before(w.expires) && hmac.Equal(w.mac[:], mac[:]) {
		return true, errWrongSecret
	}
	return false, nil
}

// check reports nil when password is the secret of device id.
func (s *secrets) check(ctx context.Context, id string, password []byte) error {
	s.mu.RLock()
	hash, ok := s.hashes[id]
	s.mu.RUnlock()
	if !ok {
		// No bcrypt for unknown ids: device ids are printed on the devices,
		// not secrets, and a flood of made-up ids must stay cheap.
		return errUnknownDevice
	}
	if len(password) == 0 {
		return errNoPassword
	}
	mac := s.mac(id, hash, password)
	if ok, err := s.known(id, mac); ok {
		return err
	}

	ctx, cancel := context.WithTimeout(ctx, time.Duration(s.wait.Load()))
	defer cancel()
	turn := s.turnOf(id)
	select {
	case turn <- struct{}{}:
	case <-ctx.Done():
		return errAuthBusy
	}
	// The bcrypt this login waited for may have settled its secret.
	if ok, err := s.known(id, mac); ok {
		<-turn
		return err
	}
	queue := s.fresh
	s.mu.RLock()
	if w, ok := s.wrong[id]; ok && s.now().Before(w.expires) {
		queue = s.suspect
	}
	s.mu.RUnlock()
	j := &bcryptJob{ctx: ctx, id: id, hash: hash, secret: password, mac: mac, turn: turn, done: make(chan error, 1)}
	select {
	case queue <- j:
	case <-ctx.Done():
		<-turn
		return errAuthBusy
	case <-s.stop:
		<-turn
		return errAuthBusy
	}
	select {
	case err := <-j.done:
		return err
	case <-ctx.Done():
		return errAuthBusy
	case <-s.stop:
		return errAuthBusy
	}
}

// turnOf returns the channel that gives device id one bcrypt at a time.
func (s *secrets) turnOf(id string) chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.turn[id]
	if !ok {
		t = make(chan struct{}, 1)
		s.turn[id] = t
	}
	return t
}

// work runs bcrypts, those of devices without a recent refusal first.
func (s *secrets) work() {
	defer s.workers.Done()
	for {
		var j *bcryptJob
		select {
		case j = <-s.fresh:
		default:
			select {
			case j = <-s.fresh:
			case j = <-s.suspect:
			case <-s.stop:
				return
			}
		}
		s.run(j)
	}
}

func (s *secrets) run(j *bcryptJob) {
	defer func() { <-j.turn }()
	if err := j.ctx.Err(); err != nil {
		j.done <- errAuthBusy
		return
	}
	s.bcrypts.Add(1)
	if f := s.beforeBcrypt.Load(); f != nil {
		(*f)()
	}
	// A device may have several accepted secrets while one is rolled
	// (secret_hashes): its hashes are kept joined by newlines.
	err := bcrypt.ErrMismatchedHashAndPassword
	for h := range bytes.SplitSeq(j.hash, []byte("\n")) {
		if err = bcrypt.CompareHashAndPassword(h, j.secret); err == nil {
			break
		}
	}
	s.mu.Lock()
	current := bytes.Equal(s.hashes[j.id], j.hash) // not replaced meanwhile
	if err != nil {
		if current {
			s.wrong[j.id] = wrongSecret{mac: j.mac, expires: s.now().Add(wrongCacheTTL)}
		}
		s.mu.Unlock()
		j.done <- errWrongSecret
		return
	}
	if current {
		s.verified[j.id] = j.mac
	}
	s.mu.Unlock()
	if current {
		s.markDirty()
	}
	j.done <- nil
}

func (s *secrets) markDirty() {
	s.unsaved.Store(true)
	select {
	case s.dirty <- struct{}{}:
	default:
	}
}

// saveLoop writes the file a moment after a verifier changed.
func (s *secrets) saveLoop() {
	defer s.saver.Done()
	for {
		select {
		case <-s.dirty:
		case <-s.stop:
			return
		}
		t := time.NewTimer(verifierSaveDelay)
		select {
		case <-t.C:
		case <-s.stop:
			t.Stop()
			return // close writes it
		}
		s.save()
	}
}

// load reads the key and verifiers, or makes a new key when the file is
// missing or unreadable (and writes it at once, so the key stays).
func (s *secrets) load() {
	if s.path != "" {
		err := s.read()
		if err == nil {
			return
		}
		if !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("login verifiers unreadable, rebuilding them", "path", s.path, "err", err)
		}
	}
	if _, err := rand.Read(s.key[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	s.verified = make(map[string][32]byte)
	s.save()
}

// read parses the file: the magic line, "key HEX", one "ID HEX" per
// verifier, and "sum HEX", the SHA-256 of everything before it.
func (s *secrets) read() error {
	data, err := os.ReadFile(s.path)
	if err != nil {
		return err
	}
	i := bytes.LastIndex(data, []byte("\nsum "))
	if i < 0 {
		return errors.New("no checksum")
	}
	body, tail := data[:i+1], strings.TrimSpace(string(data[i+5:]))
	sum := sha256.Sum256(body)
	if want, err := hex.DecodeString(tail); err != nil || !hmac.Equal(want, sum[:]) {
		return errors.New("checksum mismatch")
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	if !sc.Scan() || sc.Text() != verifierMagic {
		return errors.New("not a verifier file")
	}
	if !sc.Scan() {
		return errors.New("no key")
	}
	key, ok := strings.CutPrefix(sc.Text(), "key ")
	k, err := hex.DecodeString(key)
	if !ok || err != nil || len(k) != len(s.key) {
		return errors.New("bad key line")
	}
	copy(s.key[:], k)
	verified := make(map[string][32]byte)
	for sc.Scan() {
		id, v, ok := strings.Cut(sc.Text(), " ")
		b, err := hex.DecodeString(v)
		if !ok || err != nil || len(b) != 32 {
			return errors.New("bad verifier line")
		}
		if _, known := s.hashes[id]; known {
			verified[id] = [32]byte(b)
		}
	}
	s.verified = verified
	return nil
}

// save writes the file atomically (temporary file, fsync, rename); a
// failure is logged, and the verifiers stay in memory.
func (s *secrets) save() {
	if s.path == "" {
		return
	}
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	s.unsaved.Store(false) // a change from now on is written again
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "%s\nkey %x\n", verifierMagic, s.key)
	s.mu.RLock()
	for id, v := range s.verified {
		fmt.Fprintf(&buf, "%s %x\n", id, v)
	}
	s.mu.RUnlock()
	sum := sha256.Sum256(buf.Bytes())
	fmt.Fprintf(&buf, "sum %x\n", sum)
	if err := writeFileSync(s.path, buf.Bytes()); err != nil {
		s.unsaved.Store(true) // tried again at the next change or close
		s.log.Warn("login verifiers not saved", "path", s.path, "err", err)
	}
}

func writeFileSync(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_ = f.Chmod(0o600) // a leftover temporary file keeps its old mode
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
