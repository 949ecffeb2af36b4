package local

import (
	"context"
	"strings"

	"github.com/stationedge/edged"
)

// The six topics a device publishes on, below devices/D/ (contract §2).
const (
	topicState     = "state"
	topicTelemetry = "telemetry"
	topicLocation  = "location"
	topicEvents    = "events"
	topicAck       = "commands/ack"
	topicGrants    = "grants" // rental messages relayed from the renter's phone
)

// commandsTopic is the one topic device id subscribes to.
func commandsTopic(id string) string { return "devices/" + id + "/commands" }

// upTopic returns which of device id's own up topics topic is, or false
// when it is not one of them.
func upTopic(id, topic string) (string, bool) {
	rest, ok := strings.CutPrefix(topic, "devices/")
	if !ok {
		return "", false
	}
	rest, ok = strings.CutPrefix(rest, id)
	if !ok {
		return "", false
	}
	rest, ok = strings.CutPrefix(rest, "/")
	if !ok {
		return "", false
	}
	switch rest {
	case topicState, topicTelemetry, topicLocation, topicEvents, topicAck, topicGrants:
		return rest, true
	}
	return "", false
}

// report hands one parsed device message to the station.
type report func(ctx context.Context, r edged.DeviceReporter, deviceID string) error

// parse checks a payload published on a device's up topic with the
// domain's parsers and returns how to report it. Errors are EINVALID.
func parse(kind string, payload []byte) (report, error) {
	if len(payload) > edged.MaxPayload {
		return nil, edged.Errorf(edged.EINVALID, "payload of %d bytes is over %d", len(payload), edged.MaxPayload)
	}
	switch kind {
	case topicState:
		s, err := edged.ParseState(payload)
		if err != nil {
			return nil, err
		}
		return func(ctx context.Context, r edged.DeviceReporter, id string) error { return r.DeviceState(ctx, id, s) }, nil
	case topicTelemetry:
		t, err := edged.ParseTelemetry(payload)
		if err != nil {
			return nil, err
		}
		return func(ctx context.Context, r edged.DeviceReporter, id string) error {
			return r.DeviceTelemetry(ctx, id, t)
		}, nil
	case topicLocation:
		l, err := edged.ParseLocation(payload)
		if err != nil {
			return nil, err
		}
		return func(ctx context.Context, r edged.DeviceReporter, id string) error {
			return r.DeviceLocation(ctx, id, l)
		}, nil
	case topicEvents:
		e, err := edged.ParseDeviceEvent(payload)
		if err != nil {
			return nil, err
		}
		return func(ctx context.Context, r edged.DeviceReporter, id string) error { return r.DeviceEvent(ctx, id, e) }, nil
	case topicAck:
		a, err := edged.ParseAck(payload)
		if err != nil {
			return nil, err
		}
		return func(ctx context.Context, r edged.DeviceReporter, id string) error { return r.DeviceAck(ctx, id, a) }, nil
	case topicGrants:
		return parseGrant(payload)
	}
	return nil, edged.Errorf(edged.EINVALID, "not an up topic: %q", kind)
}
