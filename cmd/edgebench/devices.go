package main

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// fleet is a set of connected simulated devices.
type fleet struct {
	clients []*client
}

// connectFleet connects devices 0..n-1 to addr, 64 at a time. With creds
// each device logs in as itself (edged); without, anonymously with the same
// client ids (mosquitto). sub subscribes each to its commands topic.
// onPublish, when set, gets the device index with every message received.
func connectFleet(addr string, n, window int, creds, sub bool, onPublish func(i int, c *client, topic string, payload []byte)) (*fleet, error) {
	f := &fleet{clients: make([]*client, n)}
	var (
		wg       sync.WaitGroup
		firstErr atomic.Value
		next     atomic.Int64
	)
	for range min(64, max(n, 1)) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || firstErr.Load() != nil {
					return
				}
				o := dialOptions{addr: addr, id: deviceID(i), clean: true, window: window, timeout: 30 * time.Second}
				if creds {
					o.user, o.pass = deviceID(i), secret(i)
				}
				var c *client
				if onPublish != nil {
					o.onPublish = func(topic string, payload []byte) { onPublish(i, c, topic, payload) }
				}
				var err error
				c, err = dial(o)
				if err == nil && sub {
					err = c.subscribe("devices/"+deviceID(i)+"/commands", 30*time.Second)
				}
				if err != nil {
					firstErr.CompareAndSwap(nil, fmt.Errorf("device %d: %w", i, err))
					return
				}
				f.clients[i] = c
			}
		})
	}
	wg.Wait()
	if e, ok := firstErr.Load().(error); ok {
		f.close()
		return nil, e
	}
	return f, nil
}

// acked is the number of PUBACKs the fleet received.
func (f *fleet) acked() int64 {
	var n int64
	for _, c := range f.clients {
		if c != nil {
			n += c.acked.Load()
		}
	}
	return n
}

func (f *fleet) close() {
	var wg sync.WaitGroup
	for _, c := range f.clients {
		if c != nil {
			wg.Go(c.Close)
		}
	}
	wg.Wait()
}
