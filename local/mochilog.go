package local

import (
	"context"
	"log/slog"
)

// mochiHandler is the slog handler given to mochi. mochi logs at Info on
// every start step and at Warn or Error, with the whole packet (payload
// included), for refusals that our hook already counts and logs: those are
// lowered to Debug so a misbehaving device cannot fill the journal.
type mochiHandler struct {
	h slog.Handler
}

// quiet are mochi's messages that duplicate our own accounting.
var quiet = map[string]bool{
	"":                        true, // listener: a refused or broken connection
	"publish packet error":    true, // our OnPublish refused a v5 publish
	"error processing packet": true,
	"publish packet rejected": true,
}

func (m mochiHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return m.h.Enabled(ctx, l)
}

func (m mochiHandler) Handle(ctx context.Context, r slog.Record) error {
	level := r.Level
	if quiet[r.Message] || level < slog.LevelWarn {
		level = slog.LevelDebug
	}
	if level != r.Level {
		if !m.h.Enabled(ctx, level) {
			return nil
		}
		r2 := slog.NewRecord(r.Time, level, r.Message, r.PC)
		r.Attrs(func(a slog.Attr) bool {
			if a.Key != "pk" && a.Key != "packet" && a.Key != "will" {
				r2.AddAttrs(a)
			}
			return true
		})
		r = r2
	}
	return m.h.Handle(ctx, r)
}

func (m mochiHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return mochiHandler{m.h.WithAttrs(as)}
}

func (m mochiHandler) WithGroup(name string) slog.Handler {
	return mochiHandler{m.h.WithGroup(name)}
}
