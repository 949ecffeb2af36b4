package edged

import (
	"context"
	"time"
)

// Change is one atomic, durable step of the station: rentals, command
// records, result records and stop records to upsert (a Done stop record is
// deleted) and events to append. A Store commits all of it or none.
type Change struct {
	Rentals  []Rental
	Commands []CommandRecord
	Results  []ResultRecord
	Stops    []StopRecord
	Events   []Event
}

// Empty reports whether c holds nothing to commit.
func (c Change) Empty() bool {
	return len(c.Rentals)+len(c.Commands)+len(c.Results)+len(c.Stops)+len(c.Events) == 0
}

// Store is the station's durable state. Implementations are safe for
// concurrent use.
type Store interface {
	// Commit applies c atomically and durably (fsynced) before it returns,
	// assigning the events consecutive seqs after every event committed
	// before. It returns the events as stored. When the outbox is over its
	// quota, droppable events are dropped first (§3.3). Errors: EUNAVAILABLE
	// when the disk refuses the write, EINTERNAL otherwise.
	Commit(ctx context.Context, c Change) ([]Event, error)

	// Rental returns a rental by id. Errors: ENOTFOUND.
	Rental(ctx context.Context, id string) (Rental, error)
	// Rentals returns the rentals in the given states (all when none are
	// given), newest grant first, at most limit (0: no limit).
	Rentals(ctx context.Context, limit int, states ...RentalState) ([]Rental, error)
	// Command returns a renter command's record. Errors: ENOTFOUND.
	Command(ctx context.Context, cmdID string) (CommandRecord, error)
	// Result returns the result record of a rental message by its
	// ResultKey. Errors: ENOTFOUND.
	Result(ctx context.Context, key string) (ResultRecord, error)
	// Stops returns every stop still to be delivered.
	Stops(ctx context.Context) ([]StopRecord, error)

	// SaveDeviceState records the latest state of a device. It may buffer:
	// latest state is flushed in the background, not fsynced per call.
	SaveDeviceState(s DeviceState)
	// SaveDeviceStateNow records the latest state of a device durably
	// before it returns, for changes a technician is told are saved
	// (maintenance). A state saved meanwhile with a higher Version wins.
	// Errors: EUNAVAILABLE.
	SaveDeviceStateNow(ctx context.Context, s DeviceState) error
	// DeviceStates returns the last saved state of every device.
	DeviceStates(ctx context.Context) ([]DeviceState, error)

	// Events returns logged events with seq > after, oldest first, at most
	// limit; delivered ones included while they are retained.
	Events(ctx context.Context, after uint64, limit int) ([]Event, error)
}

// Outbox is the queue of events not yet acknowledged upstream, drained by
// the uplink in seq order.
type Outbox interface {
	// Pending returns up to limit queued events with seq > after, in order.
	Pending(ctx context.Context, after uint64, limit int) ([]Event, error)
	// Ack removes delivered events from the queue; unknown seqs are ignored.
	Ack(ctx context.Context, seqs ...uint64) error
	// OutboxStats describes the queue; now is used for the oldest age.
	OutboxStats(now time.Time) OutboxStats
	// Notify returns a channel that receives (without blocking the store)
	// whenever events are appended.
	Notify() <-chan struct{}
}

// Clock is the station's time. Now must carry Go's monotonic reading in
// production, so durations survive wall clock jumps. Synced reports whether
// the wall clock is synchronized (§4).
type Clock interface {
	Now() time.Time
	Synced() bool
}

// Commander delivers commands to devices. Send returns once the command is
// on its way; the device's ack comes back through Station.DeviceAck.
// Errors: ENOTFOUND for an unknown device, EUNAVAILABLE when the device
// cannot be reached now.
type Commander interface {
	Send(ctx context.Context, deviceID string, cmd DeviceCommand) error
}

// DeviceReporter is what device links (the local broker, the serial bus)
// report to the station. Every method returns after what must be durable is
// durable, so the link may acknowledge the device afterwards. While the
// store cannot write (§4), DeviceEvent returns an EUNAVAILABLE error (do
// not acknowledge); the others return nil once what they decided is
// enforced, their records waiting in memory for the store.
type DeviceReporter interface {
	DeviceOnline(ctx context.Context, deviceID string, online bool) error
	DeviceState(ctx context.Context, deviceID string, r StateReport) error
	DeviceTelemetry(ctx context.Context, deviceID string, t map[string]any) error
	DeviceLocation(ctx context.Context, deviceID string, l Location) error
	DeviceEvent(ctx context.Context, deviceID string, event []byte) error
	DeviceAck(ctx context.Context, deviceID string, a CommandAck) error
}

// CloudHandler is what the uplink hands the station from the cloud.
// Station implements it.
type CloudHandler interface {
	// Rental applies a message of R/S/down/rentals. It returns nil once the
	// message and its result are durable, so the uplink may acknowledge it;
	// a refused message is not an error (its refusal is a rental.result
	// event). An error means the message is not durable: do not
	// acknowledge. (When the store cannot write, its answer waits in
	// memory and is written once the store can; a redelivery is answered
	// the same.)
	Rental(ctx context.Context, payload []byte) error
	// RenterCommand applies a message of R/S/down/commands, with the same
	// acknowledgement rule as Rental.
	RenterCommand(ctx context.Context, payload []byte) error
}

// StateSource gives the latest state of every device, for coalesced
// publication: a reader takes DeviceStates once, then ChangedSince after
// each signal of StatesChanged, and publishes those whose Version moved.
type StateSource interface {
	// DeviceStates returns the states in a stable order; their maps and
	// pointers may be shared and must not be modified. The highest Version
	// among them is the version they are current as of.
	DeviceStates() []DeviceState
	// ChangedSince returns the states whose Version is above version,
	// oldest change first (shared like DeviceStates'), and the version
	// they are current as of, for the next call. Versions are one counter
	// for all devices, so one cursor serves them all.
	ChangedSince(version uint64) ([]DeviceState, uint64)
	// StatesChanged receives a value (never blocking the station) after
	// any device state changes.
	StatesChanged() <-chan struct{}
}
