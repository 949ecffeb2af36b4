package edged

import "time"

// UplinkStatus describes the cloud link for the status page and
// /api/v1/status. The uplink reports it; the page reads it.
type UplinkStatus struct {
	State string `json:"state"`
	// ConnectedSince is when the current connection came up; zero unless
	// connected.
	ConnectedSince time.Time   `json:"connected_since,omitzero"`
	Outbox         OutboxStats `json:"outbox"`
	// LastAckedSeq is the highest seq the cloud broker has acknowledged
	// (PUBACK) and the outbox has released.
	LastAckedSeq uint64 `json:"last_acked_seq"`
	// Reconnects counts connections made after the first one.
	Reconnects int `json:"reconnects"`
	// Connects counts every connection made, the first included.
	Connects int `json:"connects"`
	// LastError is the last connection or delivery error; it stays after
	// the link recovers, as a hint for the technician.
	LastError string `json:"last_error,omitempty"`
	// Profile is the cloud profile (§3.5): generic, aws or aliyun.
	Profile string `json:"profile"`
	// Identity is who the station is at the cloud: the client id, or
	// product key/device name on aliyun. Never a secret.
	Identity string `json:"identity"`
	// MessagesSent counts PUBLISH packets handed to the connection: events,
	// states, presence and renter messages, resends included.
	MessagesSent uint64 `json:"messages_sent"`
	// EventsSent counts events sent, resends included; Batches the event
	// messages that carried a batch (batch_events > 1).
	EventsSent uint64 `json:"events_sent"`
	Batches    uint64 `json:"batches"`
	// PacingWaits counts publishes held back by max_publish_rate.
	PacingWaits uint64 `json:"pacing_waits"`
	// Refused counts events the cloud could not take: larger than
	// max_message_kb on their own, or refused by the cloud connection after
	// connection (each is logged and released from the outbox).
	Refused uint64 `json:"refused"`
	// LiveEvents counts rental and command results also sent ahead of a
	// draining backlog on the live lane (docs/uplink.md); the in-order
	// drain sends each again, so the cloud sees them twice.
	LiveEvents uint64 `json:"live_events"`
	// DownHeld counts retries of cloud messages the station could not
	// store (a full disk), held on the connection rather than dropping it.
	DownHeld uint64 `json:"down_held"`
}

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

// BusCounters are request figures of an RS-485 bus or of one device on
// it. Every attempt on the wire is a request; a retry is another request.
type BusCounters struct {
	Requests    uint64 `json:"requests"`
	Timeouts    uint64 `json:"timeouts"`     // no reply at all
	CRCErrors   uint64 `json:"crc_errors"`   // a reply with a bad CRC
	FrameErrors uint64 `json:"frame_errors"` // garbage, truncated or mismatched replies
	Exceptions  uint64 `json:"exceptions"`   // Modbus exception replies
	Polls       uint64 `json:"polls"`        // polls that read every register
	FailedPolls uint64 `json:"failed_polls"`
}

// BusHealth is an RS-485 bus's figures for the status page and metrics:
// the port, the totals of its devices, and each device. The bus (serial)
// returns it and the page (local/web) reads it: one definition for both.
type BusHealth struct {
	Name     string `json:"name"`
	Port     string `json:"port"`
	PortOpen bool   `json:"port_open"`
	// Opens counts successful opens of the port; more than one means it
	// was reopened. PortErrors counts I/O failures of the port itself.
	Opens      uint64 `json:"opens"`
	PortErrors uint64 `json:"port_errors"`
	BusCounters
	// LastError is the last failure on the bus, prefixed with the device
	// it concerned.
	LastError   string            `json:"last_error,omitempty"`
	LastErrorAt time.Time         `json:"last_error_at,omitzero"`
	Devices     []BusDeviceHealth `json:"devices"`
}

// BusDeviceHealth is the figures of one device on an RS-485 bus.
type BusDeviceHealth struct {
	DeviceID string `json:"device_id"`
	Unit     int    `json:"unit"`
	// State is "unknown" before the first answer, then "online" or
	// "offline".
	State string `json:"state"`
	BusCounters
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
	// PollPeriod is the achieved time between polls (a moving average):
	// the poll interval on a bus with time to spare, more on a busy one,
	// the backoff for an offline device.
	PollPeriod time.Duration `json:"poll_period_ns"`
	LastPoll   time.Time     `json:"last_poll,omitzero"`
}
