// Command notifywait plays systemd's side of sd_notify for
// packaging/install-test.sh: it listens on a unixgram socket (mode 0666, so
// that a daemon running as another user can reach it) and prints every
// notification as one line ("READY=1", "STATUS=...", "WATCHDOG=1"), with
// the assignments of a multi-line datagram on one line joined by " | ".
// It exits 0 after -for, or at once on SIGTERM, so a test never leaves it
// behind for long.
//
//	notifywait -socket /path/notify.sock -for 2m >notify.log
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	path := flag.String("socket", "", "path of the unixgram socket to create")
	life := flag.Duration("for", 2*time.Minute, "how long to listen")
	flag.Parse()
	if *path == "" {
		log.Fatal("notifywait: -socket is required")
	}
	os.Remove(*path)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: *path, Net: "unixgram"})
	if err != nil {
		log.Fatalf("notifywait: %v", err)
	}
	defer os.Remove(*path)
	if err := os.Chmod(*path, 0o666); err != nil {
		log.Fatalf("notifywait: %v", err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		conn.Close()
	}()
	conn.SetReadDeadline(time.Now().Add(*life))
	buf := make([]byte, 4096)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			return // deadline or SIGTERM
		}
		msg := strings.TrimRight(string(buf[:n]), "\n")
		fmt.Println(strings.ReplaceAll(msg, "\n", " | "))
	}
}
