package cloudemu

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// File names the emulator writes in Options.Dir.
const (
	caCertName     = "cloud-ca.pem"
	caKeyName      = "cloud-ca.key"
	clientCertName = "thing-cert.pem"
	clientKeyName  = "thing-key.pem"
)

// pki is the emulator's certificate authority and the certificates it signed.
type pki struct {
	caFile, clientCertFile, clientKeyFile string
	server                                tls.Certificate
	pool                                  *x509.CertPool
}

// newPKI loads the CA from dir, or creates one there, so that an emulator
// restarted on the same dir keeps the CA a station was configured with.
// It always signs a fresh server certificate for 127.0.0.1 and localhost,
// and, with client true, a client certificate (the thing's certificate)
// unless dir already holds one.
func newPKI(dir string, client bool) (*pki, error) {
	if dir == "" {
		return nil, errors.New("a tls profile needs Options.Dir for its certificates")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{caFile: filepath.Join(dir, caCertName)}
	caCert, caKey, err := loadCA(p.caFile, filepath.Join(dir, caKeyName))
	if errors.Is(err, os.ErrNotExist) {
		caCert, caKey, err = createCA(p.caFile, filepath.Join(dir, caKeyName))
	}
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	p.pool = x509.NewCertPool()
	p.pool.AddCert(caCert)

	srvDER, srvKey, err := sign(caCert, caKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "cloudemu server"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return nil, fmt.Errorf("server certificate: %w", err)
	}
	p.server = tls.Certificate{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}

	if client {
		p.clientCertFile = filepath.Join(dir, clientCertName)
		p.clientKeyFile = filepath.Join(dir, clientKeyName)
		if _, err := tls.LoadX509KeyPair(p.clientCertFile, p.clientKeyFile); err == nil {
			return p, nil
		}
		der, key, err := sign(caCert, caKey, &x509.Certificate{
			Subject:     pkix.Name{CommonName: "edged thing"},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		})
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		if err := writePEM(p.clientCertFile, "CERTIFICATE", der); err != nil {
			return nil, err
		}
		kb, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return nil, err
		}
		if err := writePEM(p.clientKeyFile, "EC PRIVATE KEY", kb); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func loadCA(certFile, keyFile string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		if _, serr := os.Stat(certFile); errors.Is(serr, os.ErrNotExist) {
			return nil, nil, serr
		}
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, nil, err
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, errors.New("ca key is not ecdsa")
	}
	return cert, key, nil
}

func createCA(certFile, keyFile string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "cloudemu ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	if err := writePEM(keyFile, "EC PRIVATE KEY", kb); err != nil {
		return nil, nil, err
	}
	if err := writePEM(certFile, "CERTIFICATE", der); err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// sign issues a leaf certificate from tmpl with a fresh P-256 key.
func sign(ca *x509.Certificate, caKey *ecdsa.PrivateKey, tmpl *x509.Certificate) ([]byte, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl.SerialNumber = serial()
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(5 * 365 * 24 * time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	return der, key, err
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

// handshakeListener accepts TCP connections and completes the TLS handshake
// before handing a connection to mochi, so a failed handshake (a thing
// without a client certificate) is seen, classified and counted here,
// instead of vanishing as a read error inside the broker.
type handshakeListener struct {
	inner  net.Listener
	cfg    *tls.Config
	failed func(rule string, err error)
	conns  chan net.Conn
	closed chan struct{}
	ctx    context.Context // cancelled by Close, so handshakes in progress end
	cancel context.CancelFunc
	once   sync.Once
	wg     sync.WaitGroup
}

// handshakeTimeout bounds a handshake, so a client that opens TCP and
// sends nothing holds a goroutine only that long.
const handshakeTimeout = 10 * time.Second

func newHandshakeListener(inner net.Listener, cfg *tls.Config, failed func(rule string, err error)) *handshakeListener {
	l := &handshakeListener{inner: inner, cfg: cfg, failed: failed,
		conns: make(chan net.Conn), closed: make(chan struct{})}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	l.wg.Add(1)
	go l.acceptLoop()
	return l
}

func (l *handshakeListener) acceptLoop() {
	defer l.wg.Done()
	for {
		raw, err := l.inner.Accept()
		if err != nil {
			select {
			case <-l.closed:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		l.wg.Add(1)
		go l.handshake(raw)
	}
}

func (l *handshakeListener) handshake(raw net.Conn) {
	defer l.wg.Done()
	ctx, cancel := context.WithTimeout(l.ctx, handshakeTimeout)
	defer cancel()
	tc := tls.Server(raw, l.cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		if rule := handshakeRule(err); rule != "" {
			l.failed(rule, err)
		}
		return
	}
	select {
	case l.conns <- tc:
	case <-l.closed:
		tc.Close()
	}
}

// handshakeRule names the rule a failed handshake broke, or "" for a
// client that merely went away (a port probe).
func handshakeRule(err error) string {
	var cv *tls.CertificateVerificationError
	switch {
	case errors.As(err, &cv):
		return RuleBadClientCert
	case strings.Contains(err.Error(), "didn't provide a certificate"):
		return RuleNoClientCert
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, context.Canceled):
		return ""
	default:
		return RuleTLS
	}
}

// Accept returns the next connection whose handshake succeeded.
func (l *handshakeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

// Close stops accepting and waits for the handshakes in progress.
func (l *handshakeListener) Close() error {
	var err error
	l.once.Do(func() {
		close(l.closed)
		l.cancel()
		err = l.inner.Close()
	})
	l.wg.Wait()
	return err
}

// Addr is the TCP address listened on.
func (l *handshakeListener) Addr() net.Addr { return l.inner.Addr() }
