package systemd

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// listenNotify plays the service manager: it owns a unixgram socket, points
// NOTIFY_SOCKET at it and returns it for the test to read.
func listenNotify(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return conn
}

// next reads one notification, failing the test after a generous timeout.
func next(t *testing.T, conn *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("no notification: %v", err)
	}
	return string(buf[:n])
}

func TestNotifications(t *testing.T) {
	conn := listenNotify(t)
	tests := []struct {
		name string
		send func() error
		want string
	}{
		{"ready", Ready, "READY=1"},
		{"status", func() error { return Status("3/5 devices online, uplink connected") }, "STATUS=3/5 devices online, uplink connected"},
		{"status is one line", func() error { return Status("a\nb\r\nc") }, "STATUS=a b c"},
		{"stopping", Stopping, "STOPPING=1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.send(); err != nil {
				t.Fatal(err)
			}
			if got := next(t, conn); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestNotificationsWithoutSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	for name, send := range map[string]func() error{
		"ready": Ready, "stopping": Stopping, "status": func() error { return Status("x") },
	} {
		if err := send(); err != nil {
			t.Errorf("%s: got %v, want nil outside systemd", name, err)
		}
	}
}

func TestNotifyBrokenSocketIsAnError(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "missing.sock"))
	if err := Ready(); err == nil {
		t.Error("got nil, want an error when NOTIFY_SOCKET points nowhere")
	}
}

func TestWatchdogPingsOnlyWhileHealthy(t *testing.T) {
	conn := listenNotify(t)
	t.Setenv("WATCHDOG_USEC", "40000") // pings every 20ms
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))

	var sick atomic.Bool
	var sickChecks atomic.Int64 // checks that saw the process sick
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Watchdog(ctx, func() error {
			if sick.Load() {
				sickChecks.Add(1)
				return errors.New("main loop stuck")
			}
			return nil
		})
	}()

	for i := 0; i < 3; i++ {
		if got := next(t, conn); got != "WATCHDOG=1" {
			t.Fatalf("ping %d: got %q, want WATCHDOG=1", i, got)
		}
	}

	// Once a check has seen the process sick, a ping decided before it
	// is already in the socket (the loop checks, pings, then waits):
	// drain it. Then five more sick checks must send nothing.
	sick.Store(true)
	waitChecks := func(n int64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for sickChecks.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("only %d sick checks, want %d", sickChecks.Load(), n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitChecks(1)
	pending := func() int {
		n := 0
		for {
			conn.SetReadDeadline(time.Now().Add(time.Millisecond))
			if _, err := conn.Read(make([]byte, 64)); err != nil {
				return n
			}
			n++
		}
	}
	pending()
	waitChecks(sickChecks.Load() + 5)
	if n := pending(); n > 0 {
		t.Fatalf("got %d pings while unhealthy, want none", n)
	}

	sick.Store(false)
	if got := next(t, conn); got != "WATCHDOG=1" {
		t.Fatalf("after recovery: got %q, want WATCHDOG=1", got)
	}

	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Watchdog did not return after ctx ended")
	}
}

func TestWatchdogReturnsWhenNotConfigured(t *testing.T) {
	tests := []struct{ name, usec, pid string }{
		{"no WATCHDOG_USEC", "", ""},
		{"another process's watchdog", "40000", strconv.Itoa(os.Getpid() + 1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("WATCHDOG_USEC", tt.usec)
			t.Setenv("WATCHDOG_PID", tt.pid)
			done := make(chan struct{})
			go func() {
				defer close(done)
				Watchdog(context.Background(), func() error { return nil })
			}()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("Watchdog blocked with no watchdog configured")
			}
		})
	}
}
