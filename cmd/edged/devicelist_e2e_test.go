package main

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/devicesim"
)

// The tests in this file change the device list of the real binary while
// devices are connected and rented: by SIGHUP after editing the config
// file (§9), and by signed registries over mosquitto (§3.6).

// entry is one device entry of the test configs.
type entry struct{ id, hash string }

func (e entry) yaml() string {
	return fmt.Sprintf("  - {id: %s, kind: chair, transport: mqtt, secret_hash: %q}\n", e.id, e.hash)
}

func (e entry) json() map[string]any {
	return map[string]any{"id": e.id, "kind": "chair", "transport": "mqtt", "secret_hash": e.hash}
}

// listStation is the real binary with mosquitto as its cloud, whose
// config file the test rewrites.
type listStation struct {
	*binStation
	head   string             // the config up to its devices
	key    ed25519.PrivateKey // signs grants when rentals.verify_key is set
	notify *notifySocket
}

// grant publishes a grant, signed when the station wants signatures.
func (s *listStation) grant(id, device string, seconds int) {
	m := grant(id, device, seconds)
	if s.key != nil {
		m = signedMsg(s.key, "mall-1", m)
	}
	s.rental(m)
}

func startListStation(t *testing.T, extra string, devs []entry) *listStation {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := edgedBinary(t)
	cloud := startMosquitto(t)
	dir := t.TempDir()
	local, httpAddr := freePort(t), freePort(t)
	head := fmt.Sprintf("station: {id: mall-1}\ndata_dir: %s\nlocal: {listen: %q}\n", filepath.Join(dir, "data"), local) +
		fmt.Sprintf("uplink: {url: \"tcp://%s\", reconnect_max: 1s, keepalive: 5s}\n", cloud) +
		fmt.Sprintf("rentals: {start_timeout: 2s%s}\nclock: {assume_synced: true}\nhttp: {listen: %q}\n", extra, httpAddr)
	s := &listStation{head: head, binStation: &binStation{t: t, local: local, api: "http://" + httpAddr,
		timeout: 2 * time.Second, bin: bin, config: filepath.Join(dir, "edged.yaml"), logPath: filepath.Join(dir, "edged.log")}}
	s.write(devs, "")
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(s.logPath)
			if len(out) > 8000 {
				out = out[len(out)-8000:]
			}
			t.Logf("edged log (tail):\n%s", out)
		}
	})
	s.cloud = newCloudClient(t, cloud)
	s.notify = listenNotify(t)
	s.d = startDaemon(t, bin, s.config, local, s.logPath)
	return s
}

// notifySocket records what edged tells systemd (NOTIFY_SOCKET).
type notifySocket struct {
	path string
	mu   sync.Mutex
	msgs []string
}

// listenNotify makes edged's children of this test report to a socket:
// startDaemon passes the environment on.
func listenNotify(t *testing.T) *notifySocket {
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	n := &notifySocket{path: path}
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, string(buf[:k]))
			n.mu.Unlock()
		}
	}()
	t.Setenv("NOTIFY_SOCKET", path)
	return n
}

// said reports whether edged sent a message containing sub.
func (n *notifySocket) said(sub string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, m := range n.msgs {
		if strings.Contains(m, sub) {
			return true
		}
	}
	return false
}

// write writes the config file with devs and more lines after the head.
func (s *listStation) write(devs []entry, more string) {
	s.t.Helper()
	var b strings.Builder
	b.WriteString(s.head + more + "devices:\n")
	for _, e := range devs {
		b.WriteString(e.yaml())
	}
	if len(devs) == 0 {
		b.WriteString("  []\n")
	}
	if err := os.WriteFile(s.config, []byte(b.String()), 0o600); err != nil {
		s.t.Fatal(err)
	}
}

// hup signals a reload and waits until edged applied or refused it (the
// status page's device list says so), as an operator's systemctl reload
// returns once the config is read.
func (s *listStation) hup() {
	s.t.Helper()
	before := s.listMark()
	if err := s.d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		s.t.Fatal(err)
	}
	waitFor(s.t, "the reload applied or refused", func() bool { return s.listMark() != before })
}

// listMark is when the device list was last applied or refused.
func (s *listStation) listMark() string {
	dl, _ := s.status()["device_list"].(map[string]any)
	r, _ := dl["last_refusal"].(map[string]any)
	return fmt.Sprint(dl["applied_at"], r["at"])
}

// status reads /api/v1/status.
func (s *listStation) status() map[string]any {
	s.t.Helper()
	resp, err := http.Get(s.api + "/api/v1/status")
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	var v map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		s.t.Fatal(err)
	}
	return v
}

// connectWithin connects a device, retrying until it is let in.
func (s *listStation) connectWithin(id, secret string) *devicesim.Device {
	s.t.Helper()
	d := &devicesim.Device{ID: id, Secret: secret, Broker: "tcp://" + s.local}
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := d.Connect(2 * time.Second)
		if err == nil {
			s.t.Cleanup(d.Disconnect)
			return d
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s not let in: %v", id, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// refused reports whether the broker refuses id with secret.
func (s *listStation) refused(id, secret string) bool {
	d := &devicesim.Device{ID: id, Secret: secret, Broker: "tcp://" + s.local}
	if err := d.Connect(2 * time.Second); err != nil {
		return true
	}
	d.Disconnect()
	return false
}

func offlines(cc *cloudClient, ids map[string]bool) int {
	n := 0
	for _, d := range cc.eventsOf(edged.EventDeviceOffline) {
		if ids[d["device_id"].(string)] {
			n++
		}
	}
	return n
}

func hashOf(t *testing.T, secret string) string {
	h, err := bcrypt.GenerateFromPassword([]byte(secret), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

// rentedThenRemoved runs the part both tests share: fifty devices stay
// connected, one (chair-rm) is rented for 6 s and then removed, one
// (chair-sec) gets a new secret, one (chair-new) is added. change applies
// the new list. It checks what a user would notice.
func rentedThenRemoved(t *testing.T, s *listStation, base []entry, change func(next []entry)) {
	others := map[string]bool{}
	for _, e := range base {
		if strings.HasPrefix(e.id, "other-") {
			others[e.id] = true
			s.device(e.id, nil)
		}
	}
	rm := s.device("chair-rm", nil)
	s.device("chair-sec", nil)
	s.grant("r1", "chair-rm", 6)
	started := s.cloud.waitData(t, edged.EventRentalStarted, func(d map[string]any) bool { return d["rental_id"] == "r1" })
	_ = started
	startedAt := time.Now()

	newHash := hashOf(t, "secret-2")
	var next []entry
	for _, e := range base {
		switch e.id {
		case "chair-rm":
			continue
		case "chair-sec":
			e.hash = newHash
		}
		next = append(next, e)
	}
	next = append(next, entry{"chair-new", testHash})
	change(next)

	// Added: connects at once (as soon as the change is applied).
	s.connectWithin("chair-new", "secret")
	// Secret changed: dropped, the old secret refused, the new one let in.
	s.cloud.waitData(t, edged.EventDeviceOffline, func(d map[string]any) bool { return d["device_id"] == "chair-sec" })
	if !s.refused("chair-sec", "secret") {
		t.Error("chair-sec's old secret still let in")
	}
	s.connectWithin("chair-sec", "secret-2")
	// Removed with a rental: no new grant; the rental runs to its end.
	s.grant("r2", "chair-rm", 60)
	if r := s.waitResults("r2", "grant", 1); r[0]["reason"] != "unknown_device" {
		t.Errorf("grant on a removed device: %v, want unknown_device", r[0])
	}
	ended := s.cloud.waitData(t, edged.EventRentalEnded, func(d map[string]any) bool { return d["rental_id"] == "r1" })
	if ended["reason"] != "expired" || ended["used_s"].(float64) < 6 {
		t.Errorf("r1 ended %v, want expired after its 6 s", ended)
	}
	if since := time.Since(startedAt); since < 5*time.Second {
		t.Errorf("r1 ended %v after its start, before its 6 s", since)
	}
	waitStops(t, rm, "r1", 1, 15*time.Second)
	// Its stop delivered, the removed device goes: refused from then on.
	waitFor(t, "chair-rm refused after its stop", func() bool { return s.refused("chair-rm", "secret") })
	for _, r := range s.results("r2", "grant") {
		if r["ok"] == true {
			t.Error("a removed device got a new rental")
		}
	}
	// The fifty others never noticed.
	if n := offlines(s.cloud, others); n != 0 {
		t.Errorf("%d device.offline among the %d untouched devices, want 0", n, len(others))
	}
}

func baseList(n int) []entry {
	var base []entry
	for i := range n {
		base = append(base, entry{fmt.Sprintf("other-%02d", i), testHash})
	}
	return append(base, entry{"chair-rm", testHash}, entry{"chair-sec", testHash})
}

// SIGHUP adds, removes and re-keys devices without a restart; a bad
// config is refused whole, with the old one still serving.
func TestReloadOnSIGHUP(t *testing.T) {
	base := baseList(50)
	s := startListStation(t, "", base)
	var next []entry
	rentedThenRemoved(t, s, base, func(n []entry) {
		next = n
		s.write(n, "")
		s.hup()
	})
	st := s.status()
	dl, _ := st["device_list"].(map[string]any)
	if dl["from"] != "config" || dl["last_refusal"] != nil {
		t.Errorf("status device_list %v, want from config, no refusal", dl)
	}
	// A bad config: refused whole, the old list keeps serving.
	bad := append(append([]entry{}, next...), entry{"chair-bad", "not-a-hash"})
	s.write(bad, "")
	s.hup()
	waitFor(t, "the refusal on the status page", func() bool {
		dl, _ := s.status()["device_list"].(map[string]any)
		r, _ := dl["last_refusal"].(map[string]any)
		return r != nil && r["what"] == "reload" && strings.Contains(fmt.Sprint(r["errors"]), "secret_hash")
	})
	waitFor(t, "the refusal in STATUS=", func() bool { return s.notify.said("STATUS=") && s.notify.said("reload refused (invalid)") })
	log, _ := os.ReadFile(s.logPath)
	if !strings.Contains(string(log), "reload refused") || !strings.Contains(string(log), "edged.yaml:") {
		t.Error("the refusal and its line are not in the log")
	}
	s.grant("r3", "chair-new", 30)
	if r := s.waitResults("r3", "grant", 1); r[0]["ok"] != true {
		t.Errorf("grant after a refused reload: %v, want ok", r[0])
	}
	if s.d.cmd.ProcessState != nil {
		t.Fatal("edged exited")
	}
}

// registry signs a registry of devs for station mall-1.
func registry(t *testing.T, key ed25519.PrivateKey, version uint64, devs []entry) map[string]any {
	list := []map[string]any{}
	for _, e := range devs {
		list = append(list, e.json())
	}
	b, _ := json.Marshal(list)
	m := edged.RegistryMessage{Version: version, Devices: string(b)}
	return map[string]any{"version": version, "devices": m.Devices, "sig": edged.SignRegistry(key, "mall-1", m)}
}

func (s *listStation) registryResults(version float64) []map[string]any {
	var out []map[string]any
	for _, e := range s.cloud.bySeq() {
		if e.Type != edged.EventRegistryResult {
			continue
		}
		var d map[string]any
		json.Unmarshal(e.Data, &d)
		if d["version"] == version {
			out = append(out, d)
		}
	}
	return out
}

func (s *listStation) waitRegistry(version float64, n int) []map[string]any {
	s.t.Helper()
	var r []map[string]any
	waitFor(s.t, fmt.Sprintf("%d registry.result of version %v", n, version), func() bool {
		r = s.registryResults(version)
		return len(r) >= n
	})
	return r
}

// The same three changes through a signed registry over mosquitto; the
// refusals each get their registry.result; a redelivery is answered the
// same; the applied registry survives SIGKILL.
func TestRegistryOverMosquitto(t *testing.T) {
	pub, key, _ := ed25519.GenerateKey(nil)
	extra := ", verify_key: \"" + base64.StdEncoding.EncodeToString(pub) + "\""
	base := baseList(20)
	s := startListStation(t, extra, base)
	s.key = key
	s.write(base, "devices_from: cloud\n")
	// Restart on devices_from: cloud (a key needing a restart).
	s.d.kill()
	s.d = startDaemon(t, s.bin, s.config, s.local, s.logPath)
	topic := "stations/mall-1/down/registry"
	var applied map[string]any
	rentedThenRemoved(t, s, base, func(next []entry) {
		applied = registry(t, key, 5, next)
		s.cloud.publish(t, topic, applied)
	})
	r := s.waitRegistry(5, 1)[0]
	if r["ok"] != true || r["added"] != 1.0 || r["removed"] != 1.0 || r["changed"] != 1.0 {
		t.Errorf("registry 5: %v, want ok with 1 added, 1 removed, 1 changed", r)
	}
	// A redelivery: the same result, nothing changes.
	s.cloud.publish(t, topic, applied)
	if again := s.waitRegistry(5, 2)[1]; fmt.Sprint(again) != fmt.Sprint(r) {
		t.Errorf("redelivery answered %v, want %v", again, r)
	}
	// Tampered, unsigned, stale, invalid.
	tampered := registry(t, key, 6, base)
	tampered["devices"] = "[]"
	s.cloud.publish(t, topic, tampered)
	unsigned := registry(t, key, 7, base)
	delete(unsigned, "sig")
	s.cloud.publish(t, topic, unsigned)
	s.cloud.publish(t, topic, registry(t, key, 4, base))
	bad := append(append([]entry{}, base...), entry{"bad id!", testHash})
	s.cloud.publish(t, topic, registry(t, key, 8, bad))
	for _, c := range []struct {
		v      float64
		reason string
	}{{6, "bad_signature"}, {7, "bad_signature"}, {4, "stale"}, {8, "invalid"}} {
		got := s.waitRegistry(c.v, 1)[0]
		if got["ok"] != false || got["reason"] != c.reason {
			t.Errorf("registry %v: %v, want %s", c.v, got, c.reason)
		}
		if c.reason == "invalid" && got["index"] != float64(len(base)) {
			t.Errorf("invalid registry names entry %v, want %d", got["index"], len(base))
		}
	}
	dl, _ := s.status()["device_list"].(map[string]any)
	if dl["from"] != "registry" || dl["version"] != 5.0 {
		t.Errorf("status device_list %v, want registry 5", dl)
	}
	// SIGKILL and restart: version 5 is still the list.
	s.d.kill()
	s.d = startDaemon(t, s.bin, s.config, s.local, s.logPath)
	if !s.refused("chair-rm", "secret") {
		t.Error("after a restart the removed device is let in: the registry was lost")
	}
	s.connectWithin("chair-new", "secret")
	dl, _ = s.status()["device_list"].(map[string]any)
	if dl["from"] != "registry" || dl["version"] != 5.0 {
		t.Errorf("after a restart device_list %v, want registry 5", dl)
	}
	s.cloud.publish(t, topic, registry(t, key, 3, base))
	if got := s.waitRegistry(3, 1)[0]; got["reason"] != "stale" {
		t.Errorf("registry 3 after the restart: %v, want stale", got)
	}
}

// A removed device's rental survives a SIGKILL: after the restart the
// device may come back for it, and it ends on time with its stop.
func TestRemovedDeviceRentalSurvivesRestart(t *testing.T) {
	base := []entry{{"chair-rm", testHash}, {"chair-x", testHash}}
	s := startListStation(t, "", base)
	rm := s.device("chair-rm", nil)
	s.device("chair-x", nil)
	s.grant("r1", "chair-rm", 8)
	s.cloud.waitData(t, edged.EventRentalStarted, func(d map[string]any) bool { return d["rental_id"] == "r1" })
	s.write(base[1:], "")
	s.hup()
	s.grant("r2", "chair-rm", 60)
	if r := s.waitResults("r2", "grant", 1); r[0]["reason"] != "unknown_device" {
		t.Fatalf("grant on a removed device: %v, want unknown_device", r[0])
	}
	s.powerLoss(rm)
	ended := s.cloud.waitData(t, edged.EventRentalEnded, func(d map[string]any) bool { return d["rental_id"] == "r1" })
	if ended["reason"] != "expired" {
		t.Errorf("r1 ended %v across a restart, want expired", ended)
	}
	waitStops(t, rm, "r1", 1, 15*time.Second)
	waitFor(t, "chair-rm refused after its stop", func() bool { return s.refused("chair-rm", "secret") })
}

// sign-registry reads a YAML list and prints a message edged accepts: the
// signature verifies, and the devices string parses and validates.
func TestSignRegistry(t *testing.T) {
	keyFile := filepath.Join(t.TempDir(), "key")
	var pubOut, out, errOut strings.Builder
	if err := run(t.Context(), []string{"keygen", "-out", keyFile}, nil, &pubOut, &errOut); err != nil {
		t.Fatal(err)
	}
	pub, err := edged.ParseVerifyKey(strings.TrimSpace(pubOut.String()))
	if err != nil {
		t.Fatal(err)
	}
	list := "- {id: chair-001, kind: chair, transport: mqtt, secret_hashes: [\"" + testHash + "\"]}\n"
	if err := run(t.Context(), []string{"sign-registry", "-key", keyFile, "-station", "mall-1", "-version", "3"},
		strings.NewReader(list), &out, &errOut); err != nil {
		t.Fatal(err)
	}
	m, err := edged.ParseRegistryMessage([]byte(out.String()))
	if err != nil {
		t.Fatal(err)
	}
	if m.Version != 3 || edged.VerifyRegistry(pub, "mall-1", m) != nil {
		t.Fatalf("message %+v does not verify for mall-1 version 3", m)
	}
	cfg := edged.DefaultConfig()
	devs, _, why := parseRegistryDevices(cfg, m.Devices)
	if why != "" || len(devs) != 1 || devs[0].ID != "chair-001" || len(devs[0].Hashes()) != 1 {
		t.Fatalf("devices %q: %v %s", m.Devices, devs, why)
	}
	if err := run(t.Context(), []string{"sign-registry", "-key", keyFile, "-station", "mall-1", "-version", "4"},
		strings.NewReader("- {id: x, colour: red}\n"), &out, &errOut); err == nil {
		t.Error("an unknown key was signed")
	}
}
