package edged

import (
	"encoding/json"
	"time"
)

// EventType names an event of the station's log (§3.3).
type EventType string

// Event types of the contract.
const (
	EventRentalResult   EventType = "rental.result"
	EventRentalStarted  EventType = "rental.started"
	EventRentalExtended EventType = "rental.extended"
	EventRentalEnded    EventType = "rental.ended"
	EventCommandResult  EventType = "command.result"
	EventDeviceOnline   EventType = "device.online"
	EventDeviceOffline  EventType = "device.offline"
	EventDeviceEvent    EventType = "device.event"
	EventUnrentedUse    EventType = "device.unrented_use"
	EventOutboxDropped  EventType = "outbox.dropped"
)

// Droppable reports whether events of type t may be dropped when the outbox
// is over its quota (§3.3). Rental and command events never are.
func (t EventType) Droppable() bool {
	switch t {
	case EventDeviceEvent, EventDeviceOnline, EventDeviceOffline:
		return true
	}
	return false
}

// Event is one entry of the station's event log, in the envelope sent
// upstream (§3.3). Seq is assigned by the Store when the event is committed.
type Event struct {
	Seq         uint64          `json:"seq"`
	Station     string          `json:"station"`
	Type        EventType       `json:"type"`
	TS          time.Time       `json:"ts"`
	ClockSynced bool            `json:"clock_synced"`
	Data        json.RawMessage `json:"data"`
}

// RentalResultData is the data of a rental.result event. Op says which
// message (grant, extend, cancel) the result answers; DurationS, edged's
// addition, is an extend's duration_s, so the cloud can tell the results of
// two extends of one rental apart.
type RentalResultData struct {
	RentalID  string `json:"rental_id"`
	DeviceID  string `json:"device_id"`
	Op        string `json:"op,omitempty"`
	DurationS int64  `json:"duration_s,omitempty"`
	OK        bool   `json:"ok"`
	Reason    Reason `json:"reason,omitempty"`
	// Via is ViaDevice when the message answered was relayed by its device
	// (§2, §3.3).
	Via string `json:"via,omitempty"`
}

// RentalStartedData is the data of a rental.started event.
type RentalStartedData struct {
	RentalID  string    `json:"rental_id"`
	DeviceID  string    `json:"device_id"`
	RenterID  string    `json:"renter_id"`
	StartedAt time.Time `json:"started_at"`
	EndsAt    time.Time `json:"ends_at"`
	DurationS int64     `json:"duration_s"`
}

// RentalExtendedData is the data of a rental.extended event.
type RentalExtendedData struct {
	RentalID  string    `json:"rental_id"`
	DeviceID  string    `json:"device_id"`
	RenterID  string    `json:"renter_id"`
	EndsAt    time.Time `json:"ends_at"`
	DurationS int64     `json:"duration_s"`
}

// RentalEndedData is the data of a rental.ended event.
type RentalEndedData struct {
	RentalID string    `json:"rental_id"`
	DeviceID string    `json:"device_id"`
	RenterID string    `json:"renter_id"`
	EndedAt  time.Time `json:"ended_at"`
	UsedS    int64     `json:"used_s"`
	Reason   Reason    `json:"reason"`
}

// CommandResultData is the data of a command.result event.
type CommandResultData struct {
	CmdID    string `json:"cmd_id"`
	DeviceID string `json:"device_id"`
	OK       bool   `json:"ok"`
	Reason   Reason `json:"reason,omitempty"`
	// Error is the device's own error text or code, when it gave one.
	Error string `json:"error,omitempty"`
}

// DeviceData is the data of device.online, device.offline and
// device.unrented_use events.
type DeviceData struct {
	DeviceID string `json:"device_id"`
}

// DeviceEventData is the data of a device.event event.
type DeviceEventData struct {
	DeviceID string          `json:"device_id"`
	Event    json.RawMessage `json:"event"`
}

// OutboxDroppedData is the data of an outbox.dropped event.
type OutboxDroppedData struct {
	Count    uint64 `json:"count"`
	FirstSeq uint64 `json:"first_seq"`
	LastSeq  uint64 `json:"last_seq"`
}

// OutboxStats describes the queue of events not yet acknowledged upstream.
type OutboxStats struct {
	Events     int       `json:"events"`
	Bytes      int64     `json:"bytes"`
	Oldest     time.Time `json:"-"`
	OldestAgeS int64     `json:"oldest_age_s"`
	Dropped    uint64    `json:"dropped"`
	// LastSeq is the seq of the newest event in the log.
	LastSeq uint64 `json:"last_seq"`
}
