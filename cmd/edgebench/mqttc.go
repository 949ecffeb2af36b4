package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// client is a lean MQTT 3.1.1 client for load generation: one goroutine
// reads, the caller writes. paho costs three goroutines, a router and a
// token per message for each client, which at 5,000 clients on 2 cores
// would take CPU from the broker under test; this client costs one
// goroutine and a semaphore. CONNECT and SUBSCRIBE are encoded with
// mochi's packets package; PUBLISH and PUBACK, the hot path, by hand.
type client struct {
	id   string
	conn net.Conn

	wmu    sync.Mutex // guards bw and nextID
	bw     *bufio.Writer
	nextID uint16

	// window holds one token per QoS 1 publish awaiting its PUBACK.
	window chan struct{}
	acked  atomic.Int64
	// onPublish, when set, gets every PUBLISH received (before its PUBACK
	// is sent). It runs on the read goroutine.
	onPublish func(topic string, payload []byte)

	connack chan byte
	suback  chan struct{}
	done    chan struct{} // closed when the read goroutine ends
	err     atomic.Value
}

// dialOptions configure dial.
type dialOptions struct {
	addr, id, user, pass string
	clean                bool
	window               int
	timeout              time.Duration
	onPublish            func(topic string, payload []byte)
}

// dial connects and waits for a successful CONNACK.
func dial(o dialOptions) (*client, error) {
	if o.window <= 0 {
		o.window = 1
	}
	if o.timeout == 0 {
		o.timeout = 10 * time.Second
	}
	nc, err := net.DialTimeout("tcp", o.addr, o.timeout)
	if err != nil {
		return nil, err
	}
	c := &client{id: o.id, conn: nc, bw: bufio.NewWriterSize(nc, 4096), window: make(chan struct{}, o.window),
		connack: make(chan byte, 1), suback: make(chan struct{}, 1), done: make(chan struct{}), onPublish: o.onPublish}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4}
	pk.Connect = packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: o.id, Clean: o.clean, Keepalive: 600}
	if o.user != "" {
		pk.Connect.UsernameFlag, pk.Connect.Username = true, []byte(o.user)
		pk.Connect.PasswordFlag, pk.Connect.Password = true, []byte(o.pass)
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Now().Add(o.timeout))
	if _, err := nc.Write(buf.Bytes()); err != nil {
		nc.Close()
		return nil, err
	}
	go c.read()
	select {
	case rc := <-c.connack:
		if rc != 0 {
			nc.Close()
			return nil, fmt.Errorf("%s: connack %d", o.id, rc)
		}
	case <-c.done:
		return nil, fmt.Errorf("%s: connect: %v", o.id, c.Err())
	case <-time.After(o.timeout):
		nc.Close()
		return nil, fmt.Errorf("%s: connack timed out", o.id)
	}
	nc.SetDeadline(time.Time{})
	return c, nil
}

// Err is why the read goroutine stopped.
func (c *client) Err() error {
	if e, ok := c.err.Load().(error); ok {
		return e
	}
	return nil
}

// Close closes the connection and waits for the reader.
func (c *client) Close() {
	c.conn.Close()
	<-c.done
}

// subscribe subscribes to filter at QoS 1 and waits for the SUBACK.
func (c *client) subscribe(filter string, timeout time.Duration) error {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4,
		PacketID: 65535, Filters: packets.Subscriptions{{Filter: filter, Qos: 1}}}
	var buf bytes.Buffer
	if err := pk.SubscribeEncode(&buf); err != nil {
		return err
	}
	c.wmu.Lock()
	c.bw.Write(buf.Bytes())
	err := c.bw.Flush()
	c.wmu.Unlock()
	if err != nil {
		return err
	}
	select {
	case <-c.suback:
		return nil
	case <-c.done:
		return fmt.Errorf("%s: subscribe: %v", c.id, c.Err())
	case <-time.After(timeout):
		return fmt.Errorf("%s: suback timed out", c.id)
	}
}

// publish queues a QoS 1 publish; it blocks while the window is full and
// flushes before blocking. flush forces the write out now.
func (c *client) publish(topic string, payload []byte, flush bool) error {
	select {
	case c.window <- struct{}{}:
	default:
		c.wmu.Lock()
		err := c.bw.Flush()
		c.wmu.Unlock()
		if err != nil {
			return err
		}
		select {
		case c.window <- struct{}{}:
		case <-c.done:
			return fmt.Errorf("%s: %v", c.id, c.Err())
		}
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.nextID++
	if c.nextID == 0 || c.nextID == 65535 { // 65535 is the SUBSCRIBE's id
		c.nextID = 1
	}
	rem := 2 + len(topic) + 2 + len(payload)
	var hdr [5]byte
	hdr[0] = 0x32 // PUBLISH, QoS 1
	n := 1 + putVarint(hdr[1:], rem)
	c.bw.Write(hdr[:n])
	c.bw.WriteByte(byte(len(topic) >> 8))
	c.bw.WriteByte(byte(len(topic)))
	c.bw.WriteString(topic)
	c.bw.WriteByte(byte(c.nextID >> 8))
	c.bw.WriteByte(byte(c.nextID))
	_, err := c.bw.Write(payload)
	if flush && err == nil {
		err = c.bw.Flush()
	}
	return err
}

// flush writes out buffered publishes.
func (c *client) flush() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.bw.Flush()
}

// drainWindow waits until every publish has its PUBACK, or until timeout.
func (c *client) drainWindow(timeout time.Duration) bool {
	c.flush()
	deadline := time.Now().Add(timeout)
	for len(c.window) > 0 {
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-c.done:
			return false
		case <-time.After(2 * time.Millisecond):
		}
	}
	return true
}

func putVarint(b []byte, v int) int {
	i := 0
	for {
		d := byte(v % 128)
		v /= 128
		if v > 0 {
			d |= 0x80
		}
		b[i] = d
		i++
		if v == 0 {
			return i
		}
	}
}

func (c *client) read() {
	defer close(c.done)
	br := bufio.NewReaderSize(c.conn, 16<<10)
	var body []byte
	for {
		h, err := br.ReadByte()
		if err != nil {
			c.err.Store(err)
			return
		}
		rem, mul := 0, 1
		for i := 0; ; i++ {
			b, err := br.ReadByte()
			if err != nil {
				c.err.Store(err)
				return
			}
			rem += int(b&0x7f) * mul
			mul *= 128
			if b&0x80 == 0 {
				break
			}
			if i == 3 {
				c.err.Store(errors.New("bad remaining length"))
				return
			}
		}
		if cap(body) < rem {
			body = make([]byte, rem)
		}
		body = body[:rem]
		if _, err := io.ReadFull(br, body); err != nil {
			c.err.Store(err)
			return
		}
		switch h >> 4 {
		case packets.Connack:
			if len(body) >= 2 {
				c.connack <- body[1]
			}
		case packets.Puback:
			select {
			case <-c.window:
				c.acked.Add(1)
			default:
			}
		case packets.Suback:
			select {
			case c.suback <- struct{}{}:
			default:
			}
		case packets.Publish:
			qos := (h >> 1) & 3
			if len(body) < 2 {
				continue
			}
			tl := int(binary.BigEndian.Uint16(body))
			if len(body) < 2+tl {
				continue
			}
			topic := string(body[2 : 2+tl])
			off := 2 + tl
			var id uint16
			if qos > 0 && len(body) >= off+2 {
				id = binary.BigEndian.Uint16(body[off:])
				off += 2
			}
			if c.onPublish != nil {
				c.onPublish(topic, body[off:])
			}
			if qos > 0 {
				c.wmu.Lock()
				c.bw.Write([]byte{0x40, 2, byte(id >> 8), byte(id)})
				// Flush only when the reader has nothing more buffered:
				// acks of a burst go out together.
				if br.Buffered() == 0 {
					c.bw.Flush()
				}
				c.wmu.Unlock()
			}
		}
	}
}
