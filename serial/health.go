package serial

import (
	"errors"
	"time"

	"github.com/stationedge/edged/serial/modbus"
)

// Counters are request figures of a bus or one device. Every attempt on
// the wire is a request; a retry is another request.
type Counters struct {
	Requests    uint64 `json:"requests"`
	Timeouts    uint64 `json:"timeouts"`     // no reply at all
	CRCErrors   uint64 `json:"crc_errors"`   // a reply with a bad CRC
	FrameErrors uint64 `json:"frame_errors"` // garbage, truncated or mismatched replies
	Exceptions  uint64 `json:"exceptions"`   // Modbus exception replies
	Polls       uint64 `json:"polls"`        // polls that read every register
	FailedPolls uint64 `json:"failed_polls"`
}

// BusHealth is a bus's figures for the status page and metrics: the port,
// the totals of its devices, and each device.
type BusHealth struct {
	Name     string `json:"name"`
	Port     string `json:"port"`
	PortOpen bool   `json:"port_open"`
	// Opens counts successful opens of the port; more than one means it
	// was reopened. PortErrors counts I/O failures of the port itself.
	Opens      uint64 `json:"opens"`
	PortErrors uint64 `json:"port_errors"`
	Counters
	LastError   string         `json:"last_error,omitempty"`
	LastErrorAt time.Time      `json:"last_error_at,omitzero"`
	Devices     []DeviceHealth `json:"devices"`
}

// DeviceHealth is one device's figures.
type DeviceHealth struct {
	DeviceID string `json:"device_id"`
	Unit     int    `json:"unit"`
	// State is "unknown" before the first answer, then "online" or
	// "offline".
	State string `json:"state"`
	Counters
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
	// PollPeriod is the achieved time between polls (a moving average):
	// the poll interval on a bus with time to spare, more on a busy one,
	// the backoff for an offline device.
	PollPeriod time.Duration `json:"poll_period_ns"`
	LastPoll   time.Time     `json:"last_poll,omitzero"`
}

// Health returns the bus's figures now.
func (b *Bus) Health() BusHealth {
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.health
	h.Devices = make([]DeviceHealth, len(b.devices))
	for i, d := range b.devices {
		h.Devices[i] = d.health
	}
	return h
}

// count records one request's outcome for d and the bus.
func (r *runner) count(d *device, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range []*Counters{&d.health.Counters, &r.health.Counters} {
		c.Requests++
		var exc *modbus.ExceptionError
		switch {
		case err == nil:
		case errors.Is(err, modbus.ErrTimeout):
			c.Timeouts++
		case errors.Is(err, modbus.ErrCRC):
			c.CRCErrors++
		case errors.Is(err, modbus.ErrFrame), errors.Is(err, modbus.ErrMismatch):
			c.FrameErrors++
		case errors.As(err, &exc):
			c.Exceptions++
		}
	}
	if err != nil {
		now := time.Now()
		d.health.LastError, d.health.LastErrorAt = err.Error(), now
		r.health.LastError, r.health.LastErrorAt = d.dev.ID+": "+err.Error(), now
	}
}
