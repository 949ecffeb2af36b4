package systemd

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"syscall"
)

// NewLogHandler returns the slog handler for the daemon's one logger: text
// lines ("level=INFO msg=... key=value") written to w at level and above.
//
// Under journald it prefixes each line with the sd-daemon priority "<N>"
// (sd-daemon(3): debug 7, info 6, warning 4, error 3) and omits the time, so
// journald records the level as the entry's PRIORITY and does not show two
// timestamps. edged counts as under journald when JOURNAL_STREAM is set and,
// if w is an *os.File, w is that very stream (same device and inode), as
// systemd.exec(5) advises; a plain io.Writer only needs the variable. So a
// shell started from the unit with stdout redirected to a file gets ordinary
// timestamped lines.
func NewLogHandler(w io.Writer, level slog.Leveler) slog.Handler {
	if !underJournal(w) {
		return slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})
	}
	j := &journalHandler{out: w, mu: new(sync.Mutex), buf: new(bytes.Buffer)}
	j.text = slog.NewTextHandler(j.buf, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{} // journald stamps the entry itself
			}
			return a
		},
	})
	return j
}

// underJournal reports whether lines written to w reach journald's stream
// transport.
func underJournal(w io.Writer) bool {
	js := os.Getenv("JOURNAL_STREAM")
	if js == "" {
		return false
	}
	f, ok := w.(*os.File)
	if !ok {
		return true
	}
	var dev, ino uint64
	if _, err := fmt.Sscanf(js, "%d:%d", &dev, &ino); err != nil {
		return false
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return uint64(st.Dev) == dev && st.Ino == ino
}

// journalHandler formats a record with a text handler into a buffer, then
// writes it to out behind its sd-daemon priority prefix in a single Write, so
// that journald sees one whole line per record. Handlers derived with
// WithAttrs and WithGroup share the mutex and the buffer.
type journalHandler struct {
	out  io.Writer
	mu   *sync.Mutex
	buf  *bytes.Buffer
	text slog.Handler // writes into buf
}

func (h *journalHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.text.Enabled(ctx, l)
}

func (h *journalHandler) Handle(ctx context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.buf.Reset()
	fmt.Fprintf(h.buf, "<%d>", priority(r.Level))
	if err := h.text.Handle(ctx, r); err != nil {
		return err
	}
	_, err := h.out.Write(h.buf.Bytes())
	return err
}

func (h *journalHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	c := *h
	c.text = h.text.WithAttrs(attrs)
	return &c
}

func (h *journalHandler) WithGroup(name string) slog.Handler {
	c := *h
	c.text = h.text.WithGroup(name)
	return &c
}

// priority maps a slog level to a syslog priority as sd-daemon(3) spells
// them; levels between slog's named ones round towards the less severe.
func priority(l slog.Level) int {
	switch {
	case l >= slog.LevelError:
		return 3 // err
	case l >= slog.LevelWarn:
		return 4 // warning
	case l >= slog.LevelInfo:
		return 6 // info
	default:
		return 7 // debug
	}
}
