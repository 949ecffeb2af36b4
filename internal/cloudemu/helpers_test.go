package cloudemu

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/google/go-cmp/cmp"
	"github.com/mochi-mqtt/server/v2/packets"
)

// The aliyun device triple of the tests.
const (
	testPK     = "a1pk"
	testDN     = "st01"
	testSecret = "s3cret-of-st01"
)

// wait bounds every wait on the emulator or a client; generous, because
// the machine may be busy, and never a pass/fail budget.
const wait = 10 * time.Second

func start(t *testing.T, o Options) *Cloud {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	c, err := Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func startAliyun(t *testing.T) *Cloud {
	return start(t, Options{Profile: Aliyun, ProductKey: testPK, DeviceName: testDN, DeviceSecret: testSecret})
}

// aliyunLogin returns a CONNECT's client id, username and password for
// client id prefix id, signed now.
func aliyunLogin(id string) (clientID, username, password string) {
	ts := strconv.FormatInt(time.Now().UnixMilli(), 10)
	return id + "|securemode=2,signmethod=hmacsha256,timestamp=" + ts + "|",
		testDN + "&" + testPK, AliyunPassword(testSecret, id, testDN, testPK, ts)
}

// tlsConfig trusts c's CA and, if c has one, presents the thing's
// certificate; nil for a plain TCP cloud.
func tlsConfig(t *testing.T, c *Cloud) *tls.Config {
	t.Helper()
	if c.CAFile() == "" {
		return nil
	}
	pem, err := os.ReadFile(c.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("no ca in", c.CAFile())
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if c.ClientCertFile() != "" {
		pair, err := tls.LoadX509KeyPair(c.ClientCertFile(), c.ClientKeyFile())
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg
}

// client is a paho client and the error it lost its connection with.
type client struct {
	mqtt.Client
	lost chan error
}

// dial connects a well-configured paho client (a signed login on aliyun,
// the thing's certificate on aws), after set changes its options.
func dial(t *testing.T, c *Cloud, id string, set func(*mqtt.ClientOptions)) (*client, error) {
	t.Helper()
	cl := &client{lost: make(chan error, 1)}
	o := mqtt.NewClientOptions().AddBroker(c.URL()).SetClientID(id).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(wait).SetKeepAlive(60 * time.Second).SetCleanSession(true).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) { cl.lost <- err })
	if cfg := tlsConfig(t, c); cfg != nil {
		o.SetTLSConfig(cfg)
	}
	if c.o.Profile == Aliyun {
		cid, user, pass := aliyunLogin(id)
		o.SetClientID(cid).SetUsername(user).SetPassword(pass)
	}
	if set != nil {
		set(o)
	}
	cl.Client = mqtt.NewClient(o)
	tok := cl.Connect()
	if !tok.WaitTimeout(wait) {
		return nil, errors.New("connect timed out")
	}
	if tok.Error() != nil {
		return nil, tok.Error()
	}
	t.Cleanup(func() { cl.Disconnect(0) })
	return cl, nil
}

func mustDial(t *testing.T, c *Cloud, id string, set func(*mqtt.ClientOptions)) *client {
	t.Helper()
	cl, err := dial(t, c, id, set)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	return cl
}

// publish publishes and waits for the PUBACK.
func (cl *client) publish(t *testing.T, topic string, qos byte, retain bool, payload []byte) {
	t.Helper()
	tok := cl.Publish(topic, qos, retain, payload)
	if !tok.WaitTimeout(wait) || tok.Error() != nil {
		t.Fatalf("publish on %s: %v", topic, tok.Error())
	}
}

// waitLost waits until the cloud has closed the client's connection.
func (cl *client) waitLost(t *testing.T) {
	t.Helper()
	select {
	case <-cl.lost:
	case <-time.After(wait):
		t.Fatal("the cloud did not disconnect the client")
	}
}

// stillUp fails if the client lost its connection.
func (cl *client) stillUp(t *testing.T) {
	t.Helper()
	select {
	case err := <-cl.lost:
		t.Fatalf("the cloud disconnected a well-behaved client: %v", err)
	default:
	}
	if !cl.IsConnectionOpen() {
		t.Fatal("connection closed")
	}
}

// waitFor polls cond every 10 ms until it holds or the wait ends.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func wantViolations(t *testing.T, c *Cloud, want map[string]int) {
	t.Helper()
	if diff := cmp.Diff(want, c.Violations()); diff != "" {
		t.Errorf("violations (-want +got):\n%s", diff)
	}
}

// recorder collects what the cloud observes on a filter.
type recorder struct {
	mu   sync.Mutex
	msgs []string // topic + " " + payload
}

func observe(t *testing.T, c *Cloud, filter string) *recorder {
	t.Helper()
	r := &recorder{}
	if err := c.Subscribe(filter, func(topic string, payload []byte) {
		r.mu.Lock()
		r.msgs = append(r.msgs, topic+" "+string(payload))
		r.mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *recorder) got() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.msgs...)
}

// raw is a bare MQTT connection, for bursts that must reach the cloud in
// one write whatever the load of the machine.
type raw struct {
	net.Conn
}

// dialRaw connects and sends CONNECT for client id prefix id (signed on
// aliyun), and checks the CONNACK accepts it.
func dialRaw(t *testing.T, c *Cloud, id string) *raw {
	t.Helper()
	addr := c.ln.Addr().String()
	var conn net.Conn
	var err error
	if cfg := tlsConfig(t, c); cfg != nil {
		conn, err = tls.DialWithDialer(&net.Dialer{Timeout: wait}, "tcp", addr, cfg)
	} else {
		conn, err = net.DialTimeout("tcp", addr, wait)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id}}
	if c.o.Profile == Aliyun {
		cid, user, pass := aliyunLogin(id)
		pk.Connect.ClientIdentifier = cid
		pk.Connect.UsernameFlag, pk.Connect.Username = true, []byte(user)
		pk.Connect.PasswordFlag, pk.Connect.Password = true, []byte(pass)
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(wait))
	if _, err := conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	if _, err := conn.Read(ack); err != nil {
		t.Fatalf("connack: %v", err)
	}
	if ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("connack % x", ack)
	}
	conn.SetDeadline(time.Time{})
	return &raw{conn}
}

// burst sends n QoS 1 publishes on topic in a single write.
func (r *raw) burst(t *testing.T, topic string, n int) {
	t.Helper()
	var buf bytes.Buffer
	for i := 1; i <= n; i++ {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4,
			TopicName: topic, PacketID: uint16(i), Payload: []byte(strconv.Itoa(i))}
		if err := pk.PublishEncode(&buf); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
}

// waitClosed reads until the cloud closes the connection.
func (r *raw) waitClosed(t *testing.T) {
	t.Helper()
	r.SetReadDeadline(time.Now().Add(wait))
	b := make([]byte, 4096)
	for {
		_, err := r.Read(b)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the cloud did not close the connection")
		}
		return
	}
}
