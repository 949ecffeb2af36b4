package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

const stationID = "bench"

// bench holds what every scenario shares.
type bench struct {
	dir       string // temp dir, removed at the end
	edged     string // the built binary
	mosquitto string
	quick     bool
	verbose   bool
	cases     string // drain cases to run, e.g. "edged:offline"; empty: all

	credMu sync.Mutex
	hashes []string // bcrypt hash of secret(i), at bcrypt.MinCost
	seq    int      // names the per-run subdirectories
}

func deviceID(i int) string { return fmt.Sprintf("d%05d", i) }
func secret(i int) string   { return fmt.Sprintf("s3cret-%05d", i) }

// credentials returns bcrypt hashes for devices 0..n-1, computing the
// missing ones on every core. MinCost (4) keeps 10,000 hashes to seconds;
// edged checks each device's password once per connection and caches the
// result, so the cost changes connect time, not throughput.
func (b *bench) credentials(n int) []string {
	b.credMu.Lock()
	defer b.credMu.Unlock()
	if len(b.hashes) >= n {
		return b.hashes[:n]
	}
	from := len(b.hashes)
	hs := make([]string, n)
	copy(hs, b.hashes)
	var wg sync.WaitGroup
	work := make(chan int)
	for range runtime.NumCPU() {
		wg.Go(func() {
			for i := range work {
				h, err := bcrypt.GenerateFromPassword([]byte(secret(i)), bcrypt.MinCost)
				if err != nil {
					panic(err)
				}
				hs[i] = string(h)
			}
		})
	}
	for i := from; i < n; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	b.hashes = hs
	return hs
}

// subdir makes a fresh directory under the bench's temp dir.
func (b *bench) subdir(name string) string {
	b.credMu.Lock()
	b.seq++
	d := filepath.Join(b.dir, fmt.Sprintf("%02d-%s", b.seq, name))
	b.credMu.Unlock()
	os.MkdirAll(d, 0o755)
	return d
}

func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// edgedOptions configure one edged run.
type edgedOptions struct {
	devices   int
	uplinkURL string // "" for offline only
	// uplinkExtra is added to the uplink's flow mapping, e.g.
	// `profile: aws, cert_file: "..."`.
	uplinkExtra string
	dataDir     string // reused across restarts; default dir/data
	notify      string // NOTIFY_SOCKET
	httpAddr    string // the status page on loopback, for /metrics; "" for none
	// hashes, when set, are the devices' secret hashes instead of the
	// bench's MinCost ones (the storm uses cost 10, as in the field).
	hashes []string
}

// edgedRun is one running edged.
type edgedRun struct {
	*proc
	addr    string
	dir     string
	config  string
	dataDir string
	logPath string
}

// writeEdgedConfig writes an edged config for o into dir.
func (b *bench) writeEdgedConfig(dir, addr string, o edgedOptions) (string, string) {
	hs := o.hashes
	if hs == nil {
		hs = b.credentials(o.devices)
	}
	data := o.dataDir
	if data == "" {
		data = filepath.Join(dir, "data")
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "station: {id: %s}\ndata_dir: %s\nlocal: {listen: \"%s\"}\n", stationID, data, addr)
	if o.uplinkURL != "" {
		extra := ""
		if o.uplinkExtra != "" {
			extra = ", " + o.uplinkExtra
		}
		fmt.Fprintf(&sb, "uplink: {url: \"%s\", reconnect_max: 1s%s}\n", o.uplinkURL, extra)
	}
	fmt.Fprintf(&sb, "clock: {assume_synced: true}\nhttp: {listen: \"%s\"}\nrentals: {start_timeout: 5s}\n", o.httpAddr)
	if o.devices == 0 {
		sb.WriteString("devices: []\n")
	} else {
		sb.WriteString("devices:\n")
	}
	for i := range o.devices {
		fmt.Fprintf(&sb, "  - {id: %s, kind: chair, transport: mqtt, secret_hash: \"%s\"}\n", deviceID(i), hs[i])
	}
	cfg := filepath.Join(dir, "edged.yaml")
	if err := os.WriteFile(cfg, []byte(sb.String()), 0o600); err != nil {
		panic(err)
	}
	return cfg, data
}

// startEdged writes a config and starts edged, waiting until its local
// broker listens.
func (b *bench) startEdged(name string, o edgedOptions) (*edgedRun, error) {
	dir := b.subdir("edged-" + name)
	addr := freeAddr()
	cfg, data := b.writeEdgedConfig(dir, addr, o)
	r := &edgedRun{addr: addr, dir: dir, config: cfg, dataDir: data, logPath: filepath.Join(dir, "edged.log")}
	return r, r.restart(o.notify)
}

// restart starts (again) the edged of r with the same config and data.
func (r *edgedRun) restart(notify string) error {
	var env []string
	if notify != "" {
		env = append(env, "NOTIFY_SOCKET="+notify)
	}
	p, err := start("edged", r.logPath, env, benchBin.edged, "-config", r.config)
	if err != nil {
		return err
	}
	r.proc = p
	if err := waitPort(p, r.addr, 60*time.Second); err != nil {
		out, _ := os.ReadFile(r.logPath)
		p.kill(9)
		return fmt.Errorf("%v\n%s", err, tail(out, 2000))
	}
	return nil
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// benchBin is set once the binary is built.
var benchBin struct{ edged string }

// mosqOptions configure one mosquitto.
type mosqOptions struct {
	addr string
	// extra is appended to the config: bridge sections, persistence...
	extra string
}

type mosqRun struct {
	*proc
	addr, dir, config, logPath string
}

// startMosquitto runs mosquitto on loopback with anonymous access.
func (b *bench) startMosquitto(name string, o mosqOptions) (*mosqRun, error) {
	dir := b.subdir("mosq-" + name)
	if o.addr == "" {
		o.addr = freeAddr()
	}
	host, port, _ := net.SplitHostPort(o.addr)
	conf := fmt.Sprintf(`user root
listener %s %s
allow_anonymous true
max_connections -1
persistence_location %s/
log_dest stderr
log_type error
log_type warning
%s`, port, host, dir, o.extra)
	cfg := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	r := &mosqRun{addr: o.addr, dir: dir, config: cfg, logPath: filepath.Join(dir, "mosquitto.log")}
	return r, r.restart()
}

func (r *mosqRun) restart() error {
	p, err := start("mosquitto", r.logPath, nil, benchBinMosquitto, "-c", r.config)
	if err != nil {
		return err
	}
	r.proc = p
	if err := waitPort(p, r.addr, 60*time.Second); err != nil {
		out, _ := os.ReadFile(r.logPath)
		p.kill(9)
		return fmt.Errorf("%v\n%s", err, tail(out, 2000))
	}
	return nil
}

var benchBinMosquitto = "/usr/sbin/mosquitto"

// buildEdged builds the real binary as packaging does (minus the version).
func buildEdged(dir, goos, goarch, goarm string) (string, error) {
	name := "edged"
	if goarch != "" {
		name += "-" + goarch + goarm
	}
	out := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -buildid=", "-o", out, "./cmd/edged")
	cmd.Dir = moduleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if goarch != "" {
		cmd.Env = append(cmd.Env, "GOOS="+goos, "GOARCH="+goarch)
		if goarm != "" {
			cmd.Env = append(cmd.Env, "GOARM="+goarm)
		}
	}
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s/%s: %v\n%s", goos, goarch, err, msg)
	}
	return out, nil
}
