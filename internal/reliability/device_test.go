package reliability

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stationedge/edged/internal/devicesim"
)

// chattyDevice is a simulated device that keeps publishing device events
// (each with a unique id) and reconnects whenever the station comes back.
// It records which events got their PUBACK: those the station promised to
// keep.
type chattyDevice struct {
	ID, Broker string
	Pause      time.Duration

	mu    sync.Mutex
	acked []string
	sent  atomic.Int64
}

// run publishes until stop is closed.
func (c *chattyDevice) run(stop <-chan struct{}, wg *sync.WaitGroup) {
	defer wg.Done()
	var d *devicesim.Device
	n := 0
	for {
		select {
		case <-stop:
			if d != nil {
				d.Disconnect()
			}
			return
		default:
		}
		if d == nil {
			d = &devicesim.Device{ID: c.ID, Secret: testSecret, Broker: c.Broker}
			if err := d.Connect(time.Second); err != nil {
				d = nil
				time.Sleep(100 * time.Millisecond)
				continue
			}
		}
		n++
		id := fmt.Sprintf("%s-%d", c.ID, n)
		c.sent.Add(1)
		if err := d.Publish("events", map[string]any{"type": "tick", "id": id}); err != nil {
			d.Disconnect()
			d = nil
			continue
		}
		c.mu.Lock()
		c.acked = append(c.acked, id)
		c.mu.Unlock()
		if c.Pause > 0 {
			time.Sleep(c.Pause)
		}
	}
}

func (c *chattyDevice) Acked() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.acked...)
}
