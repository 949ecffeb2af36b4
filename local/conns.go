package local

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// connectTimeout bounds how long a new connection may take to send its
// CONNECT: mochi reads it with no deadline, so a silent socket would hold a
// goroutine forever and stall Close.
const connectTimeout = 10 * time.Second

// trackedListener remembers the connections it accepted, so Close can end
// the ones mochi does not know about (CONNECT not yet read) and any that
// outlive the graceful shutdown.
type trackedListener struct {
	net.Listener

	onError func(error) // an accept error that is retried
	closed  atomic.Bool

	mu    sync.Mutex
	conns map[*trackedConn]struct{}
}

// Close stops accepting; mochi's listener calls it too.
func (l *trackedListener) Close() error {
	l.closed.Store(true)
	return l.Listener.Close()
}

func newTrackedListener(ln net.Listener) *trackedListener {
	return &trackedListener{Listener: ln, conns: make(map[*trackedConn]struct{})}
}

// Accept waits out errors other than a closed listener (such as EMFILE,
// too many open files), as net/http does: mochi's accept loop returns on
// the first error, which would leave the broker deaf until a restart.
func (l *trackedListener) Accept() (net.Conn, error) {
	var c net.Conn
	for delay := 5 * time.Millisecond; ; delay = min(2*delay, time.Second) {
		var err error
		c, err = l.Listener.Accept()
		if err == nil {
			break
		}
		if errors.Is(err, net.ErrClosed) || l.closed.Load() {
			return nil, err
		}
		if l.onError != nil {
			l.onError(err)
		}
		time.Sleep(delay)
	}
	_ = c.SetDeadline(time.Now().Add(connectTimeout))
	tc := &trackedConn{Conn: c, l: l}
	l.mu.Lock()
	l.conns[tc] = struct{}{}
	l.mu.Unlock()
	return tc, nil
}

// closeConns closes the tracked connections; with pendingOnly, only those
// whose CONNECT was never accepted.
func (l *trackedListener) closeConns(pendingOnly bool) {
	l.mu.Lock()
	var cs []*trackedConn
	for c := range l.conns {
		if !pendingOnly || !c.greeted {
			cs = append(cs, c)
		}
	}
	l.mu.Unlock()
	for _, c := range cs {
		_ = c.Close()
	}
}

type trackedConn struct {
	net.Conn
	l       *trackedListener
	greeted bool // guarded by l.mu: the CONNECT was read
	once    sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// greet marks the connection under conn (possibly wrapped in TLS) as past
// its CONNECT.
func greet(conn net.Conn) {
	for conn != nil {
		switch c := conn.(type) {
		case *trackedConn:
			c.l.mu.Lock()
			c.greeted = true
			c.l.mu.Unlock()
			return
		case interface{ NetConn() net.Conn }:
			conn = c.NetConn()
		default:
			return
		}
	}
}
