package edged

import (
	"context"
)

// BrokerStats are the local broker's counters, for the status page and
// metrics. The broker (local) returns them and the page (local/web) reads
// them: one definition for both.
type BrokerStats struct {
	AuthFailures uint64 // CONNECTs refused: unknown device, wrong secret, bad client id or will
	ACLDenials   uint64 // publishes and subscriptions outside the device's own topics
	BadInput     uint64 // payloads over 64 KiB or not what the topic needs
	MessagesIn   uint64 // device messages reported to the station
	MessagesOut  uint64 // commands published to devices
	Connected    int    // devices connected now
	Throttled    uint64 // publishes held back by local.max_publish_rate
	RelayDropped uint64 // relayed rental messages dropped: over the limit, or no relay
}

// StationView is what the technicians' page reads and asks of the
// station. Station implements it; the page needs nothing else of it.
type StationView interface {
	ID() string
	DeviceStates() []DeviceState
	// Device errors: ENOTFOUND.
	Device(id string) (DeviceState, error)
	ActiveRentals() []Rental
	Stats() StationStats
	// SetMaintenance errors: ENOTFOUND, EUNAVAILABLE.
	SetMaintenance(ctx context.Context, id string, on bool) error
	// EndRental errors: ENOTFOUND, EUNAVAILABLE.
	EndRental(ctx context.Context, rentalID string, reason Reason) error
}

var _ StationView = (*Station)(nil)
