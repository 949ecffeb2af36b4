package local

import (
	"encoding/json"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

func telemetryJSON(prefix string, n int, v any) []byte {
	m := map[string]any{}
	for i := 0; i < n; i++ {
		m[fmt.Sprintf("%s%d", prefix, i)] = v
	}
	b, _ := json.Marshal(m)
	return b
}

// countLines counts the log lines that contain every one of parts.
func countLines(logs string, parts ...string) int {
	n := 0
	for _, l := range strings.Split(logs, "\n") {
		all := l != ""
		for _, p := range parts {
			all = all && strings.Contains(l, p)
		}
		if all {
			n++
		}
	}
	return n
}

// TestStateBoundsDropWhole: reports over the state bounds (§2), whether the
// payload breaks them or the merge into the device's telemetry would, are
// dropped whole and counted as bad input, logged once per device per
// minute; the device stays connected and another device is unaffected.
func TestStateBoundsDropWhole(t *testing.T) {
	for _, proto := range []string{"v3", "v5"} {
		t.Run(proto, func(t *testing.T) {
			e := start(t, nil)
			var a interface {
				alive(testing.TB, *env, string)
			}
			var pub func(topic string, payload []byte, ok bool)
			switch proto {
			case "v3":
				c := connectV3(t, e.addr, "dev-a", secretA, autoReconnect)
				a = c
				pub = func(topic string, payload []byte, _ bool) {
					if err := c.publish(t, topic, 1, payload); err != nil {
						t.Errorf("publish on %s: %v", topic, err)
					}
				}
			case "v5":
				c := connectV5(t, e.addr, "dev-a", secretA)
				a = c
				pub = func(topic string, payload []byte, ok bool) {
					want := byte(0x99)
					if ok {
						want = 0
					}
					if rc := c.publish(t, topic, 1, payload); rc != want {
						t.Errorf("publish on %s: reason %#x, want %#x", topic, rc, want)
					}
				}
			}
			b := connectV3(t, e.addr, "dev-b", secretB)

			pub("devices/dev-a/telemetry", telemetryJSON("a", 60, 1), true)
			refused := []struct{ topic, payload string }{
				{"telemetry", string(telemetryJSON("b", 5, 2))},                       // 65 fields once merged
				{"state", `{"status":"in_use","b0":1,"b1":1,"b2":1,"b3":1,"b4":1}`},   // 65 once merged
				{"telemetry", `{"s":"` + strings.Repeat("x", 60000) + `"}`},           // a string over 256 bytes
				{"state", `{"status":"idle","s":"` + strings.Repeat("x", 257) + `"}`}, // the same in a state
				{"telemetry", string(telemetryJSON("c", 65, 1))},                      // 65 fields in one
				{"telemetry", `{"` + strings.Repeat("k", 65) + `":1}`},                // a name over 64
				{"state", `{"status":"idle","` + strings.Repeat("<", 64) + `":1}`},    // a name escaped over 64
				{"telemetry", `{"s":"` + strings.Repeat("<", 50) + `"}`},              // a string escaped over 256
			}
			before := e.b.Stats().BadInput
			for _, r := range refused {
				pub("devices/dev-a/"+r.topic, []byte(r.payload), false)
			}
			if got, want := e.b.Stats().BadInput-before, uint64(len(refused)); got != want {
				t.Errorf("BadInput rose by %d, want %d", got, want)
			}
			if got := len(e.rep.Calls("telemetry")) + len(e.rep.Calls("state")); got != 1 {
				t.Errorf("%d reports reached the station, want only the first", got)
			}
			a.alive(t, e, "dev-a") // one more field: 61

			// Another device fills its own 64 fields, untouched by dev-a.
			if err := b.publish(t, "devices/dev-b/telemetry", 1, telemetryJSON("z", 64, true)); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "dev-b's telemetry", func() bool {
				for _, c := range e.rep.Calls("telemetry") {
					if c.Device == "dev-b" {
						return true
					}
				}
				return false
			})
			// dev-b's own bad input is logged too: the limit is per device.
			if err := b.publish(t, "devices/dev-b/telemetry", 1, []byte(`{"extra":1}`)); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "dev-b's bad input counted", func() bool { return e.b.Stats().BadInput-before == uint64(len(refused))+1 })

			logs := e.logs.String()
			if got := countLines(logs, "level=WARN", "device=dev-a", "device message"); got != 1 {
				t.Errorf("%d warnings for dev-a's %d bad reports within a minute, want 1:\n%s", got, len(refused), logs)
			}
			if got := countLines(logs, "level=WARN", "device=dev-b", "device message"); got != 1 {
				t.Errorf("%d warnings for dev-b's bad report, want 1:\n%s", got, logs)
			}
		})
	}
}

// TestInputLogCarriesCount: once a device's minute is over, its next bad
// report is logged with how many went unlogged.
func TestInputLogCarriesCount(t *testing.T) {
	e := start(t, nil)
	e.b.inputLog.setLimits(time.Hour, 1)
	c := connectV3(t, e.addr, "dev-a", secretA)
	for i := 0; i < 5; i++ {
		if err := c.publish(t, "devices/dev-a/telemetry", 1, []byte(`[]`)); err != nil {
			t.Fatal(err)
		}
	}
	e.b.inputLog.setLimits(0, 1) // the window is over
	if err := c.publish(t, "devices/dev-a/telemetry", 1, []byte(`[]`)); err != nil {
		t.Fatal(err)
	}
	logs := e.logs.String()
	if got := countLines(logs, "level=WARN", "bad device message", "device=dev-a"); got != 2 {
		t.Errorf("%d warnings, want 2:\n%s", got, logs)
	}
	if got := countLines(logs, "level=WARN", "bad device message", "not_logged=4"); got != 1 {
		t.Errorf("the second warning does not count the 4 unlogged:\n%s", logs)
	}
}

// refusedConnect sends a CONNECT over a bare socket and expects CONNACK
// "not authorized".
func refusedConnect(t testing.TB, addr, user, clientID, password string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, testWaitPeriod)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ack, err := rawExchange(conn, rawConnectPacket(clientID, user, password, 30), 4, testWaitPeriod)
	if err != nil {
		t.Fatal(err)
	}
	if ack[0] != 0x20 || ack[3] != 5 {
		t.Fatalf("connack %x, want not authorized", ack)
	}
}

// TestLoginFailuresLogged: a refused login is logged with the device id it
// claimed and the remote address, never the password; a flood of 1,000 is
// logged in a bounded number of lines, with a count of the rest.
func TestLoginFailuresLogged(t *testing.T) {
	e := start(t, nil)
	e.b.authLog.setLimits(time.Hour, authLogBurst) // the whole flood in one window
	const pass = "pw-NEVER-LOGGED-7731"

	refusedConnect(t, e.addr, "ghost-17", "ghost-17", pass)
	logs := e.logs.String()
	if countLines(logs, "device refused", "device=ghost-17", "remote=127.0.0.1:", "unknown device") != 1 {
		t.Fatalf("unknown device's login not logged with its id and remote address:\n%s", logs)
	}

	cases := []struct{ user, id, pass string }{
		{"dev-a", "dev-a", pass},     // wrong secret
		{"dev-a", "dev-b", secretA},  // client id differs
		{"nobody", "nobody", pass},   // unknown device
		{"bad\nname\x00", "x", pass}, // a name made to forge a log line
		{strings.Repeat("n", 5000), "y", pass},
	}
	const flood = 1000
	for i := 1; i < flood; i++ {
		c := cases[i%len(cases)]
		refusedConnect(t, e.addr, c.user, c.id, c.pass)
	}
	if got := e.b.Stats().AuthFailures; got != flood {
		t.Errorf("AuthFailures = %d, want %d", got, flood)
	}
	_ = e.b.Close()

	logs = e.logs.String()
	// Configured devices and made-up ids have a limit each.
	lines := countLines(logs, "level=WARN", "device refused")
	if lines > 2*authLogBurst {
		t.Errorf("%d lines for %d refused logins, want at most %d", lines, flood, 2*authLogBurst)
	}
	m := regexp.MustCompile(`msg="device refusals not logged" count=(\d+)`).FindAllStringSubmatch(logs, -1)
	if len(m) != 2 {
		t.Fatalf("want two lines counting the unlogged refusals, got %d:\n%s", len(m), logs)
	}
	counted := 0
	for _, c := range m {
		n, _ := strconv.Atoi(c[1])
		counted += n
	}
	if counted+lines != flood {
		t.Errorf("%d logged + %d counted, want %d", lines, counted, flood)
	}
	for _, secret := range []string{pass, secretA} {
		if strings.Contains(logs, secret) {
			t.Errorf("log shows a password %q", secret)
		}
	}
	if strings.Contains(logs, strings.Repeat("n", 100)) {
		t.Error("a 5,000-byte username reached the log unbounded")
	}
	for _, l := range strings.Split(logs, "\n") {
		if strings.HasPrefix(l, "name") {
			t.Errorf("a username forged a log line: %q", l)
		}
	}
}

// TestAuthLogSummaryAtWindowEnd: the count of unlogged refusals is logged
// when the window ends, without waiting for another refusal or Close.
func TestAuthLogSummaryAtWindowEnd(t *testing.T) {
	e := start(t, nil)
	e.b.authLog.setLimits(200*time.Millisecond, 1)
	held := 0
	for i := 0; i < 1000 && held == 0; i++ { // the second, unless the machine stalls a whole window
		if ok, _ := e.b.authLog.allow("unknown"); !ok {
			held++
		}
	}
	if held == 0 {
		t.Fatal("nothing held back")
	}
	waitFor(t, "the summary line", func() bool {
		return strings.Contains(e.logs.String(), `msg="device refusals not logged" count=1 `)
	})
}

// TestFloodOfMadeUpIDsDoesNotHideADevice: while made-up ids flood the
// broker, a configured device's refused login is still logged.
func TestFloodOfMadeUpIDsDoesNotHideADevice(t *testing.T) {
	e := start(t, nil)
	e.b.authLog.setLimits(time.Hour, authLogBurst)
	for i := 0; i < 3*authLogBurst; i++ {
		refusedConnect(t, e.addr, fmt.Sprint("ghost-", i), fmt.Sprint("ghost-", i), "x")
	}
	refusedConnect(t, e.addr, "dev-b", "dev-b", "wrong-secret-x")
	if countLines(e.logs.String(), "level=WARN", "device refused", "device=dev-b", "wrong secret") != 1 {
		t.Errorf("dev-b's refused login hidden by the flood:\n%s", e.logs.String())
	}
}
