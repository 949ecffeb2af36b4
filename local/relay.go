package local

import (
	"context"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stationedge/edged"
)

// relayWindow is the span over which edged.MaxRelaysPerMinute counts.
const relayWindow = time.Minute

// relayLimit remembers when each device's relayed rental messages were let
// through, so that at most edged.MaxRelaysPerMinute pass in any minute.
// Unlike local.max_publish_rate, which slows a device down, a relay over
// the limit is dropped: holding it would only delay the flood, and each
// relay costs a signature check and a store write.
type relayLimit struct {
	mu sync.Mutex
	// passed holds, per device, the times of the relays let through in the
	// last minute, oldest first: at most edged.MaxRelaysPerMinute each, and
	// keyed only by authenticated device ids, so it stays small.
	passed map[string][]time.Time
}

// allow reports whether device id may relay one more message at now, and
// if so records it.
func (l *relayLimit) allow(id string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.passed == nil {
		l.passed = make(map[string][]time.Time)
	}
	recent := l.passed[id]
	for len(recent) > 0 && now.Sub(recent[0]) >= relayWindow {
		recent = recent[1:]
	}
	if len(recent) >= edged.MaxRelaysPerMinute {
		l.passed[id] = recent
		return false
	}
	l.passed[id] = append(recent, now)
	return true
}

// admitRelay decides whether a rental message that device id published on
// devices/D/grants goes to the station: only when the reporter takes
// relayed rentals (edged.GrantRelay) and the device is within its limit.
// A refused one is counted and logged (rate-limited), and the device gets
// the code for an MQTT 5 negative PUBACK; its connection stays.
func (b *Broker) admitRelay(id string) (packets.Code, bool) {
	if _, ok := b.reporter.(edged.GrantRelay); !ok {
		b.relayDropped.Add(1)
		b.warn("relay", "relayed rental dropped: the station takes none", "device", id)
		return packets.ErrImplementationSpecificError, false
	}
	if !b.relays.allow(id, time.Now()) {
		b.relayDropped.Add(1)
		b.warn("relay", "relayed rental dropped: over the limit", "device", id, "per_minute", edged.MaxRelaysPerMinute)
		return packets.ErrQuotaExceeded, false
	}
	return packets.Code{}, true
}

// parseGrant checks a relayed rental message as far as the link can (a
// JSON object within MaxPayload); the station checks the rest and answers
// the device itself.
func parseGrant(payload []byte) (report, error) {
	if err := edged.ValidObject(payload); err != nil {
		return nil, err
	}
	return func(ctx context.Context, r edged.DeviceReporter, id string) error {
		g, ok := r.(edged.GrantRelay)
		if !ok {
			return edged.Errorf(edged.EINVALID, "the station takes no relayed rentals")
		}
		return g.RelayRental(ctx, id, payload)
	}, nil
}
