package cloudemu

import (
	"bytes"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

func TestGenericHasNoLimitsByDefault(t *testing.T) {
	c := start(t, Options{})
	if !strings.HasPrefix(c.URL(), "tcp://127.0.0.1:") || c.CAFile() != "" {
		t.Fatalf("url %q ca %q", c.URL(), c.CAFile())
	}
	rec := observe(t, c, "#")
	r := dialRaw(t, c, "station")
	r.burst(t, "a/b/c/d/e/f/g/h/i/j", 200)
	waitFor(t, "the burst observed", func() bool { return len(rec.got()) == 200 })
	for i, m := range rec.got() {
		if want := fmt.Sprintf("a/b/c/d/e/f/g/h/i/j %d", i+1); m != want {
			t.Fatalf("message %d: %q, want %q (order of arrival)", i, m, want)
		}
	}
	cl := mustDial(t, c, "station-2", func(o *mqtt.ClientOptions) {
		o.SetWill("stations/st-1/gateway", `{"online":false}`, 1, true)
	})
	cl.publish(t, "big", 2, true, bytes.Repeat([]byte("x"), 1<<20))
	if got, ok := c.Retained("big"); !ok || len(got) != 1<<20 {
		t.Errorf("retained %d bytes %v", len(got), ok)
	}
	cl.stillUp(t)
	wantViolations(t, c, map[string]int{})
	if s := c.Stats(); s.Publishes != 201 || s.PeakRate < 200 || s.Bytes < 1<<20 {
		t.Errorf("stats %+v", s)
	}
}

func TestGenericEnforcesOptions(t *testing.T) {
	c := start(t, Options{MaxPublishRate: 10, MaxMessageBytes: 1000})

	cl := mustDial(t, c, "station", nil)
	cl.publish(t, "e", 1, false, bytes.Repeat([]byte("x"), 1000))
	cl.Publish("e", 1, false, bytes.Repeat([]byte("x"), 1001))
	cl.waitLost(t)
	wantViolations(t, c, map[string]int{RuleSize: 1})

	r := dialRaw(t, c, "station")
	r.burst(t, "e", 15)
	r.waitClosed(t)
	wantViolations(t, c, map[string]int{RuleSize: 1, RuleRate: 1})
}

// The rate is a sliding window, not a count since connect: two bursts
// within the limit, more than a second apart as the cloud reads them, are
// allowed although together they exceed it.
func TestGenericRateWindowSlides(t *testing.T) {
	c := start(t, Options{MaxPublishRate: 10})
	cl := mustDial(t, c, "station", nil)
	for i := range 2 {
		if i > 0 {
			// Every PUBACK of the first burst is in: the cloud has read
			// it. A second later (measured after, so never shorter) the
			// window is clear.
			time.Sleep(1100 * time.Millisecond)
		}
		var toks []mqtt.Token
		for range 8 {
			toks = append(toks, cl.Publish("e", 1, false, []byte("x")))
		}
		for _, tok := range toks {
			if !tok.WaitTimeout(wait) || tok.Error() != nil {
				t.Fatalf("publish: %v", tok.Error())
			}
		}
	}
	cl.stillUp(t)
	wantViolations(t, c, map[string]int{})
}

func TestStartRefusesIncompleteOptions(t *testing.T) {
	for _, o := range []Options{
		{Profile: "azure"},
		{Profile: Aliyun, ProductKey: "pk", DeviceName: "dn"},
		{Profile: Aliyun, DeviceName: "dn", DeviceSecret: "s3cret"},
		{Profile: AWS}, // no Dir
	} {
		if c, err := Start(o); err == nil {
			c.Close()
			t.Errorf("%+v: started", o)
		} else if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("error leaks the secret: %v", err)
		}
	}
}

func TestKickClosesConnectionsAndSendsWills(t *testing.T) {
	c := start(t, Options{})
	cl := mustDial(t, c, "station", func(o *mqtt.ClientOptions) {
		o.SetWill("stations/st-1/gateway", `{"online":false}`, 1, true)
	})
	if n := c.Kick(); n != 1 {
		t.Errorf("kicked %d, want 1", n)
	}
	cl.waitLost(t)
	waitFor(t, "the will", func() bool {
		got, _ := c.Retained("stations/st-1/gateway")
		return string(got) == `{"online":false}`
	})
	wantViolations(t, c, map[string]int{})
	mustDial(t, c, "station", nil).stillUp(t)
}

// slowEstablish holds a client between its CONNECT and mochi registering
// it, where a station reconnecting just as the cloud goes away may be.
type slowEstablish struct {
	mochi.HookBase
	entered, release chan struct{}
}

func (h *slowEstablish) ID() string           { return "slow-establish" }
func (h *slowEstablish) Provides(b byte) bool { return b == mochi.OnSessionEstablish }
func (h *slowEstablish) OnSessionEstablish(*mochi.Client, packets.Packet) {
	close(h.entered)
	<-h.release
}

// TestCloseWithConnectInProgress: Close returns, and closes the
// connection, when a client's CONNECT is being processed as it begins;
// mochi alone waits forever for such a client, its connection open.
func TestCloseWithConnectInProgress(t *testing.T) {
	c, err := Start(Options{})
	if err != nil {
		t.Fatal(err)
	}
	h := &slowEstablish{entered: make(chan struct{}), release: make(chan struct{})}
	if err := c.srv.AddHook(h, nil); err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("tcp", c.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "late"}}
	var b bytes.Buffer
	pk.ConnectEncode(&b)
	conn.Write(b.Bytes())
	<-h.entered
	done := make(chan struct{})
	go func() { c.Close(); close(done) }()
	// Let Close stop the clients it knows and the listener, then let
	// the late client be registered.
	waitFor(t, "the listener closed", func() bool {
		probe, err := net.Dial("tcp", c.Addr())
		if err == nil {
			probe.Close()
		}
		return err != nil
	})
	close(h.release)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return with a connect in progress")
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		if _, err := conn.Read(make([]byte, 64)); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("the late client's connection is still open after Close")
			}
			break
		}
	}
}
