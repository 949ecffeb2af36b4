// Package systemd is edged's side of the contract with the service manager:
// readiness, status and watchdog notifications (sd_notify) and a log/slog
// handler that suits journald.
//
// Every function is safe to call when edged is not run by systemd: without
// NOTIFY_SOCKET the notifications are no-ops, and without JOURNAL_STREAM the
// log handler writes plain text lines with a timestamp.
package systemd

import (
	"context"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Ready tells the service manager that edged is serving (READY=1): call it
// once, after the store is open and the local broker and the HTTP server are
// listening. With Type=notify, systemd holds back "systemctl start" and
// units ordered after edged until then. It is a no-op returning nil when not
// under systemd.
func Ready() error {
	return notify(daemon.SdNotifyReady)
}

// Status sets the one-line STATUS= shown by "systemctl status edged", for
// example "3/5 devices online, uplink connected". Newlines are replaced by
// spaces, since the protocol is one assignment per line.
func Status(s string) error {
	s = strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(s)
	return notify("STATUS=" + s)
}

// Stopping sends STOPPING=1: call it when shutdown starts, so systemd shows
// the unit as deactivating and stops expecting watchdog pings.
func Stopping() error {
	return notify(daemon.SdNotifyStopping)
}

// Watchdog pings WATCHDOG=1 at half the unit's WatchdogSec interval for as
// long as healthy returns nil, and returns when ctx ends. healthy is called
// once per interval from Watchdog's goroutine; it should check only that
// the main loops make progress, not conditions a restart cannot cure (a
// full disk): while it returns an error, or blocks, no ping is sent, so
// systemd kills and restarts edged once WatchdogSec passes without one; a
// transient failure that clears before then does no harm.
//
// When no watchdog is configured for this process (WATCHDOG_USEC unset, or
// WATCHDOG_PID names another process) Watchdog returns at once, so a caller
// may always start it in a goroutine that it waits for.
func Watchdog(ctx context.Context, healthy func() error) {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil || interval <= 0 {
		return
	}
	tick := time.NewTicker(interval / 2)
	defer tick.Stop()
	for {
		if healthy() == nil {
			_ = notify(daemon.SdNotifyWatchdog)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// notify sends one state to NOTIFY_SOCKET, keeping the variable set so that
// later notifications (status, watchdog) still find the socket.
func notify(state string) error {
	_, err := daemon.SdNotify(false, state)
	return err
}
