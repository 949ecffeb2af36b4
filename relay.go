package edged

import (
	"context"
	"encoding/json"
)

// Relayed rentals (§2): while the station's internet is down, the renter's
// phone hands the cloud's signed rental message to the device, and the
// device publishes it on devices/D/grants. The station decides it exactly
// as if the cloud had sent it, and answers the device with a rental_result
// command.

// ViaDevice marks a rental (and its rental.result events) that a device
// relayed, so the cloud can tell it from its own deliveries.
const ViaDevice = "device"

// ActionRentalResult is the command that answers a relayed rental message.
const ActionRentalResult = "rental_result"

// MaxRelaysPerMinute bounds the rental messages one device may relay in any
// minute; the links drop and count the rest (§2), so a device, or whoever
// holds its credentials, cannot turn the relay into a flood of signature
// checks and store writes.
const MaxRelaysPerMinute = 5

// GrantRelay takes rental messages relayed by devices. A device link (the
// local broker) type-asserts its DeviceReporter for it; a reporter without
// it takes no relayed rentals.
type GrantRelay interface {
	// RelayRental decides a rental message that device deviceID published
	// on devices/D/grants. Like CloudHandler.Rental, a refusal is not an
	// error: it is a rental.result event and a rental_result command to the
	// device. While the store cannot write (§4) the device is answered at
	// once (unavailable for a new grant) and nil is returned, the records
	// waiting in memory. An error means nothing was decided: the link must
	// not acknowledge the message as taken.
	RelayRental(ctx context.Context, deviceID string, payload []byte) error
}

// RentalResultArgs are the args of a rental_result command (§2): what the
// device can show the renter.
type RentalResultArgs struct {
	RentalID string `json:"rental_id"`
	Op       string `json:"op"`
	OK       bool   `json:"ok"`
	Reason   Reason `json:"reason,omitempty"`
	DeviceID string `json:"device_id"`
}

// decision is the rental message a Station is deciding, so that the
// rental.result events answering it are marked with where it came from.
type decision struct {
	rentalID, op string // as in the message's rental.result
	relayedBy    string // the relaying device, empty for the cloud
	answered     bool   // the relaying device was sent its rental_result
	// answeredLater is set when a follow-up of the decision answered the
	// relaying device: a grant the store could not write, refused then.
	answeredLater *bool
}

// via is what a rental decided now records in Rental.Via.
func (d decision) via() string {
	if d.relayedBy != "" {
		return ViaDevice
	}
	return ""
}

// answers reports whether a rental.result with these ids answers the
// message being decided (a cancel also decides its grant's result).
func (d decision) answers(rentalID, op string) bool {
	return d.op != "" && d.rentalID == rentalID && d.op == op
}

// RelayRental decides a rental message relayed by device deviceID on
// devices/D/grants (§2): the cloud's own decision (Rental), with two rules
// before it. Its rental.result events say "via": "device", and each is
// answered to the device with a rental_result command once recorded. Like
// Rental, it returns an error only when nothing could be decided (the store
// cannot be read): the link must then not acknowledge the message.
func (s *Station) RelayRental(ctx context.Context, deviceID string, payload []byte) error {
	return s.applyRental(ctx, payload, deviceID)
}

// relayRuleLocked applies the relay's own rules (§2): none is taken
// without a verify key, since an unsigned grant from a device would be
// anyone's word, and a device relays only grants for itself.
func (s *Station) relayRuleLocked(m RentalMessage, relayedBy string) Reason {
	switch {
	case s.verifyKey == nil:
		return ReasonBadSignature
	case m.DeviceID != relayedBy:
		return ReasonInvalid
	}
	return ""
}

// markRelayedLocked sets Via in a rental.result that answers a relayed
// message: the one being decided, when a device relays it, or, for a
// grant's result decided later (the start's ack or timeout, a cancel), the
// relayed rental's. Doing it where every event is built keeps the rental
// rules free of the relay.
func (s *Station) markRelayedLocked(t EventType, data any) any {
	if t != EventRentalResult {
		return data
	}
	d, ok := data.(RentalResultData)
	if !ok || d.Via != "" {
		return data
	}
	switch {
	case s.deciding.answers(d.RentalID, d.Op):
		d.Via = s.deciding.via()
	case d.Op == OpGrant:
		if l := s.live[d.RentalID]; l != nil {
			d.Via = l.r.Via
		}
	}
	return d
}

// answerRelayedLocked sends a rental_result command for each committed
// rental.result of a relayed message: to the device relaying the message
// being decided, else to the rental's device, which relayed it. A device
// that misses its answer relays the message again and gets the same.
func (s *Station) answerRelayedLocked(ctx context.Context, events []Event) {
	for _, e := range events {
		if e.Type != EventRentalResult {
			continue
		}
		var d RentalResultData
		if json.Unmarshal(e.Data, &d) != nil || d.Via != ViaDevice {
			continue
		}
		to := d.DeviceID
		if s.deciding.relayedBy != "" && s.deciding.answers(d.RentalID, d.Op) {
			to = s.deciding.relayedBy
		}
		args, _ := json.Marshal(RentalResultArgs{RentalID: d.RentalID, Op: d.Op, OK: d.OK, Reason: d.Reason, DeviceID: d.DeviceID})
		s.sendLocked(to, DeviceCommand{CmdID: newCmdID(), Action: ActionRentalResult, Args: args}, false, nil)
		if to == s.deciding.relayedBy {
			s.deciding.answered = true
		}
	}
}

// decided ends the decision of a rental message and returns what its
// caller gets. A relayed message whose decision the store could not write
// yet (it waits in memory, §4) was answered unavailable, or with its
// result, at once: the device has its answer, so the relay is taken rather
// than refused, which would make an MQTT 3.1.1 device reconnect and resend
// it in a loop while the disk is full.
func (s *Station) decided(d decision, err error) error {
	answered := d.answered || d.answeredLater != nil && *d.answeredLater
	if err != nil && answered && ErrorCode(err) == EUNAVAILABLE {
		s.log.Warn("relayed rental answered, its record waits for the store", "device", d.relayedBy,
			"rental", d.rentalID, "op", d.op, "err", err)
		err = nil
	}
	return err
}

// The local broker finds the relay by asserting its reporter, the Station.
var _ GrantRelay = (*Station)(nil)
