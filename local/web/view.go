package web

import (
	"time"
)

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
