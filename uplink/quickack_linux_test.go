package uplink

import (
	"net"
	"net/url"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// The uplink's own dialling leaves the socket in quick-ack mode after
// every read, so a broker with Nagle's algorithm on is never held back by
// a delayed ACK of ours.
func TestUplinkSocketAcknowledgesAtOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	if !quickAckDial("tcp://" + ln.Addr().String()) {
		t.Fatal("tcp url not dialled by the uplink")
	}
	if quickAckDial("ws://" + ln.Addr().String()) {
		t.Fatal("websocket url dialled by the uplink, not paho")
	}
	u, _ := url.Parse("tcp://" + ln.Addr().String())
	o := mqtt.NewClientOptions()
	o.ConnectTimeout = 5 * time.Second
	c, err := openConn(u, *o)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer := <-accepted
	defer peer.Close()

	qc, ok := c.(*quickAckConn)
	if !ok {
		t.Fatalf("conn is %T, want *quickAckConn", c)
	}
	quick := func() int {
		v := -1
		_ = qc.raw.Control(func(fd uintptr) {
			v, _ = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK)
		})
		return v
	}
	buf := make([]byte, 16)
	for i := range 20 {
		// Our own write followed by the peer's reply is what puts Linux
		// into delayed-ACK (ping-pong) mode.
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := peer.Read(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := peer.Write([]byte("y")); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(buf); err != nil {
			t.Fatal(err)
		}
		if q := quick(); q != 1 {
			t.Fatalf("exchange %d: TCP_QUICKACK is %d after a read, want 1", i, q)
		}
	}
}
