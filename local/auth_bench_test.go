package local

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"golang.org/x/crypto/bcrypt"
)

var (
	cost10Once sync.Once
	cost10Hash []byte
)

// cost10 is secretA hashed at bcrypt's default cost, as hash-secret makes.
func cost10(b *testing.B) []byte {
	cost10Once.Do(func() {
		h, err := bcrypt.GenerateFromPassword([]byte(secretA), bcrypt.DefaultCost)
		if err != nil {
			panic(err)
		}
		cost10Hash = h
	})
	return cost10Hash
}

// BenchmarkLoginVerified is a login of a device whose secret has a
// verifier: one HMAC.
func BenchmarkLoginVerified(b *testing.B) {
	s := newSecrets(map[string][]byte{"dev-a": cost10(b)}, 1, "", nil)
	defer s.close()
	ctx := context.Background()
	if err := s.check(ctx, "dev-a", []byte(secretA)); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		if err := s.check(ctx, "dev-a", []byte(secretA)); err != nil {
			b.Fatal(err)
		}
	}
	if n := s.bcrypts.Load(); n != 1 {
		b.Fatalf("%d bcrypts", n)
	}
}

// BenchmarkLoginBcrypt is a login with no verifier yet: one bcrypt at
// cost 10, on a worker.
func BenchmarkLoginBcrypt(b *testing.B) {
	s := newSecrets(map[string][]byte{"dev-a": cost10(b)}, 1, "", nil)
	defer s.close()
	ctx := context.Background()
	for b.Loop() {
		s.mu.Lock()
		delete(s.verified, "dev-a")
		s.mu.Unlock()
		if err := s.check(ctx, "dev-a", []byte(secretA)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReconnectStorm: 200 devices with cost-10 secrets connect at
// once to a broker with an empty data dir (every login a bcrypt, as
// before the verifiers), then again to a broker restarted on the same
// data dir. It reports the time until all are connected, each way.
func BenchmarkReconnectStorm(b *testing.B) {
	const n = 200
	hash := string(cost10(b))
	devs := make([]edged.Device, n)
	for i := range devs {
		devs[i] = edged.Device{ID: fmt.Sprintf("storm-%d", i), Transport: edged.TransportMQTT, SecretHash: hash}
	}
	var cold, warm time.Duration
	for b.Loop() {
		dir := b.TempDir()
		cold += storm(b, devs, dir)
		warm += storm(b, devs, dir)
	}
	b.ReportMetric(cold.Seconds()/float64(b.N), "cold-s")
	b.ReportMetric(warm.Seconds()/float64(b.N), "restarted-s")
	b.Logf("%d devices with cost-10 secrets all connected: %v with no verifiers, %v after a restart", n, cold/time.Duration(b.N), warm/time.Duration(b.N))
}

// storm starts a broker on dir, connects every device at once and
// returns how long until the broker counts them all connected.
func storm(b *testing.B, devs []edged.Device, dir string) time.Duration {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	br, err := New(Config{Listener: ln, Devices: devs, Reporter: &countingReporter{}, DataDir: dir, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	if err := br.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	defer br.Close()
	addr := br.Addr().String()
	conns := make([]net.Conn, len(devs))
	errs := make(chan error, len(devs))
	var wg sync.WaitGroup
	start := time.Now()
	for i, d := range devs {
		wg.Go(func() {
			// A login refused as busy (CONNACK 3) is retried, as devices do.
			for try := 0; ; try++ {
				c, err := holdLogin(addr, d.ID, secretA)
				if err == errBusyAck && try < 100 {
					time.Sleep(200 * time.Millisecond)
					continue
				}
				conns[i] = c
				if err != nil {
					errs <- err
				}
				return
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for br.Stats().Connected < len(devs) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	took := time.Since(start)
	if got := br.Stats().Connected; got < len(devs) {
		b.Fatalf("%d of %d connected", got, len(devs))
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	return took
}

var errBusyAck = errors.New("connack: server unavailable")

// holdLogin connects as device id and keeps the connection.
func holdLogin(addr, id, secret string) (net.Conn, error) {
	conn, err := net.DialTimeout("tcp", addr, time.Minute)
	if err != nil {
		return nil, err
	}
	ack, err := rawExchange(conn, rawConnectPacket(id, id, secret, 120), 4, time.Minute)
	if err == nil && ack[3] == 3 {
		conn.Close()
		return nil, errBusyAck
	}
	if err != nil || ack[3] != 0 {
		conn.Close()
		return nil, fmt.Errorf("%s: connack %x: %v", id, ack, err)
	}
	return conn, nil
}
