package serial

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/sim"
)

// contractProfile is charger-v1 exactly as §5 of the contract shows it.
var contractProfile = edged.Profile{
	Status: &edged.StatusRegister{Table: "holding", Address: 0,
		Values: map[int]edged.Status{0: edged.StatusIdle, 1: edged.StatusInUse, 2: edged.StatusFault}},
	Telemetry: []edged.TelemetryRegister{{Name: "power_w", Table: "input", Address: 2},
		{Name: "temp_c", Table: "input", Address: 3, Scale: 0.1}},
	Commands: map[string]edged.CommandRegister{
		"start": {Table: "holding", Address: 16, Value: "{duration_s}"},
		"stop":  {Table: "holding", Address: 17, Value: "1"},
	},
}

// BenchmarkPollRate polls eight charger-v1 devices on one pty bus as fast
// as the bus goes (a 10 ms poll interval saturates it) and reports polls
// per second beside the wire limit: the baud rate divided by the bits one
// poll puts on the wire (its requests and replies, 10 bits a byte at 8N1),
// and the ratio of the two. The rest is the 3.5-character gaps on each
// side of every frame and the pty's and scheduler's latency.
//
//	go test -run '^$' -bench PollRate ./serial/
func BenchmarkPollRate(b *testing.B) {
	for _, baud := range []int{9600, 115200} {
		b.Run(fmt.Sprint(baud), func(b *testing.B) {
			s, err := sim.Start(sim.Options{Dir: b.TempDir(), Baud: baud})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			var devs []edged.Device
			for n := 1; n <= 8; n++ {
				s.Add(byte(n), sim.Charger())
				devs = append(devs, edged.Device{ID: devID(n), Transport: edged.TransportSerial, Bus: "bus0", Unit: n, Profile: "charger-v1"})
			}
			bc := edged.Bus{Name: "bus0", Port: s.Path(), Baud: baud, DataBits: 8, Parity: "none", StopBits: 1,
				Timeout: 200 * time.Millisecond, PollInterval: 10 * time.Millisecond}
			bus, err := NewBus(Config{Bus: bc, Devices: devs, Profiles: map[string]edged.Profile{"charger-v1": contractProfile},
				Reporter: newFakeReporter()})
			if err != nil {
				b.Fatal(err)
			}
			bits := 0
			for _, r := range bus.devices[0].reads {
				bits += (r.RequestLen() + r.ResponseLen()) * BitsPerChar(bc)
			}
			wireLimit := float64(baud) / float64(bits)

			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- bus.Run(ctx) }()
			defer func() { cancel(); <-done }()
			deadline := time.Now().Add(10 * time.Second)
			for bus.Health().Polls < 8 { // every device polled once
				if time.Now().After(deadline) {
					b.Fatal("bus did not start polling")
				}
				time.Sleep(5 * time.Millisecond)
			}
			b.ResetTimer()
			start, first := time.Now(), bus.Health().Polls
			deadline = start.Add(time.Minute)
			for bus.Health().Polls-first < uint64(b.N) && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			h := bus.Health()
			rate := float64(h.Polls-first) / time.Since(start).Seconds()
			b.ReportMetric(rate, "polls/s")
			b.ReportMetric(wireLimit, "wire-polls/s")
			b.ReportMetric(rate/wireLimit, "of-wire")
			if h.Timeouts+h.CRCErrors+h.FrameErrors != 0 {
				b.Errorf("errors on a clean bus: %+v", h.BusCounters)
			}
		})
	}
}
