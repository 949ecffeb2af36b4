package uplink

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// The signature vectors of contract §3.5.
func TestAliyunSignVectors(t *testing.T) {
	got := aliyunSign("secret", "12345", "device", "pk", "789")
	if want := "6074a46a91b1ebb2cc4ea42790ad0e80202c9843859fc292e57c4eb19fad9e57"; got != want {
		t.Errorf("sign = %s, want %s", got, want)
	}

	l := aliyunLogin("a1pk.st01", "a1pk", "st01", "the-secret", time.UnixMilli(1700000000000))
	if want := "a1pk.st01|securemode=2,signmethod=hmacsha256,timestamp=1700000000000|"; l.clientID != want {
		t.Errorf("client id = %s, want %s", l.clientID, want)
	}
	if l.username != "st01&a1pk" {
		t.Errorf("username = %s", l.username)
	}
	m := hmac.New(sha256.New, []byte("the-secret"))
	m.Write([]byte("clientIda1pk.st01deviceNamest01productKeya1pktimestamp1700000000000"))
	if want := hex.EncodeToString(m.Sum(nil)); l.password != want {
		t.Errorf("password = %s, want %s", l.password, want)
	}
	// A new connect a millisecond later signs afresh.
	if l2 := aliyunLogin("a1pk.st01", "a1pk", "st01", "the-secret", time.UnixMilli(1700000000001)); l2.password == l.password || l2.clientID == l.clientID {
		t.Error("a later connect reused the signature")
	}
}

// aws offers ALPN x-amzn-mqtt-ca on port 443 with tls:// or ssl://, and
// nowhere else.
func TestAWSALPN(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, dir, "ca")
	cert, key := ca.issue(t, dir, "thing", false)
	cases := []struct {
		profile, url string
		alpn         bool
	}{
		{edged.ProfileAWS, "tls://abc-ats.iot.eu-west-1.amazonaws.com:443", true},
		{edged.ProfileAWS, "ssl://abc-ats.iot.eu-west-1.amazonaws.com:443", true},
		{edged.ProfileAWS, "tls://abc-ats.iot.eu-west-1.amazonaws.com", false}, // 8883
		{edged.ProfileAWS, "wss://abc-ats.iot.eu-west-1.amazonaws.com:443", false},
		{edged.ProfileGeneric, "tls://broker.example.com:443", false},
	}
	for _, tc := range cases {
		s := newStation()
		cfg := s.config(t, tc.url)
		cfg.Profile = tc.profile
		cfg.KeepAlive = 30 * time.Second
		cfg.CAFile = filepath.Join(dir, "ca.pem")
		cfg.CertFile, cfg.KeyFile = cert, key
		u, err := New(cfg)
		if err != nil {
			t.Fatalf("%s %s: %v", tc.profile, tc.url, err)
		}
		if got := slices.Equal(u.tls.NextProtos, []string{"x-amzn-mqtt-ca"}); got != tc.alpn {
			t.Errorf("%s %s: NextProtos %v, want ALPN %v", tc.profile, tc.url, u.tls.NextProtos, tc.alpn)
		}
		if len(u.tls.Certificates) != 1 {
			t.Errorf("%s %s: no client certificate", tc.profile, tc.url)
		}
	}
}

// New refuses an incomplete profile, and never shows the secret.
func TestNewRefusesIncompleteProfile(t *testing.T) {
	s := newStation()
	base := s.config(t, "tls://iot.example.com:8883")
	base.KeepAlive = 60 * time.Second
	cases := map[string]func(c *Config){
		"unknown profile":  func(c *Config) { c.Profile = "azure" },
		"aws without cert": func(c *Config) { c.Profile = edged.ProfileAWS },
		"aliyun no secret": func(c *Config) {
			c.Profile = edged.ProfileAliyun
			c.Aliyun = edged.AliyunConfig{ProductKey: "pk", DeviceName: "dn"}
		},
		"aliyun over tcp":   func(c *Config) { c.Profile = edged.ProfileAliyun; c.URL = "tcp://x:1883"; c.Aliyun = aliyunID },
		"aliyun keepalive":  func(c *Config) { c.Profile = edged.ProfileAliyun; c.KeepAlive = 10 * time.Second; c.Aliyun = aliyunID },
		"aliyun keepalive+": func(c *Config) { c.Profile = edged.ProfileAliyun; c.KeepAlive = time.Hour; c.Aliyun = aliyunID },
	}
	for name, mod := range cases {
		cfg := base
		mod(&cfg)
		_, err := New(cfg)
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if e := err.Error(); containsSecret(e) {
			t.Errorf("%s: error shows the secret: %s", name, e)
		}
	}
	cfg := base
	cfg.Profile, cfg.Aliyun = edged.ProfileAliyun, aliyunID
	u, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	st := u.Status()
	if st.Profile != "aliyun" || st.Identity != "pk1/dn1" {
		t.Errorf("status profile %q identity %q", st.Profile, st.Identity)
	}
	if u.topics.events != "/pk1/dn1/user/events" || u.topics.devices != "/pk1/dn1/user/devices" ||
		u.topics.gateway != "/pk1/dn1/user/gateway" || u.topics.renter != "/pk1/dn1/user/renter" ||
		u.topics.downRentals != "/pk1/dn1/user/rentals" || u.topics.downCommands != "/pk1/dn1/user/commands" {
		t.Errorf("aliyun topics = %+v", u.topics)
	}
	if u.clientID != "pk1.dn1" || u.batch != 200 || u.maxBytes != 256*1024 || u.pacer.rate != 25 || u.retain {
		t.Errorf("aliyun settings: client %s batch %d max %d rate %d retain %v", u.clientID, u.batch, u.maxBytes, u.pacer.rate, u.retain)
	}
}

var aliyunID = edged.AliyunConfig{ProductKey: "pk1", DeviceName: "dn1", DeviceSecret: "s3cr3t-value"}

func containsSecret(s string) bool {
	for i := 0; i+len("s3cr3t") <= len(s); i++ {
		if s[i:i+len("s3cr3t")] == "s3cr3t" {
			return true
		}
	}
	return false
}

// The pacer never lets more than rate publishes into any window of 1 s,
// and lets them go as soon as the window allows.
func TestPacerSlidingWindow(t *testing.T) {
	const rate = 10
	p := newPacer(rate)
	now := time.Unix(1700000000, 0)
	var sent []time.Time
	for len(sent) < 55 {
		d := p.reserve(now)
		if d == 0 {
			sent = append(sent, now)
			now = now.Add(7 * time.Millisecond) // a burst, faster than the rate
			continue
		}
		if d < 0 || d > time.Second+10*time.Millisecond {
			t.Fatalf("wait %v out of range", d)
		}
		now = now.Add(d)
	}
	for i := range sent {
		n := 0
		for j := i; j < len(sent) && sent[j].Sub(sent[i]) < time.Second; j++ {
			n++
		}
		if n > rate {
			t.Fatalf("%d publishes within 1 s from #%d", n, i)
		}
	}
	// The first rate go at once, as a burst.
	if sent[rate-1].Sub(sent[0]) > rate*7*time.Millisecond {
		t.Errorf("the first %d were held back: %v", rate, sent[rate-1].Sub(sent[0]))
	}
	// Unlimited.
	if d := newPacer(0).reserve(now); d != 0 {
		t.Errorf("no rate: wait %v", d)
	}
}
