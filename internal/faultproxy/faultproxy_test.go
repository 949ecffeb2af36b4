package faultproxy

import (
	"bufio"
	"net"
	"testing"
	"time"
)

// echoServer echoes lines until the test ends.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 1024)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func dial(t *testing.T, p *Proxy) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.Addr(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

func roundTrip(c net.Conn, r *bufio.Reader, d time.Duration) (string, error) {
	c.SetDeadline(time.Now().Add(d))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return "", err
	}
	return r.ReadString('\n')
}

func TestProxy(t *testing.T) {
	p, err := New(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	c, r := dial(t, p)
	if got, err := roundTrip(c, r, 2*time.Second); err != nil || got != "ping\n" {
		t.Fatalf("forward: got %q, %v", got, err)
	}

	// Stall: the connection stays open but nothing comes back.
	p.Stall()
	if got, err := roundTrip(c, r, 200*time.Millisecond); err == nil {
		t.Fatalf("stall: got %q, want a timeout", got)
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("stall: got %v, want a timeout", err)
	}
	// Restore: the held bytes arrive, then traffic flows again.
	p.Restore()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if got, err := r.ReadString('\n'); err != nil || got != "ping\n" {
		t.Fatalf("restore after stall: got %q, %v", got, err)
	}
	if got, err := roundTrip(c, r, 2*time.Second); err != nil || got != "ping\n" {
		t.Fatalf("restore after stall: got %q, %v", got, err)
	}

	// Cut: the open connection ends, new ones are closed at once.
	p.Cut()
	if _, err := roundTrip(c, r, 2*time.Second); err == nil {
		t.Fatal("cut: old connection still works")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("cut: got a timeout, want the connection closed: %v", err)
	}
	c2, r2 := dial(t, p)
	if _, err := roundTrip(c2, r2, 2*time.Second); err == nil {
		t.Fatal("cut: new connection works")
	}

	p.Restore()
	c3, r3 := dial(t, p)
	if got, err := roundTrip(c3, r3, 2*time.Second); err != nil || got != "ping\n" {
		t.Fatalf("restore after cut: got %q, %v", got, err)
	}
}
