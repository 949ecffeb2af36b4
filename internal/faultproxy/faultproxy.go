// Package faultproxy is a loopback TCP proxy for tests that break a link
// the way networks do: Cut closes both sides of every connection (a peer
// sees a reset or FIN at once), Stall keeps connections open but forwards
// nothing (a peer sees silence, as when a mobile link dies without a FIN),
// and Restore forwards again.
package faultproxy

import (
	"net"
	"sync"
)

// Mode is what the proxy does with traffic.
type Mode int

// Modes of a Proxy.
const (
	// Forward copies bytes both ways.
	Forward Mode = iota
	// Cut refuses traffic: open connections are closed and new ones are
	// accepted and closed at once.
	Cut
	// Stall holds traffic: connections stay open (new ones are accepted)
	// but no byte is forwarded until Restore.
	Stall
)

// Proxy forwards a loopback port to a target address.
type Proxy struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	mode    Mode
	changed chan struct{} // closed and replaced on every mode change
	conns   map[net.Conn]struct{}
	accepts int
	closed  bool

	wg sync.WaitGroup
}

// New starts a proxy on 127.0.0.1:0 that forwards to target.
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, changed: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Addr is the proxy's listening address, host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Accepts is how many connections the proxy has accepted so far.
func (p *Proxy) Accepts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepts
}

// Cut closes both sides of every open connection and closes new ones until
// Restore.
func (p *Proxy) Cut() {
	p.setMode(Cut)
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
}

// Stall stops forwarding without closing anything, until Restore or Cut.
func (p *Proxy) Stall() { p.setMode(Stall) }

// Restore forwards again, stalled connections included.
func (p *Proxy) Restore() { p.setMode(Forward) }

// Mode returns the current mode.
func (p *Proxy) Mode() Mode {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mode
}

func (p *Proxy) setMode(m Mode) {
	p.mu.Lock()
	p.mode = m
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

// Close stops the proxy and closes every connection; it waits for its
// goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
	err := p.ln.Close()
	p.wg.Wait()
	return err
}

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.accepts++
		if p.closed || p.mode == Cut {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns[c] = struct{}{}
		p.mu.Unlock()
		p.wg.Add(1)
		go p.handle(c)
	}
}

// track registers c; it reports false (and closes c) when the proxy is cut
// or closed meanwhile.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.mode == Cut {
		c.Close()
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(cs ...net.Conn) {
	p.mu.Lock()
	for _, c := range cs {
		delete(p.conns, c)
		c.Close()
	}
	p.mu.Unlock()
}

func (p *Proxy) handle(client net.Conn) {
	defer p.wg.Done()
	upstream, err := net.Dial("tcp", p.target)
	if err != nil {
		p.untrack(client)
		return
	}
	if !p.track(upstream) {
		p.untrack(client)
		return
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(upstream, client) }()
	go func() { defer wg.Done(); p.pipe(client, upstream) }()
	wg.Wait()
	p.untrack(client, upstream)
}

// pipe copies src to dst; before each write it waits while the proxy is
// stalled, so a stalled link holds at most one buffer per direction and
// TCP flow control does the rest.
func (p *Proxy) pipe(dst, src net.Conn) {
	defer func() { dst.Close(); src.Close() }()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if !p.waitForward() {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return // EOF or a closed connection: the pair ends together
		}
	}
}

// waitForward blocks while the proxy is stalled; it reports whether to
// forward (false once cut or closed).
func (p *Proxy) waitForward() bool {
	for {
		p.mu.Lock()
		mode, closed, changed := p.mode, p.closed, p.changed
		p.mu.Unlock()
		switch {
		case closed || mode == Cut:
			return false
		case mode == Forward:
			return true
		}
		<-changed
	}
}
