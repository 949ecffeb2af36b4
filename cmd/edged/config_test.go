package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

// A bcrypt hash of "secret" at cost 4, for configs in tests.
const testHash = "$2a$04$83maV7dITTtnC4sUur0I7evHBAR207siP09DESia7L6MraTjQ9gX2"

func TestDefaultsAreValid(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	cfg, err := loadConfig("")
	if _, statErr := os.Stat(defaultConfigPath); statErr == nil {
		t.Skip("this machine has " + defaultConfigPath)
	}
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Station.ID != "dev" || cfg.DataDir != "./edged-data" || cfg.Uplink.URL != "" || len(cfg.Devices) != 0 {
		t.Fatalf("defaults = %+v", cfg)
	}
}

// The contract's own example (§8), with real hashes, must load.
const contractExample = `
station:
  id: mall-7
  name: "Mall level 2"
  location: {lat: 48.1, lon: 11.5}
data_dir: ./edged-data
local:
  listen: ":1883"
  tls_listen: ""
  ws_listen: ""
  max_packet_kb: 4096
uplink:
  url: ""
  client_id: ""
  username: ""
  password: ""
  ca_file: ""
  cert_file: ""
  key_file: ""
  topic_root: stations
  renter_topic: "renters/{renter_id}/devices/{device_id}"
  outbox_max_mb: 64
rentals:
  verify_key: ""
  start_timeout: 5s
clock:
  assume_synced: false
http:
  listen: "127.0.0.1:8080"
  users:
    - {name: tech, password_hash: "` + testHash + `"}
serial:
  buses:
    - {name: bus0, port: /dev/ttyUSB0, baud: 9600, data_bits: 8, parity: none,
       stop_bits: 1, timeout: 300ms, poll_interval: 1s}
profiles:
  charger-v1:
    status:    {table: holding, address: 0, values: {0: idle, 1: in_use, 2: fault}}
    telemetry: [{name: power_w, table: input, address: 2}, {name: temp_c, table: input, address: 3, scale: 0.1}]
    commands:
      start: {table: holding, address: 16, value: "{duration_s}"}
      stop:  {table: holding, address: 17, value: 1}
devices:
  - {id: chair-001, kind: chair, transport: mqtt, secret_hash: "` + testHash + `",
     location: {lat: 0, lon: 0}}
  - {id: charger-07, kind: charger, transport: serial, bus: bus0, unit: 7,
     profile: charger-v1}
`

func TestContractExampleLoads(t *testing.T) {
	cfg, err := parseConfig("edged.yaml", []byte(contractExample))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Serial.Buses[0].Timeout != 300*time.Millisecond || cfg.Rentals.StartTimeout != 5*time.Second {
		t.Fatalf("durations = %v, %v", cfg.Serial.Buses[0].Timeout, cfg.Rentals.StartTimeout)
	}
	if got := cfg.Profiles["charger-v1"].Status.Values[1]; got != edged.StatusInUse {
		t.Fatalf("status value 1 = %q", got)
	}
	if cfg.Devices[1].Unit != 7 || cfg.Devices[0].Location == nil {
		t.Fatalf("devices = %+v", cfg.Devices)
	}
	// Keys left out keep their defaults.
	cfg, err = parseConfig("edged.yaml", []byte("station: {id: s1}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Local.Listen != ":1883" || cfg.Uplink.OutboxMaxMB != 64 || cfg.Rentals.StartTimeout != 5*time.Second {
		t.Fatalf("defaults lost: %+v", cfg)
	}
}

func TestConfigErrorsNameKeyAndLine(t *testing.T) {
	cases := []struct {
		name, yaml string
		want       []string
	}{
		{"unknown key", "station:\n  id: s1\n  colour: red\n", []string{"edged.yaml:3:", "colour"}},
		{"unknown top key", "station: {id: s1}\nuplnk: {}\n", []string{"edged.yaml:2:", "uplnk"}},
		{"wrong type", "station: {id: s1}\nlocal:\n  max_packet_kb: lots\n", []string{"edged.yaml:3:", "local.max_packet_kb"}},
		{"bad duration", "rentals:\n  start_timeout: soon\n", []string{"edged.yaml:2:", "rentals.start_timeout"}},
		{"bad station id", "station:\n  id: Mall_7\n", []string{"edged.yaml:2:", "station.id"}},
		{"bad device", "devices:\n  - {id: chair-1, kind: chair, transport: mqtt, secret_hash: nope}\n",
			[]string{"edged.yaml:2:", "devices[0].secret_hash", "bcrypt"}},
		{"device id with slash", "devices:\n  - id: a/b\n    kind: chair\n    transport: mqtt\n    secret_hash: \"" + testHash + "\"\n",
			[]string{"edged.yaml:2:", "devices[0].id"}},
		{"duplicate device", "devices:\n  - {id: c, kind: k, transport: mqtt, secret_hash: \"" + testHash + "\"}\n  - {id: c, kind: k, transport: mqtt, secret_hash: \"" + testHash + "\"}\n",
			[]string{"edged.yaml:3:", "appears twice"}},
		{"serial device without bus", "profiles: {p: {}}\ndevices:\n  - {id: c, kind: k, transport: serial, bus: nobus, unit: 3, profile: p}\n",
			[]string{"edged.yaml:3:", "devices[0].bus"}},
		{"open http without users", "http:\n  listen: \"0.0.0.0:8080\"\n", []string{"edged.yaml:2:", "http.listen", "loopback"}},
		{"bad verify key", "rentals:\n  verify_key: abc\n", []string{"edged.yaml:2:", "rentals.verify_key"}},
		{"syntax", "station: [\n", []string{"edged.yaml:"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseConfig("edged.yaml", []byte(tc.yaml))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestCheckConfigCommand(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte(contractExample), 0o600)
	os.WriteFile(bad, []byte("station:\n  id: s1\n  nmae: x\n"), 0o600)
	var out, errOut strings.Builder
	if err := run(ctx, []string{"check-config", "-config", good}, nil, &out, &errOut); err != nil {
		t.Fatalf("good config: %v", err)
	}
	err := run(ctx, []string{"check-config", "-config", bad}, nil, &out, &errOut)
	if err == nil || !strings.Contains(err.Error(), "bad.yaml:3:") {
		t.Fatalf("bad config: %v", err)
	}
}
