package reliability

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/devicesim"
	"github.com/stationedge/edged/local/web"
	"github.com/stationedge/edged/store"
)

// mqttString is an MQTT length-prefixed string.
func mqttString(s string) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(s)))
	return append(b, s...)
}

func mqttPacket(header byte, body []byte) []byte {
	b := []byte{header}
	n := len(body)
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			break
		}
	}
	return append(b, body...)
}

// connectPacket is an MQTT 3.1.1 CONNECT with username and password.
func connectPacket(clientID, user, pass string) []byte {
	body := append(mqttString("MQTT"), 4, 0xC2, 0, 60)
	body = append(body, mqttString(clientID)...)
	body = append(body, mqttString(user)...)
	body = append(body, mqttString(pass)...)
	return mqttPacket(0x10, body)
}

// rawConnect dials, sends CONNECT and returns the CONNACK return code and
// the open connection.
func rawConnect(addr, id, user, pass string) (byte, net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return 0, nil, err
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(connectPacket(id, user, pass)); err != nil {
		c.Close()
		return 0, nil, err
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		c.Close()
		return 0, nil, err
	}
	c.SetDeadline(time.Time{})
	return ack[3], c, nil
}

// latencies measures a legit device's publish round trips (QoS 1, PUBACK)
// while something else happens.
type latencies struct {
	mu  sync.Mutex
	all []time.Duration
	err int
}

func (l *latencies) probe(d *devicesim.Device, stop <-chan struct{}, wg *sync.WaitGroup) {
	defer wg.Done()
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		case <-time.After(100 * time.Millisecond):
		}
		start := time.Now()
		err := d.Publish("telemetry", map[string]any{"n": i})
		l.mu.Lock()
		if err != nil {
			l.err++
		} else {
			l.all = append(l.all, time.Since(start))
		}
		l.mu.Unlock()
	}
}

func (l *latencies) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.all) == 0 {
		return fmt.Sprintf("no publishes (%d failed)", l.err)
	}
	s := append([]time.Duration(nil), l.all...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	q := func(p float64) time.Duration { return s[int(p*float64(len(s)-1))].Round(100 * time.Microsecond) }
	return fmt.Sprintf("%d publishes, p50 %v, p99 %v, max %v, %d failed", len(s), q(0.5), q(0.99), s[len(s)-1].Round(100*time.Microsecond), l.err)
}

func (l *latencies) failed() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// TestFloods runs the real binary and floods its devices' broker: CONNECTs
// with bad credentials (made-up ids, and a real id with wrong secrets),
// every device reconnecting at once, and one device publishing as fast as
// it can. Throughout, a legit device's publish latency and a rental
// grant's latency are measured and printed (not asserted tightly), and
// the binary's RSS is compared before and after.
//
// CI: 2,000 bad CONNECTs, 500 devices. EDGED_LONG=1: 10,000 and 5,000.
func TestFloods(t *testing.T) {
	bin := edgedBinary(t)
	bad, storm := pick(2000, 10000), pick(500, 5000)
	dir := t.TempDir()
	cl := newCloud(t)
	local := freeAddr(t)
	var ids []string
	for i := 0; i < storm; i++ {
		ids = append(ids, fmt.Sprintf("dev-%05d", i))
	}
	ids = append(ids, "legit", "chair-1", "flooder")
	cfg := writeConfig(t, stationConfig{Dir: dir, Cloud: cl.Addr, Devices: ids,
		Extra: fmt.Sprintf("local: {listen: %q, max_clients: %d}\n", local, storm+100)})
	logPath := filepath.Join(dir, "edged.log")
	dumpLog(t, logPath)
	d := startDaemon(t, []string{bin, "-config", cfg}, local, logPath)
	pid := d.cmd.Process.Pid

	legit := &devicesim.Device{ID: "legit", Secret: testSecret, Broker: "tcp://" + local}
	if err := legit.Connect(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	defer legit.Disconnect()
	chair := &devicesim.Device{ID: "chair-1", Secret: testSecret, Broker: "tcp://" + local}
	if err := chair.Connect(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	defer chair.Disconnect()
	time.Sleep(500 * time.Millisecond)
	before, _ := readProc(pid)

	// grant measures cloud grant -> start command at the device.
	grantN := 0
	grant := func() time.Duration {
		grantN++
		id := fmt.Sprintf("r-%d", grantN)
		start := time.Now()
		cl.send("stations/mall-1/down/rentals", map[string]any{"op": "grant", "rental_id": id, "device_id": "chair-1", "renter_id": "alice", "duration_s": 1})
		for time.Since(start) < 20*time.Second {
			for _, c := range chair.Commands() {
				if c.Action == "start" && c.RentalID == id {
					return time.Since(start)
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
		return -1
	}
	waitIdle := func() {
		for i := 0; i < 100 && chair.Status() != "idle"; i++ {
			time.Sleep(50 * time.Millisecond)
		}
		time.Sleep(2500 * time.Millisecond) // the stop and its grace
	}
	baseline := grant()
	waitIdle()

	phase := func(name string, flood func()) {
		var lat latencies
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go lat.probe(legit, stop, &wg)
		done := make(chan time.Duration)
		go func() {
			time.Sleep(300 * time.Millisecond)
			done <- grant()
		}()
		start := time.Now()
		flood()
		g := <-done
		close(stop)
		wg.Wait()
		ps, _ := readProc(pid)
		t.Logf("%s: took %v; legit device: %s; grant->start %v; edged RSS %d KiB, threads %d, fds %d",
			name, time.Since(start).Round(time.Millisecond), lat.String(), g.Round(time.Millisecond), ps.RSSKB, ps.Threads, ps.FDs)
		if g < 0 {
			t.Errorf("%s: a grant did not reach its device within 20 s", name)
		}
		if lat.failed() > 0 {
			t.Errorf("%s: the legit device's publishes failed %d times", name, lat.failed())
		}
		waitIdle()
	}

	// 1. Bad credentials, 50 at a time: half made-up ids, half a real id
	// with a new wrong secret each time (each costs a bcrypt).
	var refused, accepted, errs atomic.Int64
	phase(fmt.Sprintf("%d bad CONNECTs", bad), func() {
		var wg sync.WaitGroup
		var next atomic.Int64
		for w := 0; w < 50; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := next.Add(1)
					if i > int64(bad) {
						return
					}
					id := fmt.Sprintf("intruder-%d", i)
					if i%2 == 0 {
						id = fmt.Sprintf("dev-%05d", int(i)%storm)
					}
					rc, c, err := rawConnect(local, id, id, fmt.Sprintf("guess-%d", i))
					switch {
					case err != nil:
						errs.Add(1)
					case rc == 0:
						accepted.Add(1)
					default:
						refused.Add(1)
					}
					if c != nil {
						c.Close()
					}
				}
			}()
		}
		wg.Wait()
	})
	t.Logf("bad CONNECTs: %d refused, %d accepted, %d connection errors", refused.Load(), accepted.Load(), errs.Load())
	if accepted.Load() > 0 {
		t.Fatalf("%d CONNECTs with bad credentials were accepted", accepted.Load())
	}

	// 2. Every device connects at once, drops at once, and reconnects at
	// once (a switch rebooting).
	for round := 1; round <= 2; round++ {
		var ok, fail atomic.Int64
		var codesMu sync.Mutex
		codes := map[string]int{}
		conns := make([]net.Conn, storm)
		phase(fmt.Sprintf("%d devices connecting at once (round %d)", storm, round), func() {
			var wg sync.WaitGroup
			for i := 0; i < storm; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					id := ids[i]
					rc, c, err := rawConnect(local, id, id, testSecret)
					if err != nil || rc != 0 {
						fail.Add(1)
						codesMu.Lock()
						codes[fmt.Sprintf("rc=%d err=%v", rc, err != nil)]++
						codesMu.Unlock()
						if c != nil {
							c.Close()
						}
						return
					}
					ok.Add(1)
					conns[i] = c
				}()
			}
			wg.Wait()
		})
		t.Logf("storm round %d: %d connected, %d failed %v", round, ok.Load(), fail.Load(), codes)
		if round == 1 && ok.Load() < int64(storm)*99/100 {
			t.Errorf("storm round %d: only %d of %d devices connected", round, ok.Load(), storm)
		}
		// Round 2 is reported, not asserted: devices reconnecting while
		// their old sessions are still being torn down count against
		// local.max_clients and get CONNACK 3 (server unavailable) until
		// they retry. A finding: see docs/security.md.
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		time.Sleep(time.Second)
	}

	// 3. One device publishes telemetry as fast as it can (QoS 0).
	var sent atomic.Int64
	phase("a device publishing as fast as it can for 5 s", func() {
		rc, c, err := rawConnect(local, "flooder", "flooder", testSecret)
		if err != nil || rc != 0 {
			t.Fatalf("flooder: %v rc %d", err, rc)
		}
		defer c.Close()
		pk := mqttPacket(0x30, append(mqttString("devices/flooder/telemetry"), `{"x":1}`...))
		burst := make([]byte, 0, len(pk)*100)
		for i := 0; i < 100; i++ {
			burst = append(burst, pk...)
		}
		end := time.Now().Add(5 * time.Second)
		for time.Now().Before(end) {
			c.SetWriteDeadline(time.Now().Add(time.Second))
			if _, err := c.Write(burst); err != nil {
				break
			}
			sent.Add(100)
		}
	})
	t.Logf("flooder sent %d publishes in 5 s (%d/s); no local.max_publish_rate set here; local.TestPublishRateLimit shows the limit", sent.Load(), sent.Load()/5)

	after, _ := readProc(pid)
	t.Logf("edged RSS before the floods %d KiB, after %d KiB; threads %d -> %d; fds %d -> %d; baseline grant->start %v",
		before.RSSKB, after.RSSKB, before.Threads, after.Threads, before.FDs, after.FDs, baseline.Round(time.Millisecond))
	if after.FDs > before.FDs+20 {
		t.Errorf("edged holds %d fds after the floods, %d before: connections leak", after.FDs, before.FDs)
	}
	d.stop()
}

// TestSlowloris opens many connections to the technicians' HTTP server
// that send their headers a byte at a time: /healthz still answers for
// everyone else, and the slow connections are closed by the server's
// header timeout.
func TestSlowloris(t *testing.T) {
	if testing.Short() {
		t.Skip("slow")
	}
	n := pick(300, 2000)
	db, err := store.Open(filepath.Join(t.TempDir(), "edged.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	st, err := edged.NewStation(edged.StationOptions{ID: "mall-1", Store: db, Clock: &jumpClock{synced: true}})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Open(ctx); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := web.New(web.Config{Listener: ln, Station: st, Store: db, Clock: &jumpClock{synced: true}, StationID: "mall-1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	addr := ln.Addr().String()

	var closedByServer atomic.Int64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				return
			}
			defer c.Close()
			c.Write([]byte("GET /api/v1/status HTTP/1.1\r\nHost: x\r\n"))
			for {
				select {
				case <-stop:
					return
				case <-time.After(time.Second):
				}
				if _, err := c.Write([]byte("X-a: b\r\n")); err != nil {
					closedByServer.Add(1)
					return
				}
			}
		}()
	}
	time.Sleep(time.Second)
	var worst time.Duration
	for i := 0; i < 10; i++ {
		start := time.Now()
		resp, err := http.Get("http://" + addr + "/healthz")
		if err != nil {
			t.Fatalf("healthz under slowloris: %v", err)
		}
		resp.Body.Close()
		worst = max(worst, time.Since(start))
		time.Sleep(200 * time.Millisecond)
	}
	// Wait past the header timeout for the server to drop them.
	deadline := time.Now().Add(pick(25*time.Second, 60*time.Second))
	for time.Now().Before(deadline) && closedByServer.Load() < int64(n) {
		time.Sleep(500 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("slowloris: %d slow connections; /healthz worst latency %v; %d slow connections closed by the server", n, worst.Round(time.Millisecond), closedByServer.Load())
	if closedByServer.Load() < int64(n)*9/10 {
		t.Errorf("only %d of %d slowloris connections were closed by the server", closedByServer.Load(), n)
	}
}
