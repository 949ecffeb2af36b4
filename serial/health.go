package serial

import (
	"errors"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/modbus"
)

// Health returns the bus's figures now.
func (b *Bus) Health() edged.BusHealth {
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.health
	h.Devices = make([]edged.BusDeviceHealth, len(b.devices))
	for i, d := range b.devices {
		h.Devices[i] = d.health
	}
	return h
}

// count records one request's outcome for d and the bus.
func (r *runner) count(d *device, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range []*edged.BusCounters{&d.health.BusCounters, &r.health.BusCounters} {
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
