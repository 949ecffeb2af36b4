package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stationedge/edged"
)

func testSecrets(t *testing.T, dir string, hashes map[string][]byte) (*secrets, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	s := newSecrets(hashes, 2, dir, slog.New(slog.NewTextHandler(logs, nil)))
	t.Cleanup(s.close)
	return s, logs
}

func TestSecretsCache(t *testing.T) {
	a, _ := hashes(t)
	s, _ := testSecrets(t, "", map[string][]byte{"dev-a": []byte(a)})
	ctx := context.Background()
	if err := s.check(ctx, "dev-a", []byte("nope")); !errors.Is(err, errWrongSecret) {
		t.Fatalf("wrong secret: %v", err)
	}
	if len(s.verified) != 0 {
		t.Fatal("a wrong secret was cached as right")
	}
	if err := s.check(ctx, "dev-a", []byte(secretA)); err != nil {
		t.Fatal(err)
	}
	n := s.bcrypts.Load()
	for range 3 {
		if err := s.check(ctx, "dev-a", []byte(secretA)); err != nil {
			t.Errorf("verified secret: %v", err)
		}
		if err := s.check(ctx, "dev-a", []byte("nope")); !errors.Is(err, errWrongSecret) {
			t.Errorf("refused secret: %v", err)
		}
	}
	if got := s.bcrypts.Load(); got != n {
		t.Errorf("%d bcrypts for logins the caches settle", got-n)
	}
	// A refused secret is tried again once its refusal is old.
	now := time.Now()
	s.now = func() time.Time { return now.Add(wrongCacheTTL + time.Second) }
	if err := s.check(ctx, "dev-a", []byte("nope")); !errors.Is(err, errWrongSecret) {
		t.Errorf("wrong secret after the refusal expired: %v", err)
	}
	if got := s.bcrypts.Load(); got != n+1 {
		t.Errorf("bcrypts after the refusal expired = %d, want %d", got, n+1)
	}
	if err := s.check(ctx, "dev-zz", []byte(secretA)); !errors.Is(err, errUnknownDevice) {
		t.Errorf("unknown device: %v", err)
	}
	if err := s.check(ctx, "dev-a", nil); !errors.Is(err, errNoPassword) {
		t.Errorf("no password: %v", err)
	}
}

// Concurrent logins of one device share one bcrypt: the others wait for
// their turn and find the answer cached.
func TestOneBcryptPerDevice(t *testing.T) {
	a, _ := hashes(t)
	for _, secret := range []string{secretA, "nope"} {
		s, _ := testSecrets(t, "", map[string][]byte{"dev-a": []byte(a)})
		var wg sync.WaitGroup
		var accepted atomic.Int32
		for range 20 {
			wg.Go(func() {
				if s.check(context.Background(), "dev-a", []byte(secret)) == nil {
					accepted.Add(1)
				}
			})
		}
		wg.Wait()
		if got := s.bcrypts.Load(); got != 1 {
			t.Errorf("secret %q: %d bcrypts for 20 identical logins, want 1", secret, got)
		}
		if want := map[bool]int32{true: 20, false: 0}[secret == secretA]; accepted.Load() != want {
			t.Errorf("secret %q: %d accepted, want %d", secret, accepted.Load(), want)
		}
	}
}

// The verifiers survive a restart of the broker: the device logs in again
// without bcrypt.
func TestVerifiersSurviveRestart(t *testing.T) {
	dir := t.TempDir()
	e := start(t, func(c *Config) { c.DataDir = dir })
	c := connectV3(t, e.addr, "dev-a", secretA)
	c.c.Disconnect(0)
	if n := e.b.secrets.bcrypts.Load(); n != 1 {
		t.Fatalf("first login: %d bcrypts, want 1", n)
	}
	_ = e.b.Close()

	e2 := start(t, func(c *Config) { c.DataDir = dir })
	c2 := connectV3(t, e2.addr, "dev-a", secretA)
	c2.alive(t, e2, "dev-a")
	if n := e2.b.secrets.bcrypts.Load(); n != 0 {
		t.Errorf("login after restart: %d bcrypts, want 0", n)
	}
	if _, err := dialV3(t, e2.addr, "dev-a", "dev-a", "nope"); err == nil {
		t.Error("wrong secret accepted after restart")
	}
}

// A changed hash (in the config across a restart, or set at runtime)
// makes the verifier of the old secret useless.
func TestChangedHashInvalidatesVerifier(t *testing.T) {
	a, b := hashes(t)
	dir := t.TempDir()
	ctx := context.Background()
	s, _ := testSecrets(t, dir, map[string][]byte{"dev-a": []byte(a)})
	if err := s.check(ctx, "dev-a", []byte(secretA)); err != nil {
		t.Fatal(err)
	}
	s.close()

	// Restarted with dev-a's hash now that of secretB.
	s2, _ := testSecrets(t, dir, map[string][]byte{"dev-a": []byte(b)})
	if err := s2.check(ctx, "dev-a", []byte(secretA)); !errors.Is(err, errWrongSecret) {
		t.Errorf("old secret after the hash changed: %v", err)
	}
	if err := s2.check(ctx, "dev-a", []byte(secretB)); err != nil {
		t.Errorf("new secret: %v", err)
	}

	// Changed at runtime, back to secretA's hash.
	s2.setHashes(map[string][]byte{"dev-a": []byte(a)})
	if err := s2.check(ctx, "dev-a", []byte(secretB)); !errors.Is(err, errWrongSecret) {
		t.Errorf("old secret after SetSecrets: %v", err)
	}
	if err := s2.check(ctx, "dev-a", []byte(secretA)); err != nil {
		t.Errorf("new secret after SetSecrets: %v", err)
	}
	s2.setHashes(map[string][]byte{})
	if err := s2.check(ctx, "dev-a", []byte(secretA)); !errors.Is(err, errUnknownDevice) {
		t.Errorf("device removed by SetSecrets: %v", err)
	}
}

func TestBrokerSetSecrets(t *testing.T) {
	a, b := hashes(t)
	e := start(t, nil)
	connectV3(t, e.addr, "dev-a", secretA).c.Disconnect(0)
	if err := e.b.SetSecrets(map[string]string{"dev-a": b, "dev-b": a}); err != nil {
		t.Fatal(err)
	}
	if _, err := dialV3(t, e.addr, "dev-a", "dev-a", secretA); err == nil {
		t.Error("old secret accepted after SetSecrets")
	}
	connectV3(t, e.addr, "dev-a", secretB).alive(t, e, "dev-a")
	if err := e.b.SetSecrets(map[string]string{"nobody": a}); err == nil {
		t.Error("SetSecrets took an unknown device")
	}
	if err := e.b.SetSecrets(map[string]string{"dev-a": "plain"}); err == nil {
		t.Error("SetSecrets took a hash that is not bcrypt")
	}
}

// A wrong secret for a device with a verifier is refused, and the right
// one still passes without bcrypt.
func TestWrongSecretDoesNotPoisonVerifier(t *testing.T) {
	a, _ := hashes(t)
	s, _ := testSecrets(t, t.TempDir(), map[string][]byte{"dev-a": []byte(a)})
	ctx := context.Background()
	if err := s.check(ctx, "dev-a", []byte(secretA)); err != nil {
		t.Fatal(err)
	}
	for _, wrong := range []string{"nope", secretA + "x", secretA[:len(secretA)-1], secretB} {
		if err := s.check(ctx, "dev-a", []byte(wrong)); !errors.Is(err, errWrongSecret) {
			t.Errorf("wrong secret %q: %v", wrong, err)
		}
	}
	n := s.bcrypts.Load()
	if err := s.check(ctx, "dev-a", []byte(secretA)); err != nil {
		t.Errorf("right secret after wrong ones: %v", err)
	}
	if got := s.bcrypts.Load(); got != n {
		t.Error("the right secret needed bcrypt again after wrong ones")
	}
}

// The verifier file is private and holds no secret, nor its hash.
func TestVerifierFile(t *testing.T) {
	a, _ := hashes(t)
	dir := t.TempDir()
	s, _ := testSecrets(t, dir, map[string][]byte{"dev-a": []byte(a)})
	if err := s.check(context.Background(), "dev-a", []byte(secretA)); err != nil {
		t.Fatal(err)
	}
	s.close()
	path := filepath.Join(dir, VerifierFile)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o600 {
		t.Errorf("mode %o, want 600", m)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, leak := range []string{secretA, a, fmt.Sprintf("%x", []byte(secretA))} {
		if bytes.Contains(data, []byte(leak)) {
			t.Errorf("verifier file holds %q", leak)
		}
	}
	if !bytes.Contains(data, []byte("\ndev-a ")) {
		t.Errorf("verifier file has no line for dev-a:\n%s", data)
	}
}

// A corrupt or truncated verifier file is logged, ignored and rebuilt.
func TestCorruptVerifierFileRebuilt(t *testing.T) {
	a, _ := hashes(t)
	ctx := context.Background()
	for name, corrupt := range map[string]func([]byte) []byte{
		"garbage":   func([]byte) []byte { return []byte("\x00\x01 not a file\n") },
		"truncated": func(b []byte) []byte { return b[:len(b)/2] },
		"bit flip":  func(b []byte) []byte { c := bytes.Clone(b); c[len(verifierMagic)+10] ^= 1; return c },
		"empty":     func([]byte) []byte { return nil },
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, VerifierFile)
			s, _ := testSecrets(t, dir, map[string][]byte{"dev-a": []byte(a)})
			if err := s.check(ctx, "dev-a", []byte(secretA)); err != nil {
				t.Fatal(err)
			}
			s.close()
			good, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, corrupt(good), 0o600); err != nil {
				t.Fatal(err)
			}

			s2, logs := testSecrets(t, dir, map[string][]byte{"dev-a": []byte(a)})
			if !strings.Contains(logs.String(), "login verifiers unreadable") {
				t.Errorf("corrupt file not logged: %q", logs.String())
			}
			if err := s2.check(ctx, "dev-a", []byte(secretA)); err != nil {
				t.Fatalf("login with a corrupt verifier file: %v", err)
			}
			if n := s2.bcrypts.Load(); n != 1 {
				t.Errorf("%d bcrypts, want 1 (the corrupt file was used)", n)
			}
			s2.close()

			s3, logs3 := testSecrets(t, dir, map[string][]byte{"dev-a": []byte(a)})
			if logs3.String() != "" {
				t.Errorf("rebuilt file not read back: %s", logs3.String())
			}
			if err := s3.check(ctx, "dev-a", []byte(secretA)); err != nil || s3.bcrypts.Load() != 0 {
				t.Errorf("rebuilt file: err %v, %d bcrypts", err, s3.bcrypts.Load())
			}
		})
	}
}

// rawLogin sends a 3.1.1 CONNECT and returns the CONNACK's return code.
func rawLogin(addr, id, secret string) (byte, error) {
	conn, err := net.DialTimeout("tcp", addr, testWaitPeriod)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	ack, err := rawExchange(conn, rawConnectPacket(id, id, secret, 30), 4, time.Minute)
	if err != nil {
		return 0, err
	}
	return ack[3], nil
}

// A flood of wrong secrets for known devices, with every bcrypt worker
// held busy, does not stop a device whose secret is verified from
// connecting: it connects while every CONNECT of the flood is still
// waiting.
func TestFloodDoesNotDelayVerifiedDevice(t *testing.T) {
	const flood, targets = 500, 50
	a, b := hashes(t)
	devs := []edged.Device{{ID: "dev-a", Transport: edged.TransportMQTT, SecretHash: a}}
	for i := range targets {
		devs = append(devs, edged.Device{ID: fmt.Sprintf("flood-%d", i), Transport: edged.TransportMQTT, SecretHash: b})
	}
	e := start(t, func(c *Config) { c.Devices = devs })
	connectV3(t, e.addr, "dev-a", secretA).c.Disconnect(0)
	waitFor(t, "dev-a offline", func() bool { return e.b.Stats().Connected == 0 })

	release := make(chan struct{})
	var entered atomic.Int32
	// Held logins must not time out before the test lets them go.
	e.b.secrets.wait.Store(int64(time.Minute))
	hold := func() {
		entered.Add(1)
		<-release
	}
	e.b.secrets.beforeBcrypt.Store(&hold)
	var released sync.Once
	defer released.Do(func() { close(release) })

	var wg sync.WaitGroup
	var done, accepted atomic.Int32
	for i := range flood {
		wg.Go(func() {
			defer done.Add(1)
			code, err := rawLogin(e.addr, fmt.Sprintf("flood-%d", i%targets), fmt.Sprintf("wrong-%d", i))
			if err == nil && code == 0 {
				accepted.Add(1)
			}
		})
	}
	// Every worker is inside a bcrypt of the flood, held there.
	waitFor(t, "workers busy with the flood", func() bool { return int(entered.Load()) >= e.b.secrets.parallel })

	c := connectV3(t, e.addr, "dev-a", secretA)
	if n := done.Load(); n != 0 {
		t.Errorf("%d flood CONNECTs answered before the verified device was in", n)
	}
	released.Do(func() { close(release) })
	c.alive(t, e, "dev-a")
	wg.Wait()
	if accepted.Load() != 0 {
		t.Errorf("%d wrong secrets accepted", accepted.Load())
	}
}

// A device that stops reading fills its queue of pending writes; mochi
// drops the commands past it, and the broker logs that it did.
func TestDroppedCommandLogged(t *testing.T) {
	e := start(t, nil)
	conn, err := net.DialTimeout("tcp", e.addr, testWaitPeriod)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var buf bytes.Buffer
	connect := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 120,
			ClientIdentifier: "dev-a", UsernameFlag: true, Username: []byte("dev-a"),
			PasswordFlag: true, Password: []byte(secretA),
		},
	}
	if err := connect.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	sub := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		ProtocolVersion: 4,
		PacketID:        1,
		Filters:         packets.Subscriptions{{Filter: "devices/dev-a/commands", Qos: 0}},
	}
	if err := sub.SubscribeEncode(&buf); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(testWaitPeriod))
	if _, err := conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	acks := make([]byte, 4+5) // CONNACK, SUBACK
	if _, err := io.ReadFull(conn, acks); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "subscribed", func() bool { return e.b.subscribed("dev-a") })
	// The device reads nothing more: the socket's buffers fill, then the
	// queue of pending writes.
	payload := bytes.Repeat([]byte("x"), 60<<10)
	for i := 0; i < 1000 && atomic.LoadInt64(&e.b.srv.Info.MessagesDropped) == 0; i++ {
		if err := e.b.publishCommand("dev-a", payload); err != nil {
			t.Fatal(err)
		}
	}
	if atomic.LoadInt64(&e.b.srv.Info.MessagesDropped) == 0 {
		t.Fatal("no command dropped: the queue never filled")
	}
	if !strings.Contains(e.logs.String(), "command dropped") {
		t.Error("dropped command not logged")
	}
}

// A verifier reaches the file soon after it is made, without a clean
// close: a power cut a few seconds after the storm keeps the fast logins.
func TestVerifiersSavedWithoutClose(t *testing.T) {
	a, _ := hashes(t)
	dir := t.TempDir()
	s, _ := testSecrets(t, dir, map[string][]byte{"dev-a": []byte(a)})
	if err := s.check(context.Background(), "dev-a", []byte(secretA)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "verifier written", func() bool {
		data, _ := os.ReadFile(filepath.Join(dir, VerifierFile))
		return bytes.Contains(data, []byte("\ndev-a "))
	})
	// A second process reads the file while the first never closed.
	s2, _ := testSecrets(t, dir, map[string][]byte{"dev-a": []byte(a)})
	if err := s2.check(context.Background(), "dev-a", []byte(secretA)); err != nil || s2.bcrypts.Load() != 0 {
		t.Errorf("after a crash: err %v, %d bcrypts, want none", err, s2.bcrypts.Load())
	}
}
