package uplink

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	file string // PEM of the CA certificate
}

func newTestCA(t *testing.T, dir, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &testCA{cert: cert, key: key, file: filepath.Join(dir, name+".pem")}
	writePEM(t, ca.file, "CERTIFICATE", der)
	return ca
}

// issue writes a leaf certificate and key signed by ca; server certificates
// name 127.0.0.1 and localhost.
func (ca *testCA) issue(t *testing.T, dir, name string, server bool) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tpl.DNSNames = []string{"localhost"}
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "EC PRIVATE KEY", kder)
	return certFile, keyFile
}

func writePEM(t *testing.T, file, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestTLS: the uplink verifies the broker against ca_file, refuses a
// broker signed by another CA, and presents a client certificate to a
// broker that requires one (mTLS); over TCP and WebSocket.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	serverCA := newTestCA(t, dir, "server-ca")
	otherCA := newTestCA(t, dir, "other-ca")
	clientCA := newTestCA(t, dir, "client-ca")
	srvCert, srvKey := serverCA.issue(t, dir, "broker", true)
	cliCert, cliKey := clientCA.issue(t, dir, "edged-st-1", false)

	tlsPort, mtlsPort, wsPort, wssPort := freePort(t), freePort(t), freePort(t), freePort(t)
	m := startMosquitto(t, fmt.Sprintf(`
listener %d 127.0.0.1
certfile %s
keyfile %s

listener %d 127.0.0.1
certfile %s
keyfile %s
cafile %s
require_certificate true

listener %d 127.0.0.1
protocol websockets

listener %d 127.0.0.1
protocol websockets
certfile %s
keyfile %s
`, tlsPort, srvCert, srvKey, mtlsPort, srvCert, srvKey, clientCA.file, wsPort, wssPort, srvCert, srvKey))
	_ = m
	tlsURL := fmt.Sprintf("tls://127.0.0.1:%d", tlsPort)
	mtlsURL := fmt.Sprintf("ssl://127.0.0.1:%d", mtlsPort)
	wsURL := fmt.Sprintf("ws://127.0.0.1:%d/mqtt", wsPort)
	wssURL := fmt.Sprintf("wss://127.0.0.1:%d/mqtt", wssPort)

	tests := []struct {
		name      string
		url       string
		edit      func(c *Config)
		connected bool
		errHas    string
	}{
		{"verified", tlsURL, func(c *Config) { c.CAFile = serverCA.file }, true, ""},
		{"unknown CA", tlsURL, func(c *Config) { c.CAFile = otherCA.file }, false, "certificate"},
		{"system roots", tlsURL, func(c *Config) {}, false, "certificate"},
		{"insecure skip verify", tlsURL, func(c *Config) { c.InsecureSkipVerify = true }, true, ""},
		{"mTLS", mtlsURL, func(c *Config) { c.CAFile = serverCA.file; c.CertFile, c.KeyFile = cliCert, cliKey }, true, ""},
		{"mTLS without a client certificate", mtlsURL, func(c *Config) { c.CAFile = serverCA.file }, false, ""},
		{"websocket", wsURL, func(c *Config) {}, true, ""},
		{"secure websocket", wssURL, func(c *Config) { c.CAFile = serverCA.file }, true, ""},
		{"secure websocket, unknown CA", wssURL, func(c *Config) { c.CAFile = otherCA.file }, false, "certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStation()
			cfg := s.config(t, tt.url)
			tt.edit(&cfg)
			u, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			stop := runUplink(t, u)
			defer stop()
			if tt.connected {
				waitFor(t, 10*time.Second, "connected", func() bool { return u.Status().State == StateConnected })
				s.outbox.Append(1, 1)
				waitFor(t, 5*time.Second, "an event delivered", func() bool { return u.Status().LastAckedSeq == 1 })
				return
			}
			waitFor(t, 10*time.Second, "a refused connection", func() bool { return u.Status().LastError != "" })
			st := u.Status()
			if st.State == StateConnected || st.Reconnects != 0 {
				t.Fatalf("status: got %+v, want never connected", st)
			}
			if !strings.Contains(st.LastError, tt.errHas) {
				t.Fatalf("LastError: got %q, want it to mention %q", st.LastError, tt.errHas)
			}
		})
	}
}
