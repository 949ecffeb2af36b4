package main

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/internal/devicesim"
	"github.com/stationedge/edged/internal/faultproxy"
)

// relayDaemon starts the real binary for station mall-1 with a verify key,
// the given devices (secret "secret") and, when cloud is not empty, an
// uplink to it. It returns the local broker's address.
func relayDaemon(t *testing.T, pub ed25519.PublicKey, cloud string, devices ...string) string {
	t.Helper()
	bin := edgedBinary(t)
	dir := t.TempDir()
	localAddr := freePort(t)
	var devs strings.Builder
	for _, id := range devices {
		fmt.Fprintf(&devs, "  - {id: %s, kind: chair, transport: mqtt, secret_hash: %q}\n", id, testHash)
	}
	uplink := ""
	if cloud != "" {
		uplink = fmt.Sprintf("uplink: {url: \"tcp://%s\", reconnect_max: 1s, keepalive: 2s}\n", cloud)
	}
	config := filepath.Join(dir, "edged.yaml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf(`station: {id: mall-1}
data_dir: %s
local: {listen: "%s"}
%srentals: {verify_key: "%s", start_timeout: 2s}
clock: {assume_synced: true}
http: {listen: ""}
devices:
%s`, filepath.Join(dir, "data"), localAddr, uplink, base64.StdEncoding.EncodeToString(pub), devs.String())), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "edged.log")
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("edged log:\n%s", out)
		}
	})
	startDaemon(t, bin, config, localAddr, logPath)
	return localAddr
}

// rentalResults returns the rental_result answers a device received.
func rentalResults(d *devicesim.Device) []edged.RentalResultArgs {
	var out []edged.RentalResultArgs
	for _, c := range d.Commands() {
		if c.Action != edged.ActionRentalResult {
			continue
		}
		var a edged.RentalResultArgs
		if json.Unmarshal(c.Args, &a) == nil {
			out = append(out, a)
		}
	}
	return out
}

func actions(d *devicesim.Device, action string) []devicesim.Command {
	var out []devicesim.Command
	for _, c := range d.Commands() {
		if c.Action == action {
			out = append(out, c)
		}
	}
	return out
}

// TestRelayedRentalWhileOffline is the offline rental of docs/relay.md
// against the real binary: with the uplink cut, a grant relayed by the
// device starts it and is answered ok; the rental ends on time; when the
// link returns the cloud gets its events in seq order; the cloud's own copy
// of the grant then changes nothing and gets the same result. Refusals and
// a flood are answered (or dropped) with the device's connection kept.
func TestRelayedRentalWhileOffline(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	cloud := startMosquitto(t)
	proxy, err := faultproxy.New(cloud)
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	pub, priv, _ := ed25519.GenerateKey(nil)
	cc := newCloudClient(t, cloud)
	local := relayDaemon(t, pub, proxy.Addr(), "chair-1", "chair-2")
	chair := &devicesim.Device{ID: "chair-1", Secret: "secret", Broker: "tcp://" + local}
	if err := chair.Connect(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	defer chair.Disconnect()
	cc.waitData(t, edged.EventDeviceOnline, func(d map[string]any) bool { return d["device_id"] == "chair-1" })

	proxy.Cut()
	const granted = 3 // seconds
	g := signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-1", "device_id": "chair-1", "renter_id": "alice", "duration_s": granted})
	payload, _ := json.Marshal(g)
	if err := chair.Relay(payload); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the answer to the relay", func() bool { return len(rentalResults(chair)) == 1 })
	if a := rentalResults(chair)[0]; !a.OK || a.RentalID != "r-1" || a.Op != "grant" || a.DeviceID != "chair-1" || a.Reason != "" {
		t.Fatalf("rental_result = %+v, want grant r-1 ok on chair-1", a)
	}
	starts := actions(chair, "start")
	if len(starts) != 1 || starts[0].DurationS != granted || starts[0].RenterID != "alice" {
		t.Fatalf("starts = %+v, want one for %d s", starts, granted)
	}

	waitFor(t, "the stop at the end", func() bool { return len(actions(chair, "stop")) > 0 })
	ran := actions(chair, "stop")[0].At.Sub(starts[0].At)
	if ran < granted*time.Second || ran > (granted+5)*time.Second { // §4: never more than 5 s past
		t.Fatalf("chair-1 ran %v between start and stop, want %d s (at most 5 s more)", ran, granted)
	}
	if n := len(cc.eventsOf(edged.EventRentalResult)); n != 0 {
		t.Fatalf("%d rental.result reached the cloud through a cut link", n)
	}

	// Refusals while still offline, each answered, the connection kept.
	tampered := signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-2", "device_id": "chair-1", "renter_id": "bob", "duration_s": 60})
	tampered["duration_s"] = 6000
	refusals := []struct {
		msg    map[string]any
		reason edged.Reason
	}{
		{signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-3", "device_id": "chair-2", "renter_id": "bob", "duration_s": 60}), edged.ReasonInvalid},
		{signedMsg(priv, "mall-2", map[string]any{"op": "grant", "rental_id": "r-4", "device_id": "chair-1", "renter_id": "bob", "duration_s": 60}), edged.ReasonBadSignature},
		{tampered, edged.ReasonBadSignature},
		{signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-5", "device_id": "chair-1", "renter_id": "bob", "duration_s": 60,
			"not_after": time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)}), edged.ReasonExpired},
	}
	for i, r := range refusals { // with the grant: the 5 of this minute
		b, _ := json.Marshal(r.msg)
		if err := chair.Relay(b); err != nil {
			t.Fatalf("relay %d: %v", i, err)
		}
		waitFor(t, "the refusal's answer", func() bool { return len(rentalResults(chair)) == i+2 })
		if a := rentalResults(chair)[i+1]; a.OK || a.Reason != r.reason || a.RentalID != r.msg["rental_id"] {
			t.Errorf("refusal %d: rental_result = %+v, want %s", i, a, r.reason)
		}
	}
	// The sixth relay of the minute (a replay of the ended rental) is
	// dropped: no answer, and the device stays connected.
	if err := chair.Relay(payload); err != nil {
		t.Fatalf("relay over the limit: %v", err)
	}
	if err := chair.Publish("telemetry", map[string]any{"probe": 1}); err != nil {
		t.Fatalf("the device lost its connection: %v", err)
	}
	if n := len(rentalResults(chair)); n != 1+len(refusals) {
		t.Fatalf("%d answers, want none for the relay over the limit", n)
	}

	proxy.Restore()
	ended := cc.waitData(t, edged.EventRentalEnded, func(d map[string]any) bool { return d["rental_id"] == "r-1" })
	if ended["reason"] != "expired" {
		t.Fatalf("rental.ended = %v", ended)
	}
	var order []string
	var last uint64
	cc.mu.Lock()
	for _, e := range cc.events {
		var d map[string]any
		json.Unmarshal(e.Data, &d)
		if d["rental_id"] != "r-1" {
			continue
		}
		if e.Seq <= last {
			t.Errorf("seq %d after %d", e.Seq, last)
		}
		last = e.Seq
		order = append(order, fmt.Sprintf("%s ok=%v via=%v", e.Type, d["ok"], d["via"]))
	}
	cc.mu.Unlock()
	want := "rental.result ok=true via=device|rental.started ok=<nil> via=<nil>|rental.ended ok=<nil> via=<nil>"
	if got := strings.Join(order, "|"); got != want {
		t.Fatalf("the cloud got for r-1:\n%s\nwant\n%s", got, want)
	}

	// The cloud's own copy, delivered late: the same result, no restart.
	cc.publish(t, "stations/mall-1/down/rentals", g)
	waitFor(t, "the redelivery's result", func() bool {
		n := 0
		for _, d := range cc.eventsOf(edged.EventRentalResult) {
			if d["rental_id"] == "r-1" {
				n++
			}
		}
		return n == 2
	})
	var again map[string]any
	for _, d := range cc.eventsOf(edged.EventRentalResult) {
		if d["rental_id"] == "r-1" {
			again = d
		}
	}
	if again["ok"] != true || again["reason"] != nil {
		t.Fatalf("the cloud's copy got %v, want the same ok", again)
	}
	if n := len(actions(chair, "start")); n != 1 {
		t.Fatalf("the device got %d starts, want 1", n)
	}
	if n := len(cc.eventsOf(edged.EventRentalStarted)); n != 1 {
		t.Fatalf("%d rental.started, want 1", n)
	}
}

// relayPython finds a python3 with paho-mqtt for examples/relay.py.
func relayPython(t *testing.T) string {
	t.Helper()
	var tried []string
	for _, p := range []string{"python3", "/usr/bin/python3"} {
		path, err := exec.LookPath(p)
		if err != nil {
			continue
		}
		if exec.Command(path, "-c", "import paho.mqtt.client").Run() == nil {
			return path
		}
		tried = append(tried, path)
	}
	if os.Getenv("CI") != "" {
		// scripts/test.sh installs it: in CI a missing one is a failure.
		t.Fatalf("examples/relay.py needs python3 with paho-mqtt (apt-get install python3-paho-mqtt); tried %v", tried)
	}
	t.Skipf("examples/relay.py needs python3 with paho-mqtt (apt-get install python3-paho-mqtt); tried %v", tried)
	return ""
}

// runRelayScript relays msg with examples/relay.py as device dev and
// returns its output and exit status.
func runRelayScript(t *testing.T, py, local, dev string, msg map[string]any) (string, int) {
	t.Helper()
	host, port, _ := strings.Cut(local, ":")
	b, _ := json.Marshal(msg)
	cmd := exec.Command(py, "../../examples/relay.py", "--host", host, "--port", port, "--device", dev, "--secret", "secret", "--timeout", "20")
	cmd.Stdin = bytes.NewReader(b)
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1") // no __pycache__ in the source tree
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run relay.py: %v", err)
	}
	t.Logf("relay.py %s: exit %d: %s%s", msg["rental_id"], code, out.String(), errOut.String())
	return out.String(), code
}

// TestRelayExampleScript runs the reference relay for device makers,
// examples/relay.py, against the real binary's broker.
func TestRelayExampleScript(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	py := relayPython(t)
	pub, priv, _ := ed25519.GenerateKey(nil)
	local := relayDaemon(t, pub, "", "chair-1", "chair-2")

	out, code := runRelayScript(t, py, local, "chair-1",
		signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-1", "device_id": "chair-1", "renter_id": "alice", "duration_s": 60}))
	if code != 0 || !strings.Contains(out, "OK: rental r-1 started on chair-1.") {
		t.Errorf("good grant: exit %d, %q", code, out)
	}
	out, code = runRelayScript(t, py, local, "chair-2",
		signedMsg(priv, "mall-2", map[string]any{"op": "grant", "rental_id": "r-2", "device_id": "chair-2", "renter_id": "bob", "duration_s": 60}))
	if code != 1 || !strings.Contains(out, "Refused:") || !strings.Contains(out, "(bad_signature)") {
		t.Errorf("grant for another station: exit %d, %q", code, out)
	}
	// A replay of r-1 is answered with its result again.
	out, code = runRelayScript(t, py, local, "chair-1",
		signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-1", "device_id": "chair-1", "renter_id": "alice", "duration_s": 60}))
	if code != 0 || !strings.Contains(out, "OK: rental r-1") {
		t.Errorf("replay: exit %d, %q", code, out)
	}
	// A device the station does not know gets no answer.
	out, code = runRelayScript(t, py, local, "chair-9",
		signedMsg(priv, "mall-1", map[string]any{"op": "grant", "rental_id": "r-9", "device_id": "chair-9", "renter_id": "eve", "duration_s": 60}))
	if code != 2 || !strings.Contains(out, "No answer") {
		t.Errorf("unknown device: exit %d, %q", code, out)
	}
}
