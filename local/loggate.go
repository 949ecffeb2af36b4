package local

import (
	"log/slog"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"
)

// logGate keeps a flood of similar warnings (refused logins, bad input)
// out of the journal: per key, at most burst lines per window. What it
// holds back is counted, never lost: with a summary message, one line at
// the window's end says how many lines were held back; without one, the
// count rides on the key's next line that passes.
//
// Keys must be bounded (a fixed kind, or a configured device id), never a
// string a client chose.
type logGate struct {
	log     *slog.Logger
	summary string // message of the end-of-window line; "" to carry the count instead

	mu     sync.Mutex
	window time.Duration
	burst  int
	keys   map[string]*gateWindow
	closed bool
}

// gateWindow is one key's current window.
type gateWindow struct {
	start   time.Time
	logged  int
	held    int         // lines held back in this window, not yet reported
	carried int         // held back in earlier windows, for the next line (no summary)
	timer   *time.Timer // reports held at the window's end (summary)
	attrs   []any       // attributes of the summary line
}

func newLogGate(log *slog.Logger, window time.Duration, burst int, summary string) *logGate {
	return &logGate{log: log, window: window, burst: burst, summary: summary, keys: map[string]*gateWindow{}}
}

// setLimits changes the window and burst (tests).
func (g *logGate) setLimits(window time.Duration, burst int) {
	g.mu.Lock()
	g.window, g.burst = window, burst
	g.mu.Unlock()
}

// allow reports whether a line for key may be logged now and, without a
// summary message, how many lines of key were held back since the last
// one logged. attrs go on the summary line.
func (g *logGate) allow(key string, attrs ...any) (ok bool, heldBefore int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := time.Now()
	w := g.keys[key]
	if w == nil || now.Sub(w.start) >= g.window {
		carried := 0
		if w != nil {
			carried = w.carried + w.held
			if w.timer != nil {
				carried = 0 // its timer reports them
			}
		}
		w = &gateWindow{start: now, carried: carried}
		g.keys[key] = w
	}
	if w.logged < g.burst {
		w.logged++
		heldBefore, w.carried = w.carried, 0
		return true, heldBefore
	}
	w.held++
	if g.summary != "" && w.timer == nil && !g.closed {
		w.attrs = attrs
		w.timer = time.AfterFunc(w.start.Add(g.window).Sub(now), func() { g.report(w) })
	}
	return false, 0
}

// report logs the summary of a window that held lines back.
func (g *logGate) report(w *gateWindow) {
	g.mu.Lock()
	n := w.held
	w.held = 0
	args := append([]any{"count", n, "window", g.window}, w.attrs...)
	g.mu.Unlock()
	if n > 0 {
		g.log.Warn(g.summary, args...)
	}
}

// close reports every window's held lines now and stops the timers.
func (g *logGate) close() {
	g.mu.Lock()
	g.closed = true
	var pending []*gateWindow
	for _, w := range g.keys {
		if w.timer != nil && w.timer.Stop() {
			pending = append(pending, w)
		}
	}
	g.mu.Unlock()
	for _, w := range pending {
		g.report(w)
	}
}

// printable bounds a client-chosen string for the log: at most 64
// characters, with control characters and invalid bytes replaced, so a
// made-up username can neither flood a line nor forge one.
func printable(s string) string {
	const n = 64
	var b strings.Builder
	count := 0
	for _, r := range s {
		if count == n {
			b.WriteString("…")
			break
		}
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			r = '?'
		}
		b.WriteRune(r)
		count++
	}
	return b.String()
}
