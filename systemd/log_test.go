package systemd

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
)

func TestLogHandlerUnderJournal(t *testing.T) {
	t.Setenv("JOURNAL_STREAM", "8:12345")
	var buf bytes.Buffer
	log := slog.New(NewLogHandler(&buf, slog.LevelDebug)).With("system", "uplink")

	log.Debug("dial", "url", "mqtts://cloud")
	log.Info("connected")
	log.Warn("outbox high", "events", 900)
	log.WithGroup("outbox").Error("store write failed", "err", "disk full")

	want := []string{
		`<7>level=DEBUG msg=dial system=uplink url=mqtts://cloud`,
		`<6>level=INFO msg=connected system=uplink`,
		`<4>level=WARN msg="outbox high" system=uplink events=900`,
		`<3>level=ERROR msg="store write failed" system=uplink outbox.err="disk full"`,
	}
	got := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestLogHandlerWithoutJournal(t *testing.T) {
	t.Setenv("JOURNAL_STREAM", "")
	var buf bytes.Buffer
	slog.New(NewLogHandler(&buf, slog.LevelInfo)).Warn("clock not synced")
	slog.New(NewLogHandler(&buf, slog.LevelInfo)).Debug("hidden")

	line := strings.TrimSuffix(buf.String(), "\n")
	re := regexp.MustCompile(`^time=\d{4}-\d\d-\d\dT\S+ level=WARN msg="clock not synced"$`)
	if !re.MatchString(line) {
		t.Errorf("got %q, want a timestamped line without a priority prefix, and no debug line", line)
	}
}

func TestLogHandlerFileMustBeTheJournalStream(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, stream string
		journal      bool
	}{
		{"same device and inode", fmt.Sprintf("%d:%d", st.Dev, st.Ino), true},
		{"another stream", fmt.Sprintf("%d:%d", st.Dev, st.Ino+1), false},
		{"malformed", "garbage", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("JOURNAL_STREAM", tt.stream)
			_, isJournal := NewLogHandler(f, slog.LevelInfo).(*journalHandler)
			if isJournal != tt.journal {
				t.Errorf("got journal format %v, want %v", isJournal, tt.journal)
			}
		})
	}
}

func TestLogHandlerWholeLinesUnderConcurrency(t *testing.T) {
	t.Setenv("JOURNAL_STREAM", "8:1")
	var buf bytes.Buffer
	base := slog.New(NewLogHandler(&buf, slog.LevelInfo))
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		log := base.With("worker", i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 100; j++ {
				log.Info("tick", "n", j)
			}
		}()
	}
	wg.Wait()
	re := regexp.MustCompile(`^<6>level=INFO msg=tick worker=\d n=\d+$`)
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != 800 {
		t.Fatalf("got %d lines, want 800", len(lines))
	}
	for _, l := range lines {
		if !re.MatchString(l) {
			t.Fatalf("torn or malformed line %q", l)
		}
	}
}
