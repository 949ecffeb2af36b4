package edged

import "context"

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
	// device. An error means nothing was stored: the link must not
	// acknowledge the message as taken.
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
