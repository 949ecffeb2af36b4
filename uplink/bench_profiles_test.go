package uplink

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/cloudemu"
)

// BenchmarkDrainProfiles drains a 100,000-event backlog through each
// cloud's emulator with the profile's defaults, and reports the time beside
// the floor the profile's rate allows (the first R messages go at once,
// then R a second) and their ratio. Run it with -benchtime 1x.
func BenchmarkDrainProfiles(b *testing.B) {
	const events, devices = 100000, 20
	for _, profile := range []string{edged.ProfileAWS, edged.ProfileAliyun, edged.ProfileGeneric} {
		b.Run(profile, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				c, err := cloudemu.Start(cloudemu.Options{Profile: cloudemu.Profile(profile), Dir: b.TempDir(),
					ProductKey: emuPK, DeviceName: emuDN, DeviceSecret: emuSecret})
				if err != nil {
					b.Fatal(err)
				}
				s := newStation()
				for d := 0; d < devices; d++ {
					s.states.Set(edged.DeviceState{DeviceID: fmt.Sprintf("dev-%02d", d)})
				}
				s.outbox.Append(events, devices)
				cfg := s.config(b, c.URL())
				cfg.Profile, cfg.Window, cfg.Logger = profile, 256, nil
				switch profile {
				case edged.ProfileAWS:
					cfg.KeepAlive, cfg.ClientID = 30*time.Second, "st01"
					cfg.CAFile, cfg.CertFile, cfg.KeyFile = c.CAFile(), c.ClientCertFile(), c.ClientKeyFile()
				case edged.ProfileAliyun:
					cfg.KeepAlive, cfg.CAFile = 30*time.Second, c.CAFile()
					cfg.Aliyun = edged.AliyunConfig{ProductKey: emuPK, DeviceName: emuDN, DeviceSecret: emuSecret}
				}
				u, err := New(cfg)
				if err != nil {
					b.Fatal(err)
				}
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				b.StartTimer()
				start := time.Now()
				go func() { done <- u.Run(ctx) }()
				waitFor(b, 10*time.Minute, "the drain", func() bool { return s.outbox.Len() == 0 })
				took := time.Since(start)
				b.StopTimer()
				cancel()
				<-done
				st := u.Status()
				rate := u.pacer.rate
				floor := time.Duration(0)
				if rate > 0 && int(st.MessagesSent) > rate {
					floor = time.Duration(float64(int(st.MessagesSent)-rate) / float64(rate) * float64(time.Second))
				}
				ratio := "n/a (no rate limit)"
				if floor > 0 {
					ratio = fmt.Sprintf("%.2f", took.Seconds()/floor.Seconds())
					b.ReportMetric(took.Seconds()/floor.Seconds(), "x-floor")
				}
				b.ReportMetric(took.Seconds(), "s/drain")
				b.ReportMetric(float64(events)/took.Seconds(), "events/s")
				v := c.Violations()
				b.Logf("%s: %d events in %v, floor %v at %d/s, ratio %s; %d messages (%d batches), %d pacing waits, %d connects, violations %v",
					profile, events, took.Round(time.Millisecond), floor.Round(time.Millisecond), rate, ratio,
					st.MessagesSent, st.Batches, st.PacingWaits, st.Connects, v)
				if len(v) > 0 {
					b.Errorf("cloud rules broken: %v", v)
				}
				c.Close()
			}
		})
	}
}
