package main

import (
	"testing"

	"github.com/stationedge/edged/serial"
)

// FuzzParseConfig: an operator's config file, whatever it holds, never
// panics the loader; what it accepts passes the contract's validation.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(contractExample))
	for _, s := range []string{
		"", "station: {id: mall-1}\n", "station: {id: Mall}\n", "data_dir: [1]\n", "nope: 1\n",
		"local: {max_packet_kb: -1}\n", "rentals: {start_timeout: 5x}\n", "devices:\n  - {id: a, transport: mqtt}\n",
		"devices:\n  - {id: c, kind: charger, transport: serial, bus: b, unit: 300, profile: p}\n",
		"profiles:\n  p:\n    status: {table: holding, address: 0, values: {0: idle}}\n    commands:\n      start: {table: coil, address: 1, value: \"{duration_s}\"}\n",
		"a: &a [*a, *a]\n", "station: !!binary AAAA\n", "---\n---\n", "\t", "uplink: {url: \"tcp://%zz\"}\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := parseConfig("fuzz.yaml", data)
		if err != nil {
			if err.Error() == "" {
				t.Fatalf("%q: empty error", data)
			}
			return
		}
		if err := cfg.Validate(serial.CheckProfile); err != nil {
			t.Fatalf("parseConfig accepted %q, Validate refuses: %v", data, err)
		}
	})
}
