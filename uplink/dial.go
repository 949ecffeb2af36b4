package uplink

import (
	"context"
	"crypto/tls"
	"net"
	"net/url"
	"os"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// The cloud's grant must reach the station at once, and a cloud broker may
// hold it back. A broker that leaves Nagle's algorithm on (mosquitto does
// unless set_tcp_nodelay is set) does not write a second small packet
// while its first is unacknowledged; edged's kernel delays the TCP ACK of
// a packet it has no reply for (a PUBACK for an event of ours) by up to
// 40 ms. Together they held a grant for 20 ms at the median and 45 ms at
// p99 at 100 grants/s (BENCHMARKS.md, "Station pipeline"). So the uplink
// acknowledges every segment it reads at once (quickAck, TCP_QUICKACK on
// Linux), whatever the broker's settings.

// quickAckDial reports whether the uplink dials uri itself (openConn):
// under TCP and TLS. Websockets, and every scheme when a proxy is set in
// the environment (paho honours all_proxy), are left to paho.
func quickAckDial(uri string) bool {
	if os.Getenv("all_proxy") != "" || os.Getenv("ALL_PROXY") != "" {
		return false
	}
	p, err := url.Parse(uri)
	if err != nil {
		return false
	}
	switch p.Scheme {
	case "tcp", "mqtt", "ssl", "tls", "mqtts":
		return true
	}
	return false
}

// openConn is the uplink's paho OpenConnectionFunc for TCP and TLS: paho's
// own dialling, with quickAck under TLS.
func openConn(uri *url.URL, o mqtt.ClientOptions) (net.Conn, error) {
	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	if o.ConnectTimeout > 0 { // paho's own: 0 means none
		ctx, cancel = context.WithTimeout(ctx, o.ConnectTimeout)
	}
	defer cancel()
	var d net.Dialer
	if o.Dialer != nil {
		d = *o.Dialer
	}
	c, err := d.DialContext(ctx, "tcp", uri.Host)
	if err != nil {
		return nil, err
	}
	c = quickAck(c)
	if uri.Scheme == "tcp" || uri.Scheme == "mqtt" {
		return c, nil
	}
	cfg := &tls.Config{}
	if o.TLSConfig != nil {
		cfg = o.TLSConfig.Clone()
	}
	if cfg.ServerName == "" {
		cfg.ServerName = uri.Hostname() // as tls.Dial does
	}
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return tc, nil
}
