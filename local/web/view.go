package web

import (
	"time"

	"github.com/stationedge/edged"
)

// UplinkStatus is the cloud link as the page shows it. It mirrors
// uplink.Status field for field, so cmd/edged converts one into the other
// with a plain conversion; web does not import uplink.
type UplinkStatus struct {
	// State is "connected", "connecting" or "disabled".
	State string
	// ConnectedSince is when the current connection came up; zero unless
	// connected.
	ConnectedSince time.Time
	Outbox         edged.OutboxStats
	LastAckedSeq   uint64
	Reconnects     int
	// Connects counts every connection made, the first included.
	Connects  int
	LastError string
	// Profile is the cloud profile (generic, aws, aliyun) and Identity
	// who the station is there (never a secret).
	Profile, Identity string
	// MessagesSent, EventsSent and Batches count what went up; PacingWaits
	// publishes held back by the rate; Refused events the cloud could not
	// take; LiveEvents results also sent ahead of a draining backlog;
	// DownHeld retries of cloud messages the store could not take.
	MessagesSent, EventsSent, Batches, PacingWaits, Refused, LiveEvents, DownHeld uint64
}

// BusHealth is an RS-485 bus's figures, mirroring serial.BusHealth with the
// request counters flattened.
type BusHealth struct {
	Name        string
	Port        string
	PortOpen    bool
	Opens       uint64
	PortErrors  uint64
	Requests    uint64
	Timeouts    uint64
	CRCErrors   uint64
	FrameErrors uint64
	Exceptions  uint64
	Polls       uint64
	FailedPolls uint64
	LastError   string
	LastErrorAt time.Time
	Devices     []DeviceHealth
}

// DeviceHealth is one serial device's figures, mirroring
// serial.DeviceHealth with the request counters flattened.
type DeviceHealth struct {
	DeviceID string
	Unit     int
	// State is "unknown" before the first answer, then "online" or
	// "offline".
	State       string
	Requests    uint64
	Timeouts    uint64
	CRCErrors   uint64
	FrameErrors uint64
	Exceptions  uint64
	Polls       uint64
	FailedPolls uint64
	LastError   string
	LastErrorAt time.Time
	PollPeriod  time.Duration
	LastPoll    time.Time
}
