package local

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	pahov3 "github.com/eclipse/paho.mqtt.golang"
	pahopackets "github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
)

func TestAuth(t *testing.T) {
	e := start(t, nil)
	tests := []struct {
		name             string
		user, id, secret string
		ok               bool
	}{
		{"right credentials", "dev-a", "dev-a", secretA, true},
		{"wrong secret", "dev-a", "dev-a", "wrong-SECRET-9931", false},
		{"other device's secret", "dev-a", "dev-a", secretB, false},
		{"unknown device", "dev-zz", "dev-zz", secretA, false},
		{"serial device", "ser-1", "ser-1", secretA, false},
		{"client id differs", "dev-a", "dev-b", secretA, false},
		{"empty password", "dev-a", "dev-a", "", false},
	}
	for _, proto := range []string{"v3", "v5"} {
		for _, tt := range tests {
			t.Run(proto+"/"+tt.name, func(t *testing.T) {
				before := e.b.Stats().AuthFailures
				var err error
				switch proto {
				case "v3":
					var c *v3
					c, err = dialV3(t, e.addr, tt.user, tt.id, tt.secret)
					if !tt.ok && !errors.Is(err, pahopackets.ErrorRefusedNotAuthorised) {
						t.Errorf("connect error = %v, want %v", err, pahopackets.ErrorRefusedNotAuthorised)
					}
					if err == nil {
						c.c.Disconnect(0)
					}
				case "v5":
					var c *v5
					var ca *paho5.Connack
					c, ca, err = dialV5(t, e.addr, tt.user, tt.id, tt.secret, nil)
					if !tt.ok && (ca == nil || ca.ReasonCode != 0x87) {
						t.Errorf("connack = %+v (err %v), want reason 0x87 not authorized", ca, err)
					}
					if err == nil {
						_ = c.c.Disconnect(&paho5.Disconnect{})
					}
				}
				if (err == nil) != tt.ok {
					t.Fatalf("connect error = %v, want ok %v", err, tt.ok)
				}
				want := before
				if !tt.ok {
					want++
				}
				if got := e.b.Stats().AuthFailures; got != want {
					t.Errorf("AuthFailures = %d, want %d", got, want)
				}
			})
		}
	}
	logs := e.logs.String()
	for _, secret := range []string{secretA, secretB, "wrong-SECRET-9931"} {
		if strings.Contains(logs, secret) {
			t.Errorf("log shows a secret %q", secret)
		}
	}
	if !strings.Contains(logs, "device refused") || !strings.Contains(logs, "device=dev-zz") || !strings.Contains(logs, "remote=127.0.0.1:") {
		t.Errorf("log lacks the refusal with device and remote address:\n%s", logs)
	}
}

// A device publishing on another device's topics, or on topics that are not
// its up topics, is dropped, counted, and never disconnected.
func TestPublishACL(t *testing.T) {
	forged := []struct{ topic, payload string }{
		{"devices/dev-b/commands", `{"cmd_id":"x1","action":"start","duration_s":600}`},
		{"devices/dev-b/state", `{"status":"fault"}`},
		{"devices/dev-b/events", `{"type":"door_open"}`},
		{"devices/dev-a/commands", `{"cmd_id":"x2","action":"start"}`},
		{"devices/dev-a/other", `{"a":1}`},
		{"devices/dev-a", `{"a":1}`},
		{"devices/dev-a/state/x", `{"status":"idle"}`},
		{"$SYS/broker/version", `{"a":1}`},
	}
	for _, proto := range []string{"v3", "v5"} {
		for _, qos := range []byte{0, 1, 2} {
			t.Run(proto+"/qos"+string('0'+qos), func(t *testing.T) {
				e := start(t, nil)
				b := connectV3(t, e.addr, "dev-b", secretB)
				if got := b.subscribe(t, "devices/dev-b/commands", 1); got != 1 {
					t.Fatalf("dev-b subscribe granted %#x", got)
				}
				var a interface {
					alive(testing.TB, *env, string)
				}
				var pub func(topic string, payload []byte)
				switch proto {
				case "v3":
					// With AutoReconnect, a disconnect would show as a
					// second connection.
					c := connectV3(t, e.addr, "dev-a", secretA, autoReconnect)
					a = c
					pub = func(topic string, payload []byte) {
						if err := c.publish(t, topic, qos, payload); err != nil {
							t.Errorf("publish on %s: %v", topic, err)
						}
					}
				case "v5":
					c := connectV5(t, e.addr, "dev-a", secretA)
					a = c
					pub = func(topic string, payload []byte) {
						rc := c.publish(t, topic, qos, payload)
						if want := map[byte]byte{0: 0, 1: 0x87, 2: 0}[qos]; rc != want {
							t.Errorf("publish on %s: reason %#x, want %#x", topic, rc, want)
						}
					}
				}
				for _, f := range forged {
					pub(f.topic, []byte(f.payload))
				}
				a.alive(t, e, "dev-a")
				// A command sent after the forged ones arrives after any of
				// them would have: dev-b must see only it.
				if err := e.b.Send(context.Background(), "dev-b", edged.DeviceCommand{CmdID: "real-1", Action: "stop"}); err != nil {
					t.Fatal(err)
				}
				select {
				case m := <-b.msgs:
					if !bytes.Contains(m.Payload(), []byte("real-1")) {
						t.Fatalf("dev-b received a forged message on %s: %s", m.Topic(), m.Payload())
					}
				case <-time.After(testWaitPeriod):
					t.Fatal("dev-b never got its command")
				}
				if got, want := e.b.Stats().ACLDenials, uint64(len(forged)); got != want {
					t.Errorf("ACLDenials = %d, want %d", got, want)
				}
				for _, c := range e.rep.dataCalls() {
					if c.Device != "dev-a" || c.Method != "telemetry" {
						t.Errorf("forged message reported: %+v", c)
					}
				}
				b.alive(t, e, "dev-b")
			})
		}
	}
}

func TestSubscribeACL(t *testing.T) {
	e := start(t, nil)
	refusedFor := func(own, other string) []string {
		return []string{"devices/" + other + "/commands", "#", "devices/+/commands", "devices/" + own + "/#",
			"devices/" + own + "/state", "$share/g/devices/" + own + "/commands", "$SYS/#", "devices/" + own + "/commands/ack"}
	}
	refused := refusedFor("dev-a", "dev-b")
	c3 := connectV3(t, e.addr, "dev-a", secretA)
	for _, f := range refused {
		if got := c3.subscribe(t, f, 1); got != 0x80 {
			t.Errorf("v3 subscribe %q: suback %#x, want 0x80", f, got)
		}
	}
	if got := c3.subscribe(t, "devices/dev-a/commands", 1); got != 1 {
		t.Errorf("v3 subscribe own commands: suback %#x, want 1", got)
	}
	c3.alive(t, e, "dev-a")

	c5 := connectV5(t, e.addr, "dev-b", secretB)
	for _, f := range refusedFor("dev-b", "dev-a") {
		if got := c5.subscribe(t, f, 1); got < 0x80 {
			t.Errorf("v5 subscribe %q: suback %#x, want a failure", f, got)
		}
	}
	if got := c5.subscribe(t, "devices/dev-b/commands", 1); got != 1 {
		t.Errorf("v5 subscribe own commands: suback %#x, want 1", got)
	}
	c5.alive(t, e, "dev-b")
	if got, want := e.b.Stats().ACLDenials, uint64(2*len(refused)); got < want {
		t.Errorf("ACLDenials = %d, want at least %d", got, want)
	}
}

func TestWill(t *testing.T) {
	e := start(t, nil)
	refused := []struct {
		name, topic, payload string
	}{
		{"other device's commands", "devices/dev-b/commands", `{"cmd_id":"w","action":"start"}`},
		{"other device's state", "devices/dev-b/state", `{"status":"fault"}`},
		{"own commands", "devices/dev-a/commands", `{"cmd_id":"w","action":"start"}`},
		{"bad payload", "devices/dev-a/state", `{"status":"exploded"}`},
		{"not json", "devices/dev-a/events", `offline`},
	}
	for _, tt := range refused {
		t.Run("v3/"+tt.name, func(t *testing.T) {
			_, err := dialV3(t, e.addr, "dev-a", "dev-a", secretA, func(o *pahov3.ClientOptions) {
				o.SetBinaryWill(tt.topic, []byte(tt.payload), 1, false)
			})
			if !errors.Is(err, pahopackets.ErrorRefusedNotAuthorised) {
				t.Errorf("connect error = %v, want not authorized", err)
			}
		})
		t.Run("v5/"+tt.name, func(t *testing.T) {
			_, ca, err := dialV5(t, e.addr, "dev-a", "dev-a", secretA, &paho5.WillMessage{Topic: tt.topic, Payload: []byte(tt.payload), QoS: 1})
			if err == nil || ca == nil || ca.ReasonCode != 0x87 {
				t.Errorf("connack %+v, err %v; want 0x87", ca, err)
			}
		})
	}
	if got, want := e.b.Stats().AuthFailures, uint64(2*len(refused)); got != want {
		t.Errorf("AuthFailures = %d, want %d", got, want)
	}

	// A will on the device's own state is accepted and reported when the
	// connection drops without DISCONNECT.
	c, _, err := dialV5(t, e.addr, "dev-a", "dev-a", secretA, &paho5.WillMessage{Topic: "devices/dev-a/state", Payload: []byte(`{"status":"fault","fault":"link_lost"}`), QoS: 1, Retain: true})
	if err != nil {
		t.Fatal(err)
	}
	_ = c.conn.Close()
	waitFor(t, "will reported", func() bool { return len(e.rep.Calls("state")) == 1 })
	got := e.rep.Calls("state")[0]
	want := call{"state", "dev-a", edged.StateReport{Status: edged.StatusFault, Fault: "link_lost"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("will report (-want +got):\n%s", diff)
	}
	waitFor(t, "offline", func() bool { on, ok := e.rep.lastOnline("dev-a"); return ok && !on })
	if n := e.b.srv.Topics.Retained.Len(); n != 0 {
		// $SYS topics are retained by mochi itself; none may be ours.
		for topic := range e.b.srv.Topics.Retained.GetAll() {
			if strings.HasPrefix(topic, "devices/") {
				t.Errorf("will retained on %s", topic)
			}
		}
	}
}

func TestBadInput(t *testing.T) {
	big := `{"x":"` + strings.Repeat("a", 1<<20) + `"}`
	bad := []struct{ name, topic, payload string }{
		{"malformed json", "state", `{"status":"idle"`},
		{"not an object", "telemetry", `[1,2,3]`},
		{"null", "telemetry", `null`},
		{"empty", "state", ``},
		{"trailing data", "state", `{"status":"idle"} {}`},
		{"status wrong type", "state", `{"status":5}`},
		{"status unknown", "state", `{"status":"sleeping"}`},
		{"nested telemetry", "telemetry", `{"a":{"b":1}}`},
		{"latitude out of range", "location", `{"lat":200,"lon":0}`},
		{"location missing lon", "location", `{"lat":1}`},
		{"event without type", "events", `{"kind":"x"}`},
		{"ack cmd_id with slash", "commands/ack", `{"cmd_id":"a/b","ok":true}`},
		{"ack cmd_id with plus", "commands/ack", `{"cmd_id":"a+b","ok":true}`},
		{"ack cmd_id with hash", "commands/ack", `{"cmd_id":"a#b","ok":true}`},
		{"ack cmd_id with control char", "commands/ack", `{"cmd_id":"a\u0001b","ok":true}`},
		{"ack ok not bool", "commands/ack", `{"cmd_id":"c1","ok":"yes"}`},
		{"1 MiB payload", "telemetry", big},
	}
	for _, proto := range []string{"v3", "v5"} {
		t.Run(proto, func(t *testing.T) {
			e := start(t, nil) // default max packet (4 MiB) carries 1 MiB
			var a interface {
				alive(testing.TB, *env, string)
			}
			var pub func(topic string, payload []byte)
			switch proto {
			case "v3":
				c := connectV3(t, e.addr, "dev-a", secretA, autoReconnect)
				a = c
				pub = func(topic string, payload []byte) {
					if err := c.publish(t, topic, 1, payload); err != nil {
						t.Errorf("publish on %s: %v", topic, err)
					}
				}
			case "v5":
				c := connectV5(t, e.addr, "dev-a", secretA)
				a = c
				pub = func(topic string, payload []byte) {
					if rc := c.publish(t, topic, 1, payload); rc != 0x99 {
						t.Errorf("publish on %s: reason %#x, want 0x99 payload format invalid", topic, rc)
					}
				}
			}
			for _, tt := range bad {
				pub("devices/dev-a/"+tt.topic, []byte(tt.payload))
			}
			if got, want := e.b.Stats().BadInput, uint64(len(bad)); got != want {
				t.Errorf("BadInput = %d, want %d", got, want)
			}
			if got := e.rep.dataCalls(); len(got) != 0 {
				t.Errorf("bad input reported: %v", got)
			}
			a.alive(t, e, "dev-a")
		})
	}
}

// Every up topic with a good payload reaches the reporter.
func TestIngest(t *testing.T) {
	e := start(t, nil)
	c := connectV3(t, e.addr, "dev-a", secretA)
	msgs := []struct{ topic, payload string }{
		{"state", `{"status":"in_use","ts":"2026-01-02T03:04:05.5Z","power_w":12.5}`},
		{"telemetry", `{"temp_c":21.5,"door":"closed","ok":true}`},
		{"location", `{"lat":48.1,"lon":11.5,"accuracy_m":3}`},
		{"events", `{ "type": "door_open", "n": 1 }`},
		{"commands/ack", `{"cmd_id":"edged-1","ok":false,"error":"jammed"}`},
	}
	for _, m := range msgs {
		if err := c.publish(t, "devices/dev-a/"+m.topic, 1, []byte(m.payload)); err != nil {
			t.Fatal(err)
		}
	}
	acc := 3.0
	want := []call{
		{"state", "dev-a", edged.StateReport{Status: edged.StatusInUse, TS: "2026-01-02T03:04:05.5Z", Extra: map[string]any{"power_w": 12.5}}},
		{"telemetry", "dev-a", map[string]any{"temp_c": 21.5, "door": "closed", "ok": true}},
		{"location", "dev-a", edged.Location{Lat: 48.1, Lon: 11.5, AccuracyM: &acc}},
		{"event", "dev-a", `{"type":"door_open","n":1}`},
		{"ack", "dev-a", edged.CommandAck{CmdID: "edged-1", OK: false, Error: "jammed"}},
	}
	if diff := cmp.Diff(want, e.rep.dataCalls()); diff != "" {
		t.Errorf("reported (-want +got):\n%s", diff)
	}
	if got := e.b.Stats().MessagesIn; got != uint64(len(msgs)) {
		t.Errorf("MessagesIn = %d, want %d", got, len(msgs))
	}
}

func TestMaxPacketCloses(t *testing.T) {
	e := start(t, func(c *Config) { c.MaxPacketKB = 16 })
	c3 := connectV3(t, e.addr, "dev-a", secretA)
	// 8 KiB is fine (and not bad input: 40 strings within the state
	// bounds); 32 KiB is over the packet limit.
	if err := c3.publish(t, "devices/dev-a/telemetry", 1, telemetryJSON("x", 40, strings.Repeat("a", 200))); err != nil {
		t.Fatal(err)
	}
	c3.c.Publish("devices/dev-a/telemetry", 1, false, []byte(`{"x":"`+strings.Repeat("a", 32<<10)+`"}`))
	select {
	case <-c3.lost:
	case <-time.After(testWaitPeriod):
		t.Fatal("v3 connection not closed by an oversized packet")
	}

	c5 := connectV5(t, e.addr, "dev-b", secretB)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testWaitPeriod)
		defer cancel()
		_, _ = c5.c.Publish(ctx, &paho5.Publish{Topic: "devices/dev-b/telemetry", QoS: 1, Payload: []byte(`{"x":"` + strings.Repeat("a", 32<<10) + `"}`)})
	}()
	select {
	case <-c5.c.Done():
	case <-time.After(testWaitPeriod):
		t.Fatal("v5 connection not closed by an oversized packet")
	}
	waitFor(t, "both offline", func() bool { return e.b.Stats().Connected == 0 })
	if got := len(e.rep.Calls("telemetry")); got != 1 {
		t.Errorf("telemetry reported %d times, want 1", got)
	}
}

func TestSend(t *testing.T) {
	e := start(t, nil)
	ctx := context.Background()
	cmd := edged.DeviceCommand{CmdID: "edged-42", Action: edged.ActionStart, RentalID: "r-1", RenterID: "u-1", DurationS: 600}
	if err := e.b.Send(ctx, "dev-a", cmd); edged.ErrorCode(err) != edged.EUNAVAILABLE {
		t.Errorf("send to offline device: %v, want EUNAVAILABLE", err)
	}
	for _, id := range []string{"dev-zz", "ser-1"} {
		if err := e.b.Send(ctx, id, cmd); edged.ErrorCode(err) != edged.ENOTFOUND {
			t.Errorf("send to %s: %v, want ENOTFOUND", id, err)
		}
	}

	wantJSON, _ := json.Marshal(cmd)
	for _, proto := range []string{"v3", "v5"} {
		t.Run(proto, func(t *testing.T) {
			before := e.b.Stats().MessagesOut
			var got []byte
			var qos byte
			switch proto {
			case "v3":
				c := connectV3(t, e.addr, "dev-a", secretA)
				c.subscribe(t, "devices/dev-a/commands", 1)
				if err := e.b.Send(ctx, "dev-a", cmd); err != nil {
					t.Fatal(err)
				}
				select {
				case m := <-c.msgs:
					got, qos = m.Payload(), m.Qos()
				case <-time.After(testWaitPeriod):
					t.Fatal("no command")
				}
				c.c.Disconnect(0)
			case "v5":
				c := connectV5(t, e.addr, "dev-a", secretA)
				c.subscribe(t, "devices/dev-a/commands", 1)
				if err := e.b.Send(ctx, "dev-a", cmd); err != nil {
					t.Fatal(err)
				}
				select {
				case m := <-c.msgs:
					got, qos = m.Payload, m.QoS
				case <-time.After(testWaitPeriod):
					t.Fatal("no command")
				}
				_ = c.c.Disconnect(&paho5.Disconnect{})
			}
			if !bytes.Equal(got, wantJSON) || qos != 1 {
				t.Errorf("got %s at QoS %d, want %s at QoS 1", got, qos, wantJSON)
			}
			if e.b.Stats().MessagesOut != before+1 {
				t.Errorf("MessagesOut = %d, want %d", e.b.Stats().MessagesOut, before+1)
			}
			waitFor(t, "offline", func() bool { return e.b.Stats().Connected == 0 })
		})
	}

	// A command sent between CONNECT and SUBSCRIBE (the station does this
	// when a device comes back) is delivered once the device subscribes.
	t.Run("before subscribe", func(t *testing.T) {
		c := connectV3(t, e.addr, "dev-b", secretB)
		waitFor(t, "online", func() bool { on, _ := e.rep.lastOnline("dev-b"); return on })
		held := edged.DeviceCommand{CmdID: "edged-43", Action: edged.ActionStop}
		if err := e.b.Send(ctx, "dev-b", held); err != nil {
			t.Fatal(err)
		}
		c.subscribe(t, "devices/dev-b/commands", 1)
		select {
		case m := <-c.msgs:
			if !bytes.Contains(m.Payload(), []byte("edged-43")) {
				t.Errorf("got %s", m.Payload())
			}
		case <-time.After(testWaitPeriod):
			t.Fatal("held command not delivered")
		}
	})
}

// A device event is reported before its PUBACK: while the reporter blocks,
// the publisher's token does not complete.
func TestEventBeforePuback(t *testing.T) {
	for _, proto := range []string{"v3", "v5"} {
		t.Run(proto, func(t *testing.T) {
			e := start(t, nil)
			entered := make(chan struct{}, 1)
			release := make(chan struct{})
			e.rep.setEventHook(func(ctx context.Context) error {
				entered <- struct{}{}
				select {
				case <-release:
					return nil
				case <-ctx.Done():
					return ctx.Err()
				}
			})
			done := make(chan error, 1)
			payload := []byte(`{"type":"coin_inserted"}`)
			switch proto {
			case "v3":
				c := connectV3(t, e.addr, "dev-a", secretA)
				tok := c.c.Publish("devices/dev-a/events", 1, false, payload)
				go func() { tok.WaitTimeout(2 * testWaitPeriod); done <- tok.Error() }()
			case "v5":
				c := connectV5(t, e.addr, "dev-a", secretA)
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), 2*testWaitPeriod)
					defer cancel()
					_, err := c.c.Publish(ctx, &paho5.Publish{Topic: "devices/dev-a/events", QoS: 1, Payload: payload})
					done <- err
				}()
			}
			select {
			case <-entered:
			case <-time.After(testWaitPeriod):
				t.Fatal("reporter never called")
			}
			select {
			case err := <-done:
				t.Fatalf("publish completed (err %v) while the reporter was still writing", err)
			case <-time.After(200 * time.Millisecond):
			}
			close(release)
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(testWaitPeriod):
				t.Fatal("publish never completed")
			}
			if got := e.rep.Calls("event"); len(got) != 1 {
				t.Errorf("events reported: %v", got)
			}
		})
	}
}

// When the station cannot take an event, the device is never told it was.
func TestReporterFailure(t *testing.T) {
	failOnce := func(e *env) {
		failed := false
		e.rep.setEventHook(func(context.Context) error {
			if !failed {
				failed = true
				return &edged.Error{Code: edged.EUNAVAILABLE, Message: "disk full"}
			}
			return nil
		})
	}
	payload := []byte(`{"type":"coin_inserted"}`)

	t.Run("v5 negative puback", func(t *testing.T) {
		e := start(t, nil)
		failOnce(e)
		c := connectV5(t, e.addr, "dev-a", secretA)
		if rc := c.publish(t, "devices/dev-a/events", 1, payload); rc != 0x80 {
			t.Errorf("reason %#x, want 0x80", rc)
		}
		c.alive(t, e, "dev-a")
		if got := e.rep.Calls("event"); len(got) != 0 {
			t.Errorf("events: %v", got)
		}
	})

	// At QoS 2 a refusal would need a negative PUBREC, which mochi cannot
	// send from a hook: the v5 client is disconnected (0x80) instead.
	t.Run("v5 qos 2 disconnects", func(t *testing.T) {
		e := start(t, nil)
		failOnce(e)
		c := connectV5(t, e.addr, "dev-a", secretA)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), testWaitPeriod)
			defer cancel()
			_, _ = c.c.Publish(ctx, &paho5.Publish{Topic: "devices/dev-a/events", QoS: 2, Payload: payload})
		}()
		select {
		case d := <-c.disc:
			if d.ReasonCode != 0x80 {
				t.Errorf("disconnect reason %#x, want 0x80", d.ReasonCode)
			}
		case <-time.After(testWaitPeriod):
			t.Fatal("not disconnected")
		}
		if got := e.rep.Calls("event"); len(got) != 0 {
			t.Errorf("events: %v", got)
		}
	})

	// MQTT 3.1.1 has no negative PUBACK: the connection is closed without
	// one and the client resends after reconnecting, exactly once here.
	t.Run("v3 closes and the client resends", func(t *testing.T) {
		e := start(t, nil)
		failOnce(e)
		c := connectV3(t, e.addr, "dev-a", secretA, func(o *pahov3.ClientOptions) {
			o.SetCleanSession(false).SetAutoReconnect(true).SetConnectRetryInterval(50 * time.Millisecond)
		})
		tok := c.c.Publish("devices/dev-a/events", 1, false, payload)
		select {
		case <-c.lost:
		case <-time.After(testWaitPeriod):
			t.Fatal("connection not closed")
		}
		waitFor(t, "resent event", func() bool { return len(e.rep.Calls("event")) == 1 })
		if !tok.WaitTimeout(testWaitPeriod) || tok.Error() != nil {
			t.Errorf("token: %v", tok.Error())
		}
		waitFor(t, "reconnected", func() bool { return c.connects.Load() == 2 && c.c.IsConnectionOpen() })
		time.Sleep(100 * time.Millisecond)
		if n := c.connects.Load(); n != 2 {
			t.Errorf("connected %d times, want 2 (no loop)", n)
		}
		if got := len(e.rep.Calls("event")); got != 1 {
			t.Errorf("event reported %d times", got)
		}
	})
}

func TestOnlineAndTakeover(t *testing.T) {
	e := start(t, nil)
	c1 := connectV3(t, e.addr, "dev-a", secretA)
	waitFor(t, "online", func() bool { on, _ := e.rep.lastOnline("dev-a"); return on })
	if got := e.b.Stats().Connected; got != 1 {
		t.Errorf("Connected = %d", got)
	}

	// The same device connects again (it rebooted): the old session is
	// taken over, and its late disconnect must not mark the device offline.
	c2 := connectV5(t, e.addr, "dev-a", secretA)
	select {
	case <-c1.lost:
	case <-time.After(testWaitPeriod):
		t.Fatal("old session not closed")
	}
	waitFor(t, "stale session ended", func() bool { return strings.Contains(e.logs.String(), "stale session ended") })
	if on, _ := e.rep.lastOnline("dev-a"); !on {
		t.Errorf("device reported offline after a takeover: %v", e.rep.Calls("online"))
	}
	if got := e.b.Stats().Connected; got != 1 {
		t.Errorf("Connected = %d after takeover, want 1", got)
	}
	c2.alive(t, e, "dev-a")

	_ = c2.c.Disconnect(&paho5.Disconnect{})
	waitFor(t, "offline", func() bool { on, ok := e.rep.lastOnline("dev-a"); return ok && !on })
	if got := e.b.Stats().Connected; got != 0 {
		t.Errorf("Connected = %d", got)
	}
	for _, c := range e.rep.Calls("online") {
		if c.Device != "dev-a" {
			t.Errorf("presence of %s reported", c.Device)
		}
	}
}

func TestCloseWithSilentConnection(t *testing.T) {
	e := start(t, nil)
	// A socket that never sends CONNECT must not stall Close.
	conn, err := netDial(e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := connectV3(t, e.addr, "dev-a", secretA)
	closed := make(chan struct{})
	go func() { _ = e.b.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(connectTimeout / 2):
		t.Fatal("Close stalled")
	}
	if e.b.Serving() {
		t.Error("still serving after Close")
	}
	select {
	case <-c.lost:
	case <-time.After(testWaitPeriod):
		t.Error("client not disconnected by Close")
	}
	if on, _ := e.rep.lastOnline("dev-a"); on {
		t.Error("device still online after Close")
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	a, _ := hashes(t)
	rep := &fakeReporter{}
	tests := []struct {
		name string
		cfg  Config
	}{
		{"no reporter", Config{Listen: ":0"}},
		{"no listener", Config{Reporter: rep}},
		{"bad device id", Config{Listen: ":0", Reporter: rep, Devices: []edged.Device{{ID: "a/b", Transport: edged.TransportMQTT, SecretHash: a}}}},
		{"duplicate", Config{Listen: ":0", Reporter: rep, Devices: []edged.Device{{ID: "a", Transport: edged.TransportMQTT, SecretHash: a}, {ID: "a", Transport: edged.TransportMQTT, SecretHash: a}}}},
		{"not bcrypt", Config{Listen: ":0", Reporter: rep, Devices: []edged.Device{{ID: "a", Transport: edged.TransportMQTT, SecretHash: "plain"}}}},
		{"tls without cert", Config{TLSListen: ":0", Reporter: rep}},
	}
	for _, tt := range tests {
		if _, err := New(tt.cfg); err == nil {
			t.Errorf("%s: New accepted it", tt.name)
		}
	}
}

func TestTLSListener(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := writeSelfSigned(t, dir)
	e := start(t, func(c *Config) {
		c.TLSListen, c.TLSCertFile, c.TLSKeyFile = "127.0.0.1:0", certFile, keyFile
	})
	tlsAddr := e.b.tracked[1].Addr().String()
	pool := x509.NewCertPool()
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	pool.AppendCertsFromPEM(certPEM)
	o := pahov3.NewClientOptions().AddBroker("tls://" + tlsAddr).
		SetClientID("dev-a").SetUsername("dev-a").SetPassword(secretA).SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectTimeout(testWaitPeriod).
		SetTLSConfig(&tls.Config{RootCAs: pool, ServerName: "localhost"})
	c := pahov3.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(testWaitPeriod) || tok.Error() != nil {
		t.Fatalf("tls connect: %v", tok.Error())
	}
	defer c.Disconnect(0)
	tok := c.Publish("devices/dev-a/events", 1, false, []byte(`{"type":"over_tls"}`))
	if !tok.WaitTimeout(testWaitPeriod) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	if got := e.rep.Calls("event"); len(got) != 1 {
		t.Errorf("events: %v", got)
	}
}

func writeSelfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// flakyListener fails its first Accepts as a process out of file
// descriptors would.
type flakyListener struct {
	net.Listener
	fails atomic.Int32
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	return l.Listener.Accept()
}

func TestAcceptErrorsDoNotStopTheBroker(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := &flakyListener{Listener: ln}
	fl.fails.Store(3)
	e := start(t, func(c *Config) { c.Listener = fl })
	c := connectV3(t, e.addr, "dev-a", secretA)
	c.alive(t, e, "dev-a")
	if !strings.Contains(e.logs.String(), "accept failed, retrying") {
		t.Error("accept errors not logged")
	}
}

func autoReconnect(o *pahov3.ClientOptions) {
	o.SetAutoReconnect(true).SetCleanSession(false)
}

// A storm of reconnects of one device (each taking the last one over)
// leaves exactly one live session, then none, never a negative count.
func TestReconnectStorm(t *testing.T) {
	e := start(t, nil)
	const workers, rounds = 4, 5
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				o := pahov3.NewClientOptions().AddBroker("tcp://" + e.addr).
					SetClientID("dev-a").SetUsername("dev-a").SetPassword(secretA).
					SetProtocolVersion(4).SetAutoReconnect(false).SetConnectTimeout(testWaitPeriod)
				c := pahov3.NewClient(o)
				if tok := c.Connect(); tok.WaitTimeout(testWaitPeriod) && tok.Error() == nil {
					c.Publish("devices/dev-a/telemetry", 0, false, []byte(`{"n":1}`)).WaitTimeout(testWaitPeriod)
					c.Disconnect(0)
				}
				if n := e.b.Stats().Connected; n < 0 || n > 1 {
					t.Errorf("Connected = %d", n)
				}
			}
		}()
	}
	wg.Wait()
	waitFor(t, "no session left", func() bool { return e.b.Stats().Connected == 0 })
	waitFor(t, "offline reported last", func() bool { on, ok := e.rep.lastOnline("dev-a"); return ok && !on })
	// After the storm the device connects normally and is online.
	c := connectV3(t, e.addr, "dev-a", secretA)
	c.alive(t, e, "dev-a")
	if on, _ := e.rep.lastOnline("dev-a"); !on {
		t.Error("device not online after the storm")
	}
}

func TestMaxClients(t *testing.T) {
	e := start(t, func(c *Config) { c.MaxClients = 1 })
	a := connectV3(t, e.addr, "dev-a", secretA)
	if _, err := dialV3(t, e.addr, "dev-b", "dev-b", secretB); !errors.Is(err, pahopackets.ErrorRefusedServerUnavailable) {
		t.Errorf("second device: %v, want server unavailable", err)
	}
	a.alive(t, e, "dev-a")
	if got := e.b.Stats().AuthFailures; got != 0 {
		t.Errorf("AuthFailures = %d, want 0", got)
	}
}

func TestWebSocketListener(t *testing.T) {
	// mochi's WebSocket listener binds inside Serve and cannot report a
	// :0 port: borrow a free one.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	wsAddr := ln.Addr().String()
	ln.Close()
	e := start(t, func(c *Config) { c.WSListen = wsAddr })
	var c *v3
	waitFor(t, "websocket listener", func() bool {
		var err error
		c, err = dialV3(t, wsAddr, "dev-a", "dev-a", secretA, func(o *pahov3.ClientOptions) {
			o.Servers = nil
			o.AddBroker("ws://" + wsAddr + "/mqtt")
		})
		return err == nil
	})
	c.alive(t, e, "dev-a")
}
