package uplink

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/stationedge/edged"
)

// alpnAWS is the protocol AWS IoT Core expects for MQTT over port 443.
const alpnAWS = "x-amzn-mqtt-ca"

// wantsALPN reports whether the aws profile offers ALPN on broker (a
// normalized URL): only for tls:// or ssl:// on port 443 (§3.5).
func wantsALPN(profile, broker string) bool {
	if profile != edged.ProfileAWS {
		return false
	}
	p, err := url.Parse(broker)
	if err != nil {
		return false
	}
	return (p.Scheme == "tls" || p.Scheme == "ssl" || p.Scheme == "mqtts") && p.Port() == "443"
}

// login is what one CONNECT carries.
type login struct {
	clientID, username, password string
}

// aliyunLogin signs an IoT Platform connect (§3.5) for the device pk/dn,
// with client id c and the timestamp now in Unix milliseconds. It must be
// computed afresh at every connect: the service refuses an old timestamp.
func aliyunLogin(c, pk, dn, secret string, now time.Time) login {
	ts := strconv.FormatInt(now.UnixMilli(), 10)
	return login{
		clientID: c + "|securemode=2,signmethod=hmacsha256,timestamp=" + ts + "|",
		username: dn + "&" + pk,
		password: aliyunSign(secret, c, dn, pk, ts),
	}
}

// aliyunSign is the lower-case hex HMAC-SHA256, keyed with the device
// secret, of "clientId" C "deviceName" DN "productKey" PK "timestamp" T.
func aliyunSign(secret, c, dn, pk, ts string) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte("clientId" + c + "deviceName" + dn + "productKey" + pk + "timestamp" + ts))
	return hex.EncodeToString(m.Sum(nil))
}

// pacer holds publishes to at most rate in any 1 s window: it remembers
// the send times of the last rate publishes, and the next may go once the
// oldest of them is a second old. The clouds count publishes per sliding
// second, so a token bucket refilled continuously could burst past them.
// It is shared by all the uplink's connections, since a cloud may count
// per device across a reconnect. A rate of 0 means no limit.
type pacer struct {
	mu    sync.Mutex
	rate  int
	sent  []time.Time // ring of the last rate send times
	next  int         // index of the oldest
	count int
}

// paceWindow is the window the clouds count in. A few milliseconds of
// margin cover the cloud stamping arrivals a little later than we send.
const paceWindow = time.Second + 5*time.Millisecond

func newPacer(rate int) *pacer {
	p := &pacer{rate: rate}
	if rate > 0 {
		p.sent = make([]time.Time, rate)
	}
	return p
}

// reserve takes a token at now if one is free and returns 0; otherwise it
// takes nothing and returns how long to wait before trying again.
func (p *pacer) reserve(now time.Time) time.Duration {
	if p == nil || p.rate <= 0 {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.count == p.rate {
		if d := paceWindow - now.Sub(p.sent[p.next]); d > 0 {
			return d
		}
	} else {
		p.count++
	}
	p.sent[p.next] = now
	p.next = (p.next + 1) % p.rate
	return 0
}
