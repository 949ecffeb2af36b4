package web_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/stationedge/edged"
)

// The cloud profile and the uplink's counters show in /api/v1/status and
// /metrics, beside the contract's fields.
func TestUplinkProfileFigures(t *testing.T) {
	s := newStation(t)
	s.src.set(func(f *fakeSources) {
		f.uplink = edged.UplinkStatus{State: "connected", Profile: "aliyun", Identity: "a1pk/st01",
			MessagesSent: 21, EventsSent: 3000, Batches: 15, PacingWaits: 4, Refused: 1, LiveEvents: 2, DownHeld: 3}
	})
	var got struct {
		Uplink struct {
			State        string    `json:"state"`
			Profile      string    `json:"profile"`
			Identity     string    `json:"identity"`
			MessagesSent uint64    `json:"messages_sent"`
			EventsSent   uint64    `json:"events_sent"`
			Batches      uint64    `json:"batches"`
			PacingWaits  uint64    `json:"pacing_waits"`
			Refused      uint64    `json:"refused"`
			LiveEvents   uint64    `json:"live_events"`
			DownHeld     uint64    `json:"down_held"`
			Outbox       *struct{} `json:"outbox"`
		} `json:"uplink"`
	}
	s.get("/api/v1/status", &got)
	u := got.Uplink
	if u.State != "connected" || u.Profile != "aliyun" || u.Identity != "a1pk/st01" || u.MessagesSent != 21 ||
		u.EventsSent != 3000 || u.Batches != 15 || u.PacingWaits != 4 || u.Refused != 1 || u.LiveEvents != 2 || u.DownHeld != 3 || u.Outbox == nil {
		t.Errorf("uplink = %+v", u)
	}

	r := s.do(req{path: "/metrics"})
	if r.code != http.StatusOK {
		t.Fatalf("metrics: %d", r.code)
	}
	for _, line := range []string{
		`edged_uplink_profile{profile="aliyun"} 1`,
		`edged_uplink_messages_sent_total 21`,
		`edged_uplink_events_sent_total 3000`,
		`edged_uplink_batches_total 15`,
		`edged_uplink_pacing_waits_total 4`,
		`edged_uplink_refused_total 1`,
		`edged_uplink_live_events_total 2`,
		`edged_uplink_down_held_total 3`,
	} {
		if !strings.Contains(string(r.body), "\n"+line+"\n") {
			t.Errorf("metrics lack %q", line)
		}
	}
}
