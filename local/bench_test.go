package local

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pahov3 "github.com/eclipse/paho.mqtt.golang"
	"github.com/stationedge/edged"
)

// countingReporter only counts, so benchmarks measure the broker.
type countingReporter struct{ n atomic.Int64 }

func (c *countingReporter) DeviceOnline(context.Context, string, bool) error { return nil }
func (c *countingReporter) DeviceState(context.Context, string, edged.StateReport) error {
	c.n.Add(1)
	return nil
}
func (c *countingReporter) DeviceTelemetry(context.Context, string, map[string]any) error {
	c.n.Add(1)
	return nil
}
func (c *countingReporter) DeviceLocation(context.Context, string, edged.Location) error {
	c.n.Add(1)
	return nil
}
func (c *countingReporter) DeviceEvent(context.Context, string, []byte) error {
	c.n.Add(1)
	return nil
}
func (c *countingReporter) DeviceAck(context.Context, string, edged.CommandAck) error {
	c.n.Add(1)
	return nil
}

// benchBroker starts a broker with n devices bench-0..bench-(n-1), all with
// secretA.
func benchBroker(b testing.TB, n int, rep edged.DeviceReporter) (*Broker, []string) {
	b.Helper()
	hash, _ := hashes(b)
	ids := make([]string, n)
	devs := make([]edged.Device, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("bench-%d", i)
		devs[i] = edged.Device{ID: ids[i], Transport: edged.TransportMQTT, SecretHash: hash}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	br, err := New(Config{Listener: ln, Devices: devs, Reporter: rep, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	if err := br.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = br.Close() })
	return br, ids
}

// BenchmarkIngest: 8 paho 3.1.1 clients publish state and events at QoS 1,
// each with up to 32 messages in flight, each acknowledged after the
// reporter returns.
func BenchmarkIngest(b *testing.B) {
	const clients, window = 8, 32
	rep := &countingReporter{}
	br, ids := benchBroker(b, clients, rep)
	cs := make([]pahov3.Client, clients)
	for i, id := range ids {
		o := pahov3.NewClientOptions().AddBroker("tcp://" + br.Addr().String()).
			SetClientID(id).SetUsername(id).SetPassword(secretA).SetProtocolVersion(4).
			SetAutoReconnect(false).SetConnectTimeout(testWaitPeriod)
		cs[i] = pahov3.NewClient(o)
		if tok := cs[i].Connect(); !tok.WaitTimeout(testWaitPeriod) || tok.Error() != nil {
			b.Fatalf("connect: %v", tok.Error())
		}
		defer cs[i].Disconnect(0)
	}
	payloads := [][2]string{
		{"/state", `{"status":"in_use","power_w":120.5,"temp_c":31.2}`},
		{"/events", `{"type":"coin_inserted","amount":200,"currency":"EUR"}`},
	}
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i, c := range cs {
		n := b.N / clients
		if i < b.N%clients {
			n++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var toks []pahov3.Token
			for j := 0; j < n; j++ {
				p := payloads[j%2]
				toks = append(toks, c.Publish("devices/"+ids[i]+p[0], 1, false, []byte(p[1])))
				if len(toks) == window || j == n-1 {
					for _, t := range toks {
						if !t.WaitTimeout(testWaitPeriod) || t.Error() != nil {
							failed.Add(1)
						}
					}
					toks = toks[:0]
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if failed.Load() > 0 {
		b.Fatalf("%d publishes failed", failed.Load())
	}
	if got := rep.n.Load(); got != int64(b.N) {
		b.Fatalf("reported %d of %d", got, b.N)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
}

// BenchmarkIdleClientHeap connects 500 devices over raw sockets (so no
// client library shares the heap) and reports the broker's heap and stack
// per idle connected device. The figure includes the test's own end of
// each socket (a few hundred bytes).
func BenchmarkIdleClientHeap(b *testing.B) {
	const clients = 500
	// The figure does not depend on b.N: measure once, report every run.
	idleOnce.Do(func() {
		br, ids := benchBroker(b, clients, &countingReporter{})
		addr := br.Addr().String()
		// A first connection warms the broker's lazy state up.
		warm := rawConnect(b, addr, ids[0])
		warm.Close()
		waitFor(b, "warm-up offline", func() bool { return br.Stats().Connected == 0 })

		before := memStats()
		conns := make([]net.Conn, 0, clients)
		for _, id := range ids {
			conns = append(conns, rawConnect(b, addr, id))
		}
		waitFor(b, "all connected", func() bool { return br.Stats().Connected == clients })
		after := memStats()
		heap := float64(int64(after.HeapInuse)-int64(before.HeapInuse)) / clients
		stack := float64(int64(after.StackInuse)-int64(before.StackInuse)) / clients
		idleHeap, idleStack = heap, stack
		b.Logf("idle connected device: %.0f B heap + %.0f B goroutine stacks", heap, stack)
		for _, c := range conns {
			c.Close()
		}
		_ = br.Close()
	})
	for range b.N {
	}
	b.ReportMetric(idleHeap, "heap-B/client")
	b.ReportMetric(idleStack, "stack-B/client")
}

var (
	idleOnce            sync.Once
	idleHeap, idleStack float64
)

func memStats() runtime.MemStats {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m
}

// rawConnect sends an MQTT 3.1.1 CONNECT for device id over a bare socket
// and reads the CONNACK.
func rawConnect(b testing.TB, addr, id string) net.Conn {
	b.Helper()
	conn, err := net.DialTimeout("tcp", addr, testWaitPeriod)
	if err != nil {
		b.Fatal(err)
	}
	ack, err := rawExchange(conn, rawConnectPacket(id, id, secretA, 120), 4, testWaitPeriod)
	if err != nil {
		b.Fatal(err)
	}
	if ack[0] != 0x20 || ack[3] != 0 {
		b.Fatalf("connack %x", ack)
	}
	return conn
}
