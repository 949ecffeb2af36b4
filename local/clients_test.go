package local

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	pahov3 "github.com/eclipse/paho.mqtt.golang"
	"github.com/stationedge/edged"
	"golang.org/x/crypto/bcrypt"
)

// Secrets of the test devices; the log must never show them.
const (
	secretA = "s3cret-A-7f9e0c"
	secretB = "s3cret-B-21aa4d"
)

var (
	hashesOnce     sync.Once
	hashA, hashB   string
	testWaitPeriod = 5 * time.Second
)

func hashes(t testing.TB) (string, string) {
	hashesOnce.Do(func() {
		// MinCost keeps the tests fast; production hashes use cost 10.
		a, err := bcrypt.GenerateFromPassword([]byte(secretA), bcrypt.MinCost)
		if err != nil {
			panic(err)
		}
		b, err := bcrypt.GenerateFromPassword([]byte(secretB), bcrypt.MinCost)
		if err != nil {
			panic(err)
		}
		hashA, hashB = string(a), string(b)
	})
	return hashA, hashB
}

func testDevices(t testing.TB) []edged.Device {
	a, b := hashes(t)
	return []edged.Device{
		{ID: "dev-a", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: a},
		{ID: "dev-b", Kind: "chair", Transport: edged.TransportMQTT, SecretHash: b},
		{ID: "ser-1", Kind: "charger", Transport: edged.TransportSerial, Bus: "bus0", Unit: 1},
	}
}

// env is a broker on 127.0.0.1:0 with a fake reporter and a captured log.
type env struct {
	b    *Broker
	rep  *fakeReporter
	logs *logBuffer
	addr string
}

func start(t testing.TB, mod func(*Config)) *env {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{rep: &fakeReporter{}, logs: &logBuffer{}}
	cfg := Config{
		Listener: ln,
		Devices:  testDevices(t),
		Reporter: e.rep,
		Logger:   slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if mod != nil {
		mod(&cfg)
	}
	e.b, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.b.Close() })
	e.addr = e.b.Addr().String()
	return e
}

// v3 is a paho MQTT 3.1.1 client that counts its connections.
type v3 struct {
	c        pahov3.Client
	connects atomic.Int32
	lost     chan error
	msgs     chan pahov3.Message
}

type v3opt func(*pahov3.ClientOptions)

func dialV3(t testing.TB, addr, user, clientID, pass string, opts ...v3opt) (*v3, error) {
	t.Helper()
	v := &v3{lost: make(chan error, 8), msgs: make(chan pahov3.Message, 64)}
	o := pahov3.NewClientOptions().AddBroker("tcp://" + addr).
		SetClientID(clientID).SetUsername(user).SetPassword(pass).
		SetProtocolVersion(4).SetCleanSession(true).
		SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(testWaitPeriod).SetWriteTimeout(testWaitPeriod).
		SetKeepAlive(30 * time.Second).
		SetMaxReconnectInterval(200 * time.Millisecond)
	o.SetOnConnectHandler(func(pahov3.Client) { v.connects.Add(1) })
	o.SetConnectionLostHandler(func(_ pahov3.Client, err error) {
		select {
		case v.lost <- err:
		default:
		}
	})
	o.SetDefaultPublishHandler(func(_ pahov3.Client, m pahov3.Message) {
		select {
		case v.msgs <- m:
		default:
		}
	})
	for _, f := range opts {
		f(o)
	}
	v.c = pahov3.NewClient(o)
	tok := v.c.Connect()
	if !tok.WaitTimeout(testWaitPeriod) {
		t.Fatal("v3 connect timed out")
	}
	t.Cleanup(func() { v.c.Disconnect(0) })
	return v, tok.Error()
}

// connectV3 connects device id with its secret or fails the test.
func connectV3(t testing.TB, addr, id, secret string, opts ...v3opt) *v3 {
	t.Helper()
	v, err := dialV3(t, addr, id, id, secret, opts...)
	if err != nil {
		t.Fatalf("v3 connect %s: %v", id, err)
	}
	return v
}

// publish publishes and waits for the token; it returns the token's error.
func (v *v3) publish(t testing.TB, topic string, qos byte, payload []byte) error {
	t.Helper()
	tok := v.c.Publish(topic, qos, false, payload)
	if !tok.WaitTimeout(testWaitPeriod) {
		t.Fatalf("v3 publish on %s timed out", topic)
	}
	return tok.Error()
}

func (v *v3) subscribe(t testing.TB, filter string, qos byte) byte {
	t.Helper()
	tok := v.c.Subscribe(filter, qos, nil)
	if !tok.WaitTimeout(testWaitPeriod) {
		t.Fatalf("v3 subscribe %s timed out", filter)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("v3 subscribe %s: %v", filter, err)
	}
	// paho keys the result by the filter without a $share/group/ prefix.
	for _, code := range tok.(*pahov3.SubscribeToken).Result() {
		return code
	}
	t.Fatalf("v3 subscribe %s: no result", filter)
	return 0
}

// v5 is a paho.golang MQTT 5 client.
type v5 struct {
	c    *paho5.Client
	conn net.Conn
	msgs chan *paho5.Publish
	disc chan *paho5.Disconnect
}

func dialV5(t testing.TB, addr, user, clientID, pass string, will *paho5.WillMessage) (*v5, *paho5.Connack, error) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, testWaitPeriod)
	if err != nil {
		t.Fatal(err)
	}
	v := &v5{conn: conn, msgs: make(chan *paho5.Publish, 64), disc: make(chan *paho5.Disconnect, 4)}
	v.c = paho5.NewClient(paho5.ClientConfig{
		Conn:          conn,
		PacketTimeout: testWaitPeriod,
		OnPublishReceived: []func(paho5.PublishReceived) (bool, error){func(p paho5.PublishReceived) (bool, error) {
			select {
			case v.msgs <- p.Packet:
			default:
			}
			return true, nil
		}},
		OnServerDisconnect: func(d *paho5.Disconnect) {
			select {
			case v.disc <- d:
			default:
			}
		},
		OnClientError: func(error) {},
	})
	ctx, cancel := context.WithTimeout(context.Background(), testWaitPeriod)
	defer cancel()
	ca, err := v.c.Connect(ctx, &paho5.Connect{
		ClientID: clientID, Username: user, UsernameFlag: true,
		Password: []byte(pass), PasswordFlag: pass != "",
		KeepAlive: 30, CleanStart: true, WillMessage: will,
	})
	t.Cleanup(func() {
		_ = v.c.Disconnect(&paho5.Disconnect{ReasonCode: 0})
		_ = conn.Close()
	})
	return v, ca, err
}

func connectV5(t testing.TB, addr, id, secret string) *v5 {
	t.Helper()
	v, _, err := dialV5(t, addr, id, id, secret, nil)
	if err != nil {
		t.Fatalf("v5 connect %s: %v", id, err)
	}
	return v
}

// publish publishes and returns the PUBACK reason code (0 for QoS 0).
func (v *v5) publish(t testing.TB, topic string, qos byte, payload []byte) byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testWaitPeriod)
	defer cancel()
	pr, err := v.c.Publish(ctx, &paho5.Publish{Topic: topic, QoS: qos, Payload: payload})
	if pr == nil {
		t.Fatalf("v5 publish on %s: %v", topic, err)
	}
	return pr.ReasonCode
}

func (v *v5) subscribe(t testing.TB, filter string, qos byte) byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testWaitPeriod)
	defer cancel()
	sa, err := v.c.Subscribe(ctx, &paho5.Subscribe{Subscriptions: []paho5.SubscribeOptions{{Topic: filter, QoS: qos}}})
	if sa == nil || len(sa.Reasons) != 1 {
		t.Fatalf("v5 subscribe %s: %v", filter, err)
	}
	return sa.Reasons[0]
}

// alive checks that a v5 client is still connected: a ping-free round trip
// through a valid QoS 1 publish that the reporter sees.
func (v *v5) alive(t testing.TB, e *env, id string) {
	t.Helper()
	n := len(e.rep.Calls("telemetry"))
	if rc := v.publish(t, "devices/"+id+"/telemetry", 1, []byte(`{"probe":1}`)); rc != 0 {
		t.Fatalf("v5 client of %s: probe publish got reason %#x", id, rc)
	}
	if got := len(e.rep.Calls("telemetry")); got != n+1 {
		t.Fatalf("v5 client of %s: probe not reported (%d telemetry calls, want %d)", id, got, n+1)
	}
}

func (v *v3) alive(t testing.TB, e *env, id string) {
	t.Helper()
	n := len(e.rep.Calls("telemetry"))
	if err := v.publish(t, "devices/"+id+"/telemetry", 1, []byte(`{"probe":1}`)); err != nil {
		t.Fatalf("v3 client of %s: probe publish: %v", id, err)
	}
	if got := len(e.rep.Calls("telemetry")); got != n+1 {
		t.Fatalf("v3 client of %s: probe not reported (%d telemetry calls, want %d)", id, got, n+1)
	}
	if !v.c.IsConnectionOpen() {
		t.Fatalf("v3 client of %s is not connected", id)
	}
	if n := v.connects.Load(); n != 1 {
		t.Fatalf("v3 client of %s connected %d times, want 1", id, n)
	}
}

func sprint(v any) string { return fmt.Sprint(v) }

func netDial(addr string) (net.Conn, error) { return net.DialTimeout("tcp", addr, testWaitPeriod) }
