// Command edged is the station gateway daemon and its tools: run it, check
// a config, hash a device secret, make and use rental signing keys.
package main

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/systemd"
	"golang.org/x/crypto/bcrypt"
)

const usage = `usage: edged [-config FILE]            run the station daemon
       edged demo                       run a whole simulated station
       edged check-config -config FILE  check a config file
       edged hash-secret                read a secret on stdin, print its bcrypt hash
       edged keygen -out FILE           write a rental signing key, print its public key
       edged sign-rental -key FILE -station S
                                        read a rental message on stdin, print it signed
       edged sign-registry -key FILE -station S -version N
                                        read a devices list (YAML or JSON) on stdin,
                                        print the registry message to publish
       edged version                    print the version
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "edged:", err)
		}
		os.Exit(2)
	}
}

// run dispatches a command line; it is main without the process.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	cmd := ""
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	fs := flag.NewFlagSet("edged "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	switch cmd {
	case "":
		configPath := fs.String("config", "", "config file (default "+defaultConfigPath+" when it exists)")
		if err := fs.Parse(args); err != nil {
			return err
		}
		return runDaemon(ctx, *configPath, stderr)
	case "demo":
		return runDemo(ctx, args, stdout, stderr)
	case "check-config":
		configPath := fs.String("config", "", "config file")
		if err := fs.Parse(args); err != nil {
			return err
		}
		if *configPath == "" {
			return errors.New("check-config needs -config FILE")
		}
		if _, err := loadConfig(*configPath); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s: ok\n", *configPath)
		return nil
	case "hash-secret":
		if err := fs.Parse(args); err != nil {
			return err
		}
		return hashSecret(stdin, stdout)
	case "keygen":
		out := fs.String("out", "", "file to write the private key to (mode 0600)")
		if err := fs.Parse(args); err != nil {
			return err
		}
		if *out == "" {
			return errors.New("keygen needs -out FILE")
		}
		return keygen(*out, stdout)
	case "sign-rental":
		keyPath := fs.String("key", "", "private key file from edged keygen")
		station := fs.String("station", "", "station id the rental is for")
		if err := fs.Parse(args); err != nil {
			return err
		}
		if *keyPath == "" || *station == "" {
			return errors.New("sign-rental needs -key FILE and -station S")
		}
		return signRental(*keyPath, *station, stdin, stdout)
	case "sign-registry":
		keyPath := fs.String("key", "", "private key file from edged keygen")
		station := fs.String("station", "", "station id the registry is for")
		version := fs.Uint64("version", 0, "registry version, greater than the one applied")
		if err := fs.Parse(args); err != nil {
			return err
		}
		if *keyPath == "" || *station == "" || *version == 0 {
			return errors.New("sign-registry needs -key FILE, -station S and -version N (at least 1)")
		}
		return signRegistry(*keyPath, *station, *version, stdin, stdout)
	case "version":
		fmt.Fprintln(stdout, "edged", edged.Version)
		return nil
	case "help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
}

// newLogger builds the daemon's one logger: journald-aware text on stderr.
func newLogger(w io.Writer) *slog.Logger {
	level := slog.LevelInfo
	if os.Getenv("EDGED_DEBUG") != "" {
		level = slog.LevelDebug
	}
	return slog.New(systemd.NewLogHandler(w, level))
}

func runDaemon(ctx context.Context, configPath string, stderr io.Writer) error {
	cfg, err := loadConfig(configPath)
	if err != nil {
		return err
	}
	logger := newLogger(stderr)
	// SIGHUP reloads (§9); Go's default would end the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	m := NewMain(cfg, logger)
	m.ConfigPath = configPath
	if m.ConfigPath == "" {
		if _, err := os.Stat(defaultConfigPath); err == nil {
			m.ConfigPath = defaultConfigPath
		}
	}
	if err := m.Run(ctx); err != nil {
		m.Close()
		return err
	}
	for waiting := true; waiting; {
		select {
		case <-ctx.Done():
			waiting = false
		case <-hup:
			if m.ConfigPath == "" {
				logger.Warn("reload: no config file to read (running on the built-in defaults)")
			} else {
				_ = m.Reload(ctx) // a refusal is logged and shown by Reload
			}
		}
	}
	logger.Info("stopping")
	_ = systemd.Stopping()
	return m.Close()
}

func hashSecret(stdin io.Reader, stdout io.Writer) error {
	line, err := bufio.NewReader(io.LimitReader(stdin, 4096)).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read secret: %w", err)
	}
	secret := strings.TrimRight(line, "\r\n")
	if secret == "" {
		return errors.New("empty secret on stdin")
	}
	if len(secret) > 72 {
		return errors.New("secret is longer than 72 bytes, bcrypt's limit")
	}
	h, err := bcrypt.GenerateFromPassword([]byte(secret), bcrypt.DefaultCost)
	if err != nil {
		return fmt.Errorf("hash secret: %w", err)
	}
	fmt.Fprintln(stdout, string(h))
	return nil
}

func keygen(out string, stdout io.Writer) error {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return fmt.Errorf("encode key: %w", err)
	}
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("write key: %w", err)
	}
	if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der}); err != nil {
		f.Close()
		return fmt.Errorf("write key: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write key: %w", err)
	}
	fmt.Fprintln(stdout, base64.StdEncoding.EncodeToString(pub))
	return nil
}

// readPrivateKey reads a PKCS #8 PEM Ed25519 key, as keygen writes it.
func readPrivateKey(path string) (ed25519.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%s: not a PEM private key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: not an Ed25519 key", path)
	}
	return priv, nil
}

func signRental(keyPath, station string, stdin io.Reader, stdout io.Writer) error {
	if !edged.ValidStationID(station) {
		return fmt.Errorf("bad station id %q", station)
	}
	priv, err := readPrivateKey(keyPath)
	if err != nil {
		return err
	}
	data, err := io.ReadAll(io.LimitReader(stdin, edged.MaxPayload+1))
	if err != nil {
		return fmt.Errorf("read message: %w", err)
	}
	m, err := edged.ParseRentalMessage(data)
	if err != nil {
		return fmt.Errorf("rental message: %w", err)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(data, &obj); err != nil {
		return fmt.Errorf("rental message: %w", err)
	}
	sig, _ := json.Marshal(edged.SignRental(priv, station, m))
	obj["sig"] = sig
	out, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, string(out))
	return nil
}

// signRegistry reads a devices list (YAML or JSON) and prints the registry
// message of §3.6: the list as a JSON string, the version and the sig.
func signRegistry(keyPath, station string, version uint64, stdin io.Reader, stdout io.Writer) error {
	if !edged.ValidStationID(station) {
		return fmt.Errorf("bad station id %q", station)
	}
	priv, err := readPrivateKey(keyPath)
	if err != nil {
		return err
	}
	data, err := io.ReadAll(io.LimitReader(stdin, 16<<20))
	if err != nil {
		return fmt.Errorf("read devices: %w", err)
	}
	devs, err := readDeviceList(data)
	if err != nil {
		return err
	}
	list, err := json.Marshal(devs)
	if err != nil {
		return err
	}
	m := edged.RegistryMessage{Version: version, Devices: string(list)}
	m.Sig = edged.SignRegistry(priv, station, m)
	out, err := json.Marshal(m)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, string(out))
	return nil
}
