package local

import (
	"strings"
	"testing"

	"github.com/stationedge/edged"
)

// FuzzUpTopic: a device's publish topic is one of its own six up topics
// or nothing: no topic of another device, no wildcard, no trailing level
// slips through the ACL (§2).
func FuzzUpTopic(f *testing.F) {
	for _, s := range []string{"state", "telemetry", "location", "events", "commands/ack", "grants", "commands", "state/x", ""} {
		f.Add("chair-1", "devices/chair-1/"+s)
		f.Add("chair-1", "devices/chair-10/"+s)
	}
	f.Add("chair-1", "devices/chair-1/#")
	f.Add("chair-1", "devices/+/state")
	f.Add("chair-1", "/devices/chair-1/state")
	f.Add("chair", "devices/chair/../chair-2/state")
	f.Fuzz(func(t *testing.T, id, topic string) {
		if !edged.ValidDeviceID(id) {
			return
		}
		kind, ok := upTopic(id, topic)
		if !ok {
			return
		}
		if topic != "devices/"+id+"/"+kind {
			t.Fatalf("upTopic(%q, %q) = %q: not the device's own topic", id, topic, kind)
		}
		if strings.ContainsAny(topic, "+#\x00") {
			t.Fatalf("upTopic accepted %q", topic)
		}
		switch kind {
		case topicState, topicTelemetry, topicLocation, topicEvents, topicAck, topicGrants:
		default:
			t.Fatalf("upTopic(%q, %q) = unknown kind %q", id, topic, kind)
		}
	})
}

// FuzzParse: whatever a device publishes on any of its topics, parse never
// panics and either refuses it as invalid or returns a report.
func FuzzParse(f *testing.F) {
	for _, s := range []string{`{"status":"idle"}`, `{"power_w":1}`, `{"lat":1,"lon":2}`,
		`{"type":"door"}`, `{"cmd_id":"c","ok":true}`, `[]`, `{`, ``, `{"status":"idle","x":{"y":1}}`} {
		for _, k := range []string{topicState, topicTelemetry, topicLocation, topicEvents, topicAck, topicGrants} {
			f.Add(k, []byte(s))
		}
	}
	f.Fuzz(func(t *testing.T, kind string, payload []byte) {
		r, err := parse(kind, payload)
		if err != nil {
			if c := edged.ErrorCode(err); c != edged.EINVALID {
				t.Fatalf("parse(%q, %q): %v has code %q, want invalid", kind, payload, err, c)
			}
			return
		}
		if r == nil {
			switch kind {
			case topicState, topicTelemetry, topicLocation, topicEvents, topicAck, topicGrants:
				t.Fatalf("parse(%q, %q) accepted with no report", kind, payload)
			}
		}
	})
}
