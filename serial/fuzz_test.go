package serial

import (
	"encoding/json"
	"math"
	"testing"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/modbus"
)

// FuzzCommandValue: a renter's args (cloud input) become a register write
// only when they hold a whole number that fits the register; nothing wraps
// around silently into another value.
func FuzzCommandValue(f *testing.F) {
	for _, s := range []string{`{"level":3}`, `{"level":-1}`, `{"level":65535}`, `{"level":65536}`,
		`{"level":1e3}`, `{"level":1.5}`, `{"level":"3"}`, `{"level":null}`, `[]`, `{"level":1e400}`, `{"level":-32769}`} {
		f.Add([]byte(s), false, int64(60))
		f.Add([]byte(s), true, int64(-1))
	}
	f.Fuzz(func(t *testing.T, args []byte, bit bool, dur int64) {
		for _, tpl := range []string{"{args.level}", "{duration_s}", "7"} {
			v, err := parseValue(tpl, bit)
			if err != nil {
				continue
			}
			w, err := v.eval(edged.DeviceCommand{Action: "x", DurationS: dur, Args: json.RawMessage(args)})
			if err != nil {
				continue
			}
			switch {
			case v.arg != "":
				n, err := argNumber(args, "level")
				if err != nil {
					t.Fatalf("eval accepted args %q that argNumber refuses: %v", args, err)
				}
				if bit && !(n == 0 && w == 0 || n == 1 && w == 0xFF00) {
					t.Fatalf("coil got %#x from %d", w, n)
				}
				if !bit && (n < -32768 || n > 65535 || uint16(n) != w) {
					t.Fatalf("register got %#x from %d", w, n)
				}
			case v.duration:
				if dur < 0 || int64(w) != min(dur, 65535) {
					t.Fatalf("duration %d written as %d", dur, w)
				}
			}
		}
	})
}

// FuzzPlanState: whatever registers a device returns, the state is a
// contract status and the telemetry is finite.
func FuzzPlanState(f *testing.F) {
	f.Add(uint16(0), uint16(120), uint16(235))
	f.Add(uint16(7), uint16(0xFFFF), uint16(0x8000))
	p := edged.Profile{
		Status: &edged.StatusRegister{Table: "holding", Address: 0,
			Values: map[int]edged.Status{0: edged.StatusIdle, 1: edged.StatusInUse, -1: edged.StatusFault}},
		Telemetry: []edged.TelemetryRegister{{Name: "power_w", Table: "input", Address: 2},
			{Name: "temp_c", Table: "input", Address: 3, Scale: 0.1, Signed: true}},
		Commands: map[string]edged.CommandRegister{"stop": {Table: "holding", Address: 17, Value: "1"}},
	}
	pl, err := compile(p)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, status, power, temp uint16) {
		resps := make([]modbus.Response, len(pl.reads))
		for i, r := range pl.reads {
			resps[i].Registers = make([]uint16, r.Quantity)
		}
		set := func(pt point, v uint16) { resps[pt.read].Registers[pt.index] = v }
		set(pl.status, status)
		set(pl.telemetry[0].point, power)
		set(pl.telemetry[1].point, temp)
		st, fault, tel := pl.state(resps)
		switch st {
		case edged.StatusIdle, edged.StatusInUse:
		case edged.StatusFault:
			if fault == "" && status != 0xFFFF {
				t.Fatalf("status %d: fault without a code", status)
			}
		default:
			t.Fatalf("status %d mapped to %q", status, st)
		}
		for k, v := range tel {
			if f, ok := v.(float64); !ok || math.IsNaN(f) || math.IsInf(f, 0) {
				t.Fatalf("telemetry %s = %v", k, v)
			}
		}
	})
}
