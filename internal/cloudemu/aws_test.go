package cloudemu

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

func startAWS(t *testing.T) *Cloud {
	return start(t, Options{Profile: AWS})
}

func TestAWSRequiresClientCertificate(t *testing.T) {
	c := startAWS(t)
	foreign, err := newPKI(t.TempDir(), true) // a CA the cloud never saw
	if err != nil {
		t.Fatal(err)
	}
	foreignPair, err := tls.LoadX509KeyPair(foreign.clientCertFile, foreign.clientKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		certs []tls.Certificate
		rule  string
	}{
		{"no certificate", nil, RuleNoClientCert},
		{"certificate of another ca", []tls.Certificate{foreignPair}, RuleBadClientCert},
	}
	want := map[string]int{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := dial(t, c, "thing-1", func(o *mqtt.ClientOptions) {
				cfg := tlsConfig(t, c)
				cfg.Certificates = tt.certs
				o.SetTLSConfig(cfg)
			})
			if err == nil {
				t.Fatal("connect accepted")
			}
			want[tt.rule]++
			// Counted by the handshake, which may end just after the
			// client gave up.
			waitFor(t, tt.rule+" counted", func() bool { return c.Violations()[tt.rule] == want[tt.rule] })
			wantViolations(t, c, want)
		})
	}
	if n := c.Connects(); n != 0 {
		t.Errorf("connects %d, want 0", n)
	}
}

func TestAWSAcceptsThingWithinLimits(t *testing.T) {
	c := startAWS(t)
	if !strings.HasPrefix(c.URL(), "tls://127.0.0.1:") || c.ClientCertFile() == "" || c.ClientKeyFile() == "" {
		t.Fatalf("url %q cert %q key %q", c.URL(), c.ClientCertFile(), c.ClientKeyFile())
	}
	rec := observe(t, c, "stations/#")
	cl := mustDial(t, c, "thing-1", nil)
	down := make(chan string, 1)
	if tok := cl.Subscribe("stations/st-1/down/rentals", 1, func(_ mqtt.Client, m mqtt.Message) { down <- string(m.Payload()) }); !tok.WaitTimeout(wait) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	seven := "stations/st-1/up/devices/a/b/c/d" // 7 slashes
	cl.publish(t, seven, 1, false, []byte("s"))
	cl.publish(t, "stations/st-1/up/events", 1, false, bytes.Repeat([]byte("x"), AWSMaxMessageBytes))
	cl.publish(t, "stations/st-1/gateway", 1, true, []byte(`{"online":true}`))
	tick := time.NewTicker(50 * time.Millisecond) // 20/s, a fifth of the limit
	defer tick.Stop()
	for i := 0; i < 20; i++ {
		<-tick.C
		cl.publish(t, "stations/st-1/up/events", 1, false, []byte("e"))
	}
	if err := c.Publish("stations/st-1/down/rentals", []byte("grant")); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-down:
		if got != "grant" {
			t.Errorf("station got %q", got)
		}
	case <-time.After(wait):
		t.Fatal("the station did not get the cloud's message")
	}
	waitFor(t, "23 messages observed", func() bool { return len(rec.got()) == 23 })
	if got, ok := c.Retained("stations/st-1/gateway"); !ok || string(got) != `{"online":true}` {
		t.Errorf("retained %q %v", got, ok)
	}
	cl.stillUp(t)
	wantViolations(t, c, map[string]int{})
	if s := c.Stats(); s.Connects != 1 || s.Publishes != 23 || s.PeakRate > 23 {
		t.Errorf("stats %+v", s)
	}
}

func TestAWSDisconnectsBreakingARule(t *testing.T) {
	c := startAWS(t)
	rec := observe(t, c, "#")
	eight := "stations/st-1/up/devices/a/b/c/d/e"
	tests := []struct {
		name string
		act  func(cl *client)
		rule string
	}{
		{"over 128 KiB", func(cl *client) {
			cl.Publish("stations/st-1/up/events", 1, false, bytes.Repeat([]byte("x"), AWSMaxMessageBytes+1))
		}, RuleSize},
		{"8 slashes", func(cl *client) { cl.Publish(eight, 1, false, []byte("x")) }, RuleSlashes},
		{"qos 2", func(cl *client) { cl.Publish("stations/st-1/up/events", 2, false, []byte("x")) }, RuleQoS},
		{"subscribe with 8 slashes", func(cl *client) { cl.Subscribe(eight, 1, func(mqtt.Client, mqtt.Message) {}) }, RuleSlashes},
		{"9 filters in one subscribe", func(cl *client) { cl.SubscribeMultiple(filters(0, 9), nil) }, RuleSubscribe},
	}
	want := map[string]int{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cl := mustDial(t, c, "thing-1", nil)
			tt.act(cl)
			cl.waitLost(t)
			want[tt.rule]++
			wantViolations(t, c, want)
		})
	}
	if got := rec.got(); len(got) != 0 {
		t.Errorf("refused publishes were delivered: %.60q", got)
	}
}

// filters returns n topic filters numbered from first.
func filters(first, n int) map[string]byte {
	m := map[string]byte{}
	for i := first; i < first+n; i++ {
		m[fmt.Sprintf("stations/st-1/down/f%d", i)] = 1
	}
	return m
}

func TestAWSAllowsFiftySubscriptions(t *testing.T) {
	c := startAWS(t)
	cl := mustDial(t, c, "thing-1", nil)
	for first := 0; first < AWSMaxSubscriptions; first += AWSMaxFiltersPerSub {
		tok := cl.SubscribeMultiple(filters(first, min(AWSMaxFiltersPerSub, AWSMaxSubscriptions-first)), nil)
		if !tok.WaitTimeout(wait) || tok.Error() != nil {
			t.Fatalf("subscribe: %v", tok.Error())
		}
	}
	// Again the same: still 50.
	if tok := cl.SubscribeMultiple(filters(0, 8), nil); !tok.WaitTimeout(wait) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	cl.stillUp(t)
	wantViolations(t, c, map[string]int{})
	cl.Subscribe("stations/st-1/down/one-more", 1, nil)
	cl.waitLost(t)
	wantViolations(t, c, map[string]int{RuleSubscribe: 1})
}

func TestAWSDisconnectsBurstOverRate(t *testing.T) {
	c := startAWS(t)
	r := dialRaw(t, c, "thing-1")
	r.burst(t, "stations/st-1/up/events", AWSMaxPublishRate+5)
	r.waitClosed(t)
	wantViolations(t, c, map[string]int{RuleRate: 1})
}

// A thing that dies without DISCONNECT leaves its retained will, as AWS
// IoT Core delivers it.
func TestAWSDeliversRetainedWillOfKilledClient(t *testing.T) {
	c := startAWS(t)
	rec := observe(t, c, "stations/st-1/gateway")
	var mu sync.Mutex
	var conn net.Conn
	cl := mustDial(t, c, "thing-1", func(o *mqtt.ClientOptions) {
		o.SetWill("stations/st-1/gateway", `{"online":false}`, 1, true)
		o.SetCustomOpenConnectionFn(func(u *url.URL, o mqtt.ClientOptions) (net.Conn, error) {
			tc, err := tls.DialWithDialer(&net.Dialer{Timeout: wait}, "tcp", u.Host, o.TLSConfig)
			mu.Lock()
			conn = tc
			mu.Unlock()
			return tc, err
		})
	})
	cl.publish(t, "stations/st-1/gateway", 1, true, []byte(`{"online":true}`))
	waitFor(t, "online observed", func() bool { return len(rec.got()) == 1 })
	mu.Lock()
	conn.(*tls.Conn).NetConn().Close() // the process dies: no DISCONNECT, no TLS close_notify
	mu.Unlock()
	waitFor(t, "the will", func() bool {
		got, _ := c.Retained("stations/st-1/gateway")
		return string(got) == `{"online":false}`
	})
	waitFor(t, "the will observed", func() bool { return len(rec.got()) == 2 })
	if got := rec.got(); got[1] != `stations/st-1/gateway {"online":false}` {
		t.Errorf("observed %q", got)
	}
	wantViolations(t, c, map[string]int{})
}

// An emulator started again on the same Dir and address keeps its CA and
// port, so a station configured for the first reconnects to the second.
func TestRestartKeepsCAAndAddress(t *testing.T) {
	dir := t.TempDir()
	c1, err := Start(Options{Profile: AWS, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ca1, _ := os.ReadFile(c1.CAFile())
	addr := c1.ln.Addr().String()
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	c2 := start(t, Options{Profile: AWS, Dir: dir, Addr: addr})
	ca2, _ := os.ReadFile(c2.CAFile())
	if !bytes.Equal(ca1, ca2) || c2.URL() != c1.URL() {
		t.Fatalf("restart changed the ca or the url %s -> %s", c1.URL(), c2.URL())
	}
	mustDial(t, c2, "thing-1", nil).stillUp(t)
}
