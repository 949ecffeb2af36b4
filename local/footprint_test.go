package local

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"regexp"
	"runtime"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// footprint is what a set of idle devices costs the broker's process.
type footprint struct {
	devices                     int
	goroutines                  float64 // per device
	stack, heapInuse, heapAlloc float64 // bytes per device, after GC
	rss                         float64 // VmRSS bytes per device
}

// measureIdle connects n devices over raw sockets, each subscribed to its
// commands topic as real devices are (unless !subscribe), and measures the
// process before and after; gcs is how many collections run before the
// second reading (each may halve an idle goroutine's stack). The devices
// stay connected until the returned function is called.
func measureIdle(tb testing.TB, n, gcs int, subscribe bool) (footprint, func()) {
	br, ids := benchBroker(tb, n, &countingReporter{})
	addr := br.Addr().String()
	// A first connection warms the broker's lazy state up.
	warm := rawConnect(tb, addr, ids[0])
	rawSubscribe(tb, warm, commandsTopic(ids[0]))
	warm.Close()
	waitFor(tb, "warm-up offline", func() bool { return br.Stats().Connected == 0 })

	before, g0, rss0 := settle(4)
	conns := make([]net.Conn, 0, n)
	for _, id := range ids {
		c := rawConnect(tb, addr, id)
		if subscribe {
			rawSubscribe(tb, c, commandsTopic(id))
		}
		conns = append(conns, c)
	}
	waitFor(tb, "all connected", func() bool { return br.Stats().Connected == n })
	after, g1, rss1 := settle(gcs)
	per := func(a, b uint64) float64 { return float64(int64(b)-int64(a)) / float64(n) }
	f := footprint{
		devices:    n,
		goroutines: float64(g1-g0) / float64(n),
		stack:      per(before.StackInuse, after.StackInuse),
		heapInuse:  per(before.HeapInuse, after.HeapInuse),
		heapAlloc:  per(before.HeapAlloc, after.HeapAlloc),
		rss:        per(rss0, rss1),
	}
	return f, func() {
		for _, c := range conns {
			c.Close()
		}
	}
}

// settle runs gcs collections and reads the memory statistics, the
// goroutine count and VmRSS.
func settle(gcs int) (runtime.MemStats, int, uint64) {
	for range gcs {
		runtime.GC()
	}
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m, runtime.NumGoroutine(), vmRSS()
}

// vmRSS is this process's resident set in bytes (0 where /proc is missing).
func vmRSS() uint64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// rawSubscribe subscribes conn to filter at QoS 1 and reads the SUBACK.
func rawSubscribe(tb testing.TB, conn net.Conn, filter string) {
	tb.Helper()
	ack, err := rawExchange(conn, rawSubscribePacket(filter), 5, testWaitPeriod)
	if err != nil {
		tb.Fatal(err)
	}
	if ack[0] != 0x90 || ack[4] != 1 {
		tb.Fatalf("suback %x", ack)
	}
}

// TestIdleDeviceFootprint holds an idle device's cost to what mochi
// itself needs: two goroutines, whose stacks shrink to 4 KiB (the read
// loop) and 2 KiB (the write loop) once a few collections have halved them
// (edged's copy of mochi keeps packets out of the frames the loops park
// under: third_party/mochi-mqtt-server), and about 8 KiB of heap. A frame
// of ours under the park point (a wrapped net.Conn's Read, a hook that
// blocks) would keep the read loop at 16 or 32 KiB.
func TestIdleDeviceFootprint(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("measures memory: not in -short, not under the race detector")
	}
	const n = 200
	// Each collection halves an idle stack at most once: from 16 KiB
	// (a packet handled) to 4 KiB takes two, four leave room.
	f, done := measureIdle(t, n, 4, true)
	defer done()
	t.Logf("per idle device: %.2f goroutines, stack %.0f B, heap %.0f B, VmRSS %.0f B", f.goroutines, f.stack, f.heapInuse, f.rss)
	if f.goroutines > 2.05 {
		t.Errorf("%.2f goroutines per idle device, want 2 (mochi's read and write loops)", f.goroutines)
	}
	if f.stack > 8<<10 {
		t.Errorf("goroutine stacks %.0f B per idle device, want <= %d (4 KiB read loop + 2 KiB write loop)", f.stack, 8<<10)
	}
	if f.heapInuse > 12<<10 {
		t.Errorf("heap %.0f B per idle device, want <= %d", f.heapInuse, 12<<10)
	}
}

// BenchmarkIdleDevices reports what one idle device (connected with its
// secret, subscribed to its commands) costs the broker: goroutines, stack,
// heap after GC and resident memory. EDGED_IDLE_DEVICES sets how many
// (default 1,000), EDGED_IDLE_NOSUB=1 leaves them unsubscribed, and
// EDGED_IDLE_HEAPPROFILE=FILE writes a heap profile of every allocation
// (go tool pprof -sample_index=inuse_space); with -v it also prints the
// goroutines' stacks at their park points, grouped.
func BenchmarkIdleDevices(b *testing.B) {
	n := 1000
	if v, err := strconv.Atoi(os.Getenv("EDGED_IDLE_DEVICES")); err == nil && v > 0 {
		n = v
	}
	if os.Getenv("EDGED_IDLE_HEAPPROFILE") != "" {
		runtime.MemProfileRate = 1 // every allocation, for exact sites
	}
	f, done := measureIdle(b, n, 4, os.Getenv("EDGED_IDLE_NOSUB") == "")
	if testing.Verbose() {
		b.Log(parkStacks())
	}
	if p := os.Getenv("EDGED_IDLE_HEAPPROFILE"); p != "" {
		if w, err := os.Create(p); err == nil {
			_ = pprof.WriteHeapProfile(w)
			w.Close()
		}
	}
	done()
	b.Logf("%d idle devices: %.2f goroutines, stack %.0f B, heap in use %.0f B (alloc %.0f B), VmRSS %.0f B per device",
		n, f.goroutines, f.stack, f.heapInuse, f.heapAlloc, f.rss)
	for range b.N {
	}
	b.ReportMetric(f.stack, "stack-B/dev")
	b.ReportMetric(f.heapInuse, "heap-B/dev")
	b.ReportMetric(f.rss, "rss-B/dev")
	b.ReportMetric(f.goroutines, "goroutines/dev")
}

// parkStacks groups the goroutines by where they are parked and prints,
// for the biggest groups, how many there are and their frames.
func parkStacks() string {
	var buf bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
	// Groups start with "N @ 0x... 0x..." and list "#\t0x...\tfunc+0x..\tfile:line".
	head := regexp.MustCompile(`^(\d+) @`)
	type group struct {
		n      int
		frames []string
	}
	var groups []group
	sc := bufio.NewScanner(&buf)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if m := head.FindStringSubmatch(line); m != nil {
			k, _ := strconv.Atoi(m[1])
			groups = append(groups, group{n: k})
			continue
		}
		if f := strings.Fields(line); len(groups) > 0 && len(f) >= 3 && f[0] == "#" {
			g := &groups[len(groups)-1]
			g.frames = append(g.frames, f[2])
		}
	}
	sort.Slice(groups, func(i, j int) bool { return groups[i].n > groups[j].n })
	var out strings.Builder
	for _, g := range groups[:min(4, len(groups))] {
		fmt.Fprintf(&out, "\n%d goroutines, %d frames:\n  %s", g.n, len(g.frames), strings.Join(g.frames, "\n  "))
	}
	return out.String()
}
