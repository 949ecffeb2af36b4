package main

import (
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/cloudemu"
	"github.com/stationedge/edged/internal/faultproxy"
)

// The aliyun device triple the emulator checks edged's signed login with.
const benchPK, benchDN, benchSecret = "a1bench", "bench", "bench-device-secret"

// profileResult is one profile's drain through its emulator.
type profileResult struct {
	profile          string
	acked            int64         // events the devices got a PUBACK for
	unique           int           // distinct device.event seqs at the cloud
	dup              int           // deliveries beyond the first
	reconnect        time.Duration // cloud up -> first events message
	drain            time.Duration // first events message -> last event
	total            time.Duration // cloud up -> last event
	batch, rate      int           // the profile's batch_events and max_publish_rate
	eventMsgs        int64         // messages on the events topic
	stats            cloudemu.Stats
	violations       map[string]int
	floor            time.Duration // events / (batch × rate); 0 without a rate
	ratio            float64       // drain / floor
	backlogPublishIn time.Duration
}

// runProfileDrain builds a backlog of total device events while edged
// cannot reach the emulator of profile (a faultproxy in front of it, cut),
// then opens the link and measures the drain as the emulator sees it.
func (b *bench) runProfileDrain(profile string, total int) (profileResult, error) {
	res := profileResult{profile: profile}
	const devices = 100
	dir := b.subdir("cloud-" + profile)
	cloud, err := cloudemu.Start(cloudemu.Options{Profile: cloudemu.Profile(profile), Dir: dir,
		ProductKey: benchPK, DeviceName: benchDN, DeviceSecret: benchSecret})
	if err != nil {
		return res, err
	}
	defer cloud.Close()
	eff := edged.DefaultConfig().Uplink
	eff.Profile = profile
	eff = eff.Effective()
	res.batch, res.rate = eff.BatchEvents, eff.MaxPublishRate

	eventsTopic := "stations/" + stationID + "/up/events"
	if profile == edged.ProfileAliyun {
		eventsTopic = "/" + benchPK + "/" + benchDN + "/user/events"
	}
	c := newCounter()
	var msgs atomic.Int64
	if err := cloud.Subscribe(eventsTopic, func(_ string, payload []byte) {
		msgs.Add(1)
		var batch struct {
			Events []struct {
				Seq  uint64 `json:"seq"`
				Type string `json:"type"`
			} `json:"events"`
		}
		if res.batch <= 1 {
			var e struct {
				Seq  uint64 `json:"seq"`
				Type string `json:"type"`
			}
			if json.Unmarshal(payload, &e) == nil {
				batch.Events = append(batch.Events, e)
			}
		} else if json.Unmarshal(payload, &batch) != nil {
			return
		}
		for _, e := range batch.Events {
			if e.Type == "device.event" {
				c.add(strconv.FormatUint(e.Seq, 10))
			}
		}
	}); err != nil {
		return res, err
	}
	link, err := faultproxy.New(cloud.Addr())
	if err != nil {
		return res, err
	}
	defer link.Close()
	link.Cut()

	scheme := "tcp"
	if profile != edged.ProfileGeneric {
		scheme = "tls"
	}
	var up strings.Builder
	fmt.Fprintf(&up, "profile: %s", profile)
	switch profile {
	case edged.ProfileAWS:
		fmt.Fprintf(&up, ", client_id: %s, ca_file: %q, cert_file: %q, key_file: %q, keepalive: 30s",
			stationID, cloud.CAFile(), cloud.ClientCertFile(), cloud.ClientKeyFile())
	case edged.ProfileAliyun:
		fmt.Fprintf(&up, ", ca_file: %q, keepalive: 30s, aliyun: {product_key: %s, device_name: %s, device_secret: %q}",
			cloud.CAFile(), benchPK, benchDN, benchSecret)
	}
	e, err := b.startEdged("profile-"+profile, edgedOptions{devices: devices,
		uplinkURL: scheme + "://" + link.Addr(), uplinkExtra: up.String()})
	if err != nil {
		return res, err
	}
	defer e.proc.kill(9)
	acked, took, err := publishBacklog(e.addr, devices, total, true)
	if err != nil {
		return res, fmt.Errorf("backlog: %w", err)
	}
	res.acked, res.backlogPublishIn = acked, took

	t0 := time.Now()
	link.Restore()
	c.wait(acked, b.idle(30*time.Second), 600*time.Second)
	c.mu.Lock()
	res.unique = len(c.seen)
	res.dup = c.deliveries - len(c.seen)
	if !c.last.IsZero() {
		res.total = c.last.Sub(t0)
		res.reconnect = c.first.Sub(t0)
		res.drain = c.last.Sub(c.first)
	}
	c.mu.Unlock()
	res.eventMsgs = msgs.Load()
	res.stats = cloud.Stats()
	res.violations = cloud.Violations()
	if res.rate > 0 {
		res.floor = time.Duration(float64(total) / float64(res.batch*res.rate) * float64(time.Second))
		res.ratio = res.total.Seconds() / res.floor.Seconds()
	}
	return res, nil
}

func sumViolations(v map[string]int) (int, string) {
	n := 0
	var parts []string
	for k, c := range v {
		n += c
		parts = append(parts, fmt.Sprintf("%s %d", k, c))
	}
	sort.Strings(parts)
	if n == 0 {
		return 0, "0"
	}
	return n, fmt.Sprintf("%d (%s)", n, strings.Join(parts, ", "))
}

// scenarioProfiles: a 100,000-event backlog drained by edged through each
// cloud profile's emulator (internal/cloudemu), against the floor the
// profile's rate allows; generic also beside edged's plain drain to
// mosquitto measured in the same run.
func (b *bench) scenarioProfiles(t *table) error {
	// The targets are for 100,000 events: a quick run drains as many.
	const total = 100000
	targets := map[string]time.Duration{edged.ProfileAWS: 10 * time.Second, edged.ProfileAliyun: 30 * time.Second}
	ref, err := b.runDrain(drainCase{gateway: "edged", kill: "none"}, total)
	if err != nil {
		return fmt.Errorf("reference drain: %w", err)
	}
	b.logf("profiles: reference drain to mosquitto %v, %d of %d", ref.drain.Round(time.Millisecond), ref.unique, ref.acked)
	name := "profiles " + fmtRate(float64(total))
	for _, p := range []string{edged.ProfileAWS, edged.ProfileAliyun, edged.ProfileGeneric} {
		r, err := b.runProfileDrain(p, total)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		nv, vs := sumViolations(r.violations)
		lost := r.acked - int64(r.unique)
		b.logf("profile %s: acked %d, cloud got %d unique, %d dup; %v (reconnect %v, drain %v), floor %v, %d messages, peak %d/s %d B/s, violations %v",
			p, r.acked, r.unique, r.dup, r.total.Round(time.Millisecond), r.reconnect.Round(time.Millisecond), r.drain.Round(time.Millisecond),
			r.floor, r.stats.Publishes, r.stats.PeakRate, r.stats.PeakBytesPerSecond, r.violations)
		limits := "no limit"
		switch p {
		case edged.ProfileAWS:
			limits = fmt.Sprintf("emulated AWS: %d publishes/s, %d KiB/message", cloudemu.AWSMaxPublishRate, cloudemu.AWSMaxMessageBytes>>10)
		case edged.ProfileAliyun:
			limits = fmt.Sprintf("emulated aliyun: %d publishes/s, %d KiB/message", cloudemu.AliyunMaxPublishRate, cloudemu.AliyunMaxMessageBytes>>10)
		}
		floor, ratio := "n/a (no rate)", "n/a"
		if r.floor > 0 {
			floor = fmt.Sprintf("%.1f s (%d × %d/s)", r.floor.Seconds(), r.batch, r.rate)
			ratio = fmt.Sprintf("%.2f", r.ratio)
		}
		t.add(name, p+": time cloud up → last event (reconnect + drain); floor; ratio",
			fmt.Sprintf("%.1f s (%.1f + %.1f); floor %s; ratio %s", r.total.Seconds(), r.reconnect.Seconds(), r.drain.Seconds(), floor, ratio),
			limits, "", "")
		perEvent := float64(r.stats.Bytes) / float64(max(r.unique, 1))
		t.add(name, p+": messages (events messages); peak publishes/s; peak payload bytes/s; payload MB (B/event); loss, dup; rule disconnects",
			fmt.Sprintf("%d (%d); %d/s; %s B/s; %.1f MB (%.0f B); lost %d, dup %d; %s", r.stats.Publishes, r.eventMsgs, r.stats.PeakRate,
				fmtRate(float64(r.stats.PeakBytesPerSecond)), float64(r.stats.Bytes)/1e6, perEvent, lost, r.dup, vs), "", "", "")
		if p == edged.ProfileAWS {
			// AWS IoT Core also limits a connection to 512 KiB/s; it
			// delays rather than disconnects, so the emulator does not
			// enforce it. What that limit alone would make of this drain:
			t.add(name, "aws: time the payload needs at AWS's 512 KiB/s per connection (not emulated)",
				fmt.Sprintf("%.0f s", float64(r.stats.Bytes)/(512*1024)), "", "", "")
		}
		switch p {
		case edged.ProfileGeneric:
			ok := r.total <= ref.drain && nv == 0 && lost == 0
			t.add(name, p+": no slower than the plain drain, 0 rule disconnects, 0 lost", fmt.Sprintf("%.1f s", r.total.Seconds()),
				fmt.Sprintf("plain drain to mosquitto, same run: %.1f s", ref.drain.Seconds()), "<= plain drain's time, 0 disconnects",
				verdict(ok, fmt.Sprintf("%.2fx the plain drain's time, %d disconnects, %d lost", r.total.Seconds()/max(ref.drain.Seconds(), 0.001), nv, lost)))
		default:
			want := targets[p]
			ok := r.total <= want && nv == 0 && lost == 0
			t.add(name, fmt.Sprintf("%s: drained <= %v, 0 rule disconnects, 0 lost", p, want), fmt.Sprintf("%.1f s", r.total.Seconds()), "",
				fmt.Sprintf("<= %v, 0 disconnects", want), verdict(ok, fmt.Sprintf("%.1f s, %d disconnects, %d lost", r.total.Seconds(), nv, lost)))
		}
	}
	return nil
}
