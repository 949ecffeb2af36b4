package cloudemu

import (
	"bytes"
	"regexp"
	"strconv"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// The service's published example and contract §3.5's HMAC-SHA256 of it.
func TestAliyunPasswordVectors(t *testing.T) {
	if got, want := AliyunPassword("secret", "12345", "device", "pk", "789"),
		"6074a46a91b1ebb2cc4ea42790ad0e80202c9843859fc292e57c4eb19fad9e57"; got != want {
		t.Errorf("hmacsha256: got %s, want %s", got, want)
	}
	if got, want := aliyunPasswordSHA1("secret", "12345", "device", "pk", "789"),
		"fafd82a3d602b37fb0fa8b7892f24a477f851a14"; got != want {
		t.Errorf("hmacsha1: got %s, want %s", got, want)
	}
}

func TestAliyunSignedLoginPublishAndReceive(t *testing.T) {
	c := startAliyun(t)
	if got := c.URL(); !regexp.MustCompile(`^tls://127\.0\.0\.1:\d+$`).MatchString(got) {
		t.Fatalf("url %q", got)
	}
	rec := observe(t, c, "/"+testPK+"/"+testDN+"/user/#")
	cl := mustDial(t, c, testPK+"."+testDN, nil)

	down := make(chan string, 4)
	for _, f := range []string{"/a1pk/st01/user/rentals", "/a1pk/st01/user/+/x", "/a1pk/st01/user/cmd/#"} {
		tok := cl.Subscribe(f, 1, func(_ mqtt.Client, m mqtt.Message) { down <- m.Topic() + " " + string(m.Payload()) })
		if !tok.WaitTimeout(wait) || tok.Error() != nil {
			t.Fatalf("subscribe %s: %v", f, tok.Error())
		}
	}
	cl.publish(t, "/a1pk/st01/user/events", 1, false, []byte(`{"n":1}`))
	cl.publish(t, "/a1pk/st01/user/devices", 0, false, []byte(`{"n":2}`))
	// The largest message the service takes.
	big := bytes.Repeat([]byte("x"), AliyunMaxMessageBytes)
	cl.publish(t, "/a1pk/st01/user/events", 1, false, big)

	if err := c.Publish("/a1pk/st01/user/rentals", []byte(`{"op":"grant"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-down:
		if want := `/a1pk/st01/user/rentals {"op":"grant"}`; got != want {
			t.Errorf("station got %q, want %q", got, want)
		}
	case <-time.After(wait):
		t.Fatal("the station did not get the cloud's message")
	}
	waitFor(t, "three messages observed", func() bool { return len(rec.got()) == 3 })
	got := rec.got()
	if got[0] != `/a1pk/st01/user/events {"n":1}` || got[1] != `/a1pk/st01/user/devices {"n":2}` || len(got[2]) != len("/a1pk/st01/user/events ")+len(big) {
		t.Errorf("observed %.80q", got)
	}
	cl.stillUp(t)
	wantViolations(t, c, map[string]int{})
	if n := c.Connects(); n != 1 {
		t.Errorf("connects %d, want 1", n)
	}
	if ids := c.ClientIDs(); len(ids) != 1 || !regexp.MustCompile(`^a1pk\.st01\|securemode=2,signmethod=hmacsha256,timestamp=\d+\|$`).MatchString(ids[0]) {
		t.Errorf("client ids %q", ids)
	}
	if _, ok := c.Retained("/a1pk/st01/user/events"); ok {
		t.Error("aliyun holds a retained message")
	}
}

func TestAliyunRefusesBadLogin(t *testing.T) {
	c := startAliyun(t)
	ts := strconv.FormatInt(time.Now().UnixMilli(), 10)
	good := AliyunPassword(testSecret, "c1", testDN, testPK, ts)
	cid := "c1|securemode=2,signmethod=hmacsha256,timestamp=" + ts + "|"
	tests := []struct {
		name, clientID, user, pass string
	}{
		{"wrong secret", cid, "st01&a1pk", AliyunPassword("other", "c1", testDN, testPK, ts)},
		{"password of another timestamp", cid, "st01&a1pk", AliyunPassword(testSecret, "c1", testDN, testPK, ts+"1")},
		{"upper-case hex", cid, "st01&a1pk", string(bytes.ToUpper([]byte(good)))},
		{"username PK&DN", cid, "a1pk&st01", good},
		{"other device", cid, "st02&a1pk", AliyunPassword(testSecret, "c1", "st02", testPK, ts)},
		{"bare client id", "c1", "st01&a1pk", good},
		{"no timestamp", "c1|securemode=2,signmethod=hmacsha256|", "st01&a1pk", good},
		{"securemode 3 over tls", "c1|securemode=3,signmethod=hmacsha256,timestamp=" + ts + "|", "st01&a1pk", good},
		{"signmethod missing", "c1|securemode=2,timestamp=" + ts + "|", "st01&a1pk", good},
		{"sha1 signature declared sha256", cid, "st01&a1pk", aliyunPasswordSHA1(testSecret, "c1", testDN, testPK, ts)},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := dial(t, c, "", func(o *mqtt.ClientOptions) {
				o.SetClientID(tt.clientID).SetUsername(tt.user).SetPassword(tt.pass)
			})
			if err == nil {
				t.Fatal("connect accepted")
			}
			wantViolations(t, c, map[string]int{RuleAuth: i + 1})
		})
	}
	if n := c.Connects(); n != 0 {
		t.Errorf("connects %d, want 0", n)
	}
	// The service also takes hmacsha1 when the client id says so.
	cl := mustDial(t, c, "", func(o *mqtt.ClientOptions) {
		o.SetClientID("c1|securemode=2,signmethod=hmacsha1,timestamp=" + ts + "|").SetUsername("st01&a1pk").
			SetPassword(aliyunPasswordSHA1(testSecret, "c1", testDN, testPK, ts))
	})
	cl.stillUp(t)
}

func TestAliyunRefusesWill(t *testing.T) {
	c := startAliyun(t)
	_, err := dial(t, c, "c1", func(o *mqtt.ClientOptions) {
		o.SetWill("/a1pk/st01/user/gateway", `{"online":false}`, 1, false)
	})
	if err == nil {
		t.Fatal("connect with a will accepted")
	}
	wantViolations(t, c, map[string]int{RuleWill: 1})
}

func TestAliyunRefusesKeepaliveOutsideRange(t *testing.T) {
	c := startAliyun(t)
	for i, ka := range []time.Duration{10 * time.Second, 1300 * time.Second} {
		if _, err := dial(t, c, "c1", func(o *mqtt.ClientOptions) { o.SetKeepAlive(ka) }); err == nil {
			t.Fatalf("keepalive %v accepted", ka)
		}
		wantViolations(t, c, map[string]int{RuleKeepalive: i + 1})
	}
	for _, ka := range []time.Duration{30 * time.Second, 1200 * time.Second} {
		mustDial(t, c, "c1", func(o *mqtt.ClientOptions) { o.SetKeepAlive(ka) }).stillUp(t)
	}
}

func TestAliyunDisconnectsPublishBreakingARule(t *testing.T) {
	c := startAliyun(t)
	rec := observe(t, c, "#")
	tests := []struct {
		name, topic string
		qos         byte
		retain      bool
		size        int
		rule        string
	}{
		{"outside user", "/a1pk/st01/events", 1, false, 10, RuleTopic},
		{"no leading slash", "a1pk/st01/user/events", 1, false, 10, RuleTopic},
		{"hyphen in a level", "/a1pk/st01/user/bad-level", 1, false, 10, RuleTopic},
		{"empty level", "/a1pk/st01/user//events", 1, false, 10, RuleTopic},
		{"another device", "/a1pk/st02/user/events", 1, false, 10, RuleTopic},
		{"the user class itself", "/a1pk/st01/user", 1, false, 10, RuleTopic},
		{"retained", "/a1pk/st01/user/gateway", 1, true, 10, RuleRetain},
		{"retained qos 0", "/a1pk/st01/user/gateway", 0, true, 10, RuleRetain},
		{"qos 2", "/a1pk/st01/user/events", 2, false, 10, RuleQoS},
		{"over 256 KiB", "/a1pk/st01/user/events", 1, false, AliyunMaxMessageBytes + 1, RuleSize},
	}
	want := map[string]int{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cl := mustDial(t, c, "c1", nil)
			cl.Publish(tt.topic, tt.qos, tt.retain, bytes.Repeat([]byte("x"), tt.size))
			cl.waitLost(t)
			want[tt.rule]++
			wantViolations(t, c, want)
		})
	}
	if got := rec.got(); len(got) != 0 {
		t.Errorf("refused publishes were delivered: %.60q", got)
	}
}

// Subscribing outside /PK/DN/user/... closes the connection (not a SUBACK
// failure), so a wrong subscription cannot go unnoticed.
func TestAliyunDisconnectsSubscriptionOutsideUser(t *testing.T) {
	c := startAliyun(t)
	for i, f := range []string{"/a1pk/st01/down/rentals", "#", "/a1pk/+/user/rentals", "/a1pk/st01/user/bad-level"} {
		cl := mustDial(t, c, "c1", nil)
		cl.Subscribe(f, 1, func(mqtt.Client, mqtt.Message) {})
		cl.waitLost(t)
		wantViolations(t, c, map[string]int{RuleSubscribe: i + 1})
	}
}

func TestAliyunDisconnectsBurstOverRate(t *testing.T) {
	c := startAliyun(t)
	rec := observe(t, c, "#")
	r := dialRaw(t, c, "c1")
	r.burst(t, "/a1pk/st01/user/events", AliyunMaxPublishRate+5)
	r.waitClosed(t)
	wantViolations(t, c, map[string]int{RuleRate: 1})
	waitFor(t, "the publishes within the rate", func() bool { return len(rec.got()) >= AliyunMaxPublishRate })
	if n := len(rec.got()); n != AliyunMaxPublishRate {
		t.Errorf("%d publishes delivered, want the first %d", n, AliyunMaxPublishRate)
	}
	if s := c.Stats(); s.PeakRate != AliyunMaxPublishRate+1 {
		t.Errorf("peak rate %d, want %d", s.PeakRate, AliyunMaxPublishRate+1)
	}
}

func TestAliyunKeepsPacedPublisher(t *testing.T) {
	c := startAliyun(t)
	cl := mustDial(t, c, "c1", nil)
	tick := time.NewTicker(100 * time.Millisecond) // 10/s, a third of the limit
	defer tick.Stop()
	for i := 0; i < 10; i++ {
		<-tick.C
		cl.publish(t, "/a1pk/st01/user/events", 1, false, []byte("e"))
	}
	cl.stillUp(t)
	wantViolations(t, c, map[string]int{})
}

func TestAliyunSecondConnectionTakesOver(t *testing.T) {
	c := startAliyun(t)
	first := mustDial(t, c, "station-a", nil)
	second := mustDial(t, c, "station-b", nil)
	first.waitLost(t)
	second.stillUp(t)
	second.publish(t, "/a1pk/st01/user/events", 1, false, []byte("e"))
	wantViolations(t, c, map[string]int{})
	// mochi counts a session (OnSessionEstablished) after it sent the
	// CONNACK, so the first connection's count may come late.
	waitFor(t, "two connects counted", func() bool { return c.Connects() == 2 })
	if n := c.Connects(); n != 2 {
		t.Errorf("connects %d, want 2", n)
	}
}

// The session belongs to the device, not to the client id (which changes
// with the timestamp at every connect): a message sent while the station
// was away arrives after it logs in again.
func TestAliyunKeepsSessionOfDeviceAcrossLogins(t *testing.T) {
	c := startAliyun(t)
	got := make(chan string, 4)
	session := func(o *mqtt.ClientOptions) {
		o.SetCleanSession(false).SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) { got <- string(m.Payload()) })
	}
	first := mustDial(t, c, "a1pk.st01", session)
	if tok := first.Subscribe("/a1pk/st01/user/rentals", 1, nil); !tok.WaitTimeout(wait) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	if n := c.Kick(); n != 1 {
		t.Fatalf("kicked %d", n)
	}
	first.waitLost(t)
	if err := c.Publish("/a1pk/st01/user/rentals", []byte("grant-1")); err != nil {
		t.Fatal(err)
	}
	mustDial(t, c, "a1pk.st01", session)
	select {
	case m := <-got:
		if m != "grant-1" {
			t.Errorf("got %q", m)
		}
	case <-time.After(wait):
		t.Fatal("the message sent while away did not arrive")
	}
	if ids := c.ClientIDs(); len(ids) != 2 {
		t.Errorf("client ids %q", ids)
	}
	wantViolations(t, c, map[string]int{})
}
