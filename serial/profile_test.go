package serial

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/modbus"
)

func TestCheckProfile(t *testing.T) {
	good := func() edged.Profile {
		return edged.Profile{
			Status: &edged.StatusRegister{Table: "holding", Address: 0,
				Values: map[int]edged.Status{0: edged.StatusIdle, 1: edged.StatusInUse, 2: edged.StatusFault}},
			Telemetry: []edged.TelemetryRegister{{Name: "power_w", Table: "input", Address: 2},
				{Name: "temp_c", Table: "input", Address: 3, Scale: 0.1}},
			Commands: map[string]edged.CommandRegister{
				"start": {Table: "holding", Address: 16, Value: "{duration_s}"},
				"stop":  {Table: "holding", Address: 17, Value: "1"},
				"lock":  {Table: "coil", Address: 4, Value: "{args.on}"},
			},
		}
	}
	tests := []struct {
		name   string
		change func(p *edged.Profile)
		want   []edged.FieldError
	}{
		{"contract example", func(p *edged.Profile) {}, nil},
		{"no status", func(p *edged.Profile) { p.Status = nil },
			[]edged.FieldError{{Path: "status", Message: "is required: edged learns idle, in_use and fault from it"}}},
		{"status table", func(p *edged.Profile) { p.Status.Table = "holdings" },
			[]edged.FieldError{{Path: "status.table", Message: "must be coil, discrete, holding or input"}}},
		{"status value", func(p *edged.Profile) { p.Status.Values[3] = "charging" },
			[]edged.FieldError{{Path: "status.values.3", Message: `"charging" is not idle, in_use or fault`}}},
		{"coil status value", func(p *edged.Profile) { p.Status.Table = "coil" },
			[]edged.FieldError{{Path: "status.values.2", Message: "a coil is 0 or 1"}}},
		{"no values", func(p *edged.Profile) { p.Status.Values = nil },
			[]edged.FieldError{{Path: "status.values", Message: "must map register values to idle, in_use or fault"}}},
		{"telemetry table", func(p *edged.Profile) { p.Telemetry[1].Table = "inputs" },
			[]edged.FieldError{{Path: "telemetry[1].table", Message: "must be coil, discrete, holding or input"}}},
		{"telemetry address", func(p *edged.Profile) { p.Telemetry[0].Address = 70000 },
			[]edged.FieldError{{Path: "telemetry[0].address", Message: "must be between 0 and 65535"}}},
		{"telemetry name twice", func(p *edged.Profile) { p.Telemetry[1].Name = "power_w" },
			[]edged.FieldError{{Path: "telemetry[1].name", Message: `"power_w" appears twice`}}},
		{"telemetry name reserved", func(p *edged.Profile) { p.Telemetry[1].Name = "status" },
			[]edged.FieldError{{Path: "telemetry[1].name", Message: `"status" is reserved for the device state`}}},
		{"telemetry bad name", func(p *edged.Profile) { p.Telemetry[1].Name = "temp c" },
			[]edged.FieldError{{Path: "telemetry[1].name", Message: `"temp c" is not a telemetry name ([A-Za-z0-9_-]{1,64})`}}},
		{"telemetry name of 65 characters", func(p *edged.Profile) { p.Telemetry[1].Name = strings.Repeat("t", 65) },
			[]edged.FieldError{{Path: "telemetry[1].name", Message: fmt.Sprintf("%q is not a telemetry name ([A-Za-z0-9_-]{1,64})", strings.Repeat("t", 65))}}},
		{"64 telemetry values", func(p *edged.Profile) {
			p.Telemetry = nil
			for i := 0; i < 64; i++ {
				p.Telemetry = append(p.Telemetry, edged.TelemetryRegister{Name: fmt.Sprint("v", i), Table: "input", Address: i})
			}
		}, nil},
		{"65 telemetry values: over the state bounds", func(p *edged.Profile) {
			p.Telemetry = nil
			for i := 0; i < 65; i++ {
				p.Telemetry = append(p.Telemetry, edged.TelemetryRegister{Name: fmt.Sprint("v", i), Table: "input", Address: i})
			}
		},
			[]edged.FieldError{{Path: "telemetry", Message: "at most 64 values"}}},
		{"signed bit", func(p *edged.Profile) { p.Telemetry[0].Table, p.Telemetry[0].Signed = "discrete", true },
			[]edged.FieldError{{Path: "telemetry[0].signed", Message: "a discrete is a bit, it has no sign"}}},
		{"command read-only table", func(p *edged.Profile) { c := p.Commands["stop"]; c.Table = "input"; p.Commands["stop"] = c },
			[]edged.FieldError{{Path: "commands.stop.table", Message: "a input cannot be written; use coil or holding"}}},
		{"command value", func(p *edged.Profile) { c := p.Commands["stop"]; c.Value = "{durations}"; p.Commands["stop"] = c },
			[]edged.FieldError{{Path: "commands.stop.value", Message: `"{durations}" is not a number, {duration_s} or {args.NAME}`}}},
		{"command value too big", func(p *edged.Profile) { c := p.Commands["stop"]; c.Value = "65536"; p.Commands["stop"] = c },
			[]edged.FieldError{{Path: "commands.stop.value", Message: "value 65536 does not fit a 16-bit register"}}},
		{"coil value", func(p *edged.Profile) {
			p.Commands["lamp"] = edged.CommandRegister{Table: "coil", Address: 1, Value: "2"}
		},
			[]edged.FieldError{{Path: "commands.lamp.value", Message: "value 2: a coil takes 0 or 1"}}},
		{"coil duration", func(p *edged.Profile) {
			p.Commands["lamp"] = edged.CommandRegister{Table: "coil", Address: 1, Value: "{duration_s}"}
		},
			[]edged.FieldError{{Path: "commands.lamp.value", Message: "a coil takes 0 or 1, not {duration_s}"}}},
		{"end is reserved", func(p *edged.Profile) {
			p.Commands["end"] = edged.CommandRegister{Table: "holding", Address: 1, Value: "1"}
		},
			[]edged.FieldError{{Path: "commands.end", Message: `"end" is the gateway's own action (it ends the rental)`}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := good()
			tt.change(&p)
			if diff := cmp.Diff(tt.want, CheckProfile(p)); diff != "" {
				t.Errorf("CheckProfile (-want +got):\n%s", diff)
			}
		})
	}
	// CheckProfile is what cmd/edged hands to Config.Validate.
	var _ edged.ProfileChecker = CheckProfile
}

func TestCompileGroupsAdjacentRegisters(t *testing.T) {
	p := edged.Profile{
		Status: &edged.StatusRegister{Table: "holding", Address: 10, Values: map[int]edged.Status{0: edged.StatusIdle}},
		Telemetry: []edged.TelemetryRegister{
			{Name: "a", Table: "holding", Address: 11},
			{Name: "b", Table: "holding", Address: 13}, // a gap: its own request
			{Name: "c", Table: "input", Address: 0},
			{Name: "d", Table: "input", Address: 1},
			{Name: "e", Table: "holding", Address: 11}, // read once
		},
	}
	pl, err := compile(p)
	if err != nil {
		t.Fatal(err)
	}
	want := []modbus.Request{
		{Func: modbus.FuncReadHoldingRegisters, Address: 10, Quantity: 2},
		{Func: modbus.FuncReadHoldingRegisters, Address: 13, Quantity: 1},
		{Func: modbus.FuncReadInputRegisters, Address: 0, Quantity: 2},
	}
	if diff := cmp.Diff(want, pl.reads); diff != "" {
		t.Errorf("reads (-want +got):\n%s", diff)
	}
	resps := []modbus.Response{{Registers: []uint16{5, 11}}, {Registers: []uint16{13}}, {Registers: []uint16{100, 0xFFFF}}}
	st, fault, tel := pl.state(resps)
	if st != edged.StatusFault || fault != "status_5" {
		t.Errorf("status = %s %q, want fault status_5", st, fault)
	}
	wantTel := map[string]any{"a": 11.0, "b": 13.0, "c": 100.0, "d": 65535.0, "e": 11.0}
	if diff := cmp.Diff(wantTel, tel); diff != "" {
		t.Errorf("telemetry (-want +got):\n%s", diff)
	}
}

func TestCommandValues(t *testing.T) {
	tests := []struct {
		name    string
		value   string
		bit     bool
		cmd     edged.DeviceCommand
		want    uint16
		wantErr string
	}{
		{"literal", "7", false, edged.DeviceCommand{}, 7, ""},
		{"negative literal", "-2", false, edged.DeviceCommand{}, 0xFFFE, ""},
		{"duration", "{duration_s}", false, edged.DeviceCommand{DurationS: 3600}, 3600, ""},
		{"duration clamped", "{duration_s}", false, edged.DeviceCommand{DurationS: 86400}, 65535, ""},
		{"duration negative", "{duration_s}", false, edged.DeviceCommand{DurationS: -1}, 0, "duration_s -1 is negative"},
		{"arg", "{args.level}", false, edged.DeviceCommand{Args: json.RawMessage(`{"level": 3}`)}, 3, ""},
		{"arg float whole", "{args.level}", false, edged.DeviceCommand{Args: json.RawMessage(`{"level": 3.0}`)}, 3, ""},
		{"arg fraction", "{args.level}", false, edged.DeviceCommand{Args: json.RawMessage(`{"level": 3.5}`)}, 0, "args.level is not a whole number"},
		{"arg string", "{args.level}", false, edged.DeviceCommand{Args: json.RawMessage(`{"level": "3"}`)}, 0, "args.level is not a number"},
		{"arg missing", "{args.level}", false, edged.DeviceCommand{Args: json.RawMessage(`{}`)}, 0, "args.level is missing"},
		{"arg too big", "{args.level}", false, edged.DeviceCommand{Args: json.RawMessage(`{"level": 65536}`)}, 0, "value 65536 does not fit a 16-bit register"},
		{"arg too small", "{args.level}", false, edged.DeviceCommand{Args: json.RawMessage(`{"level": -32769}`)}, 0, "value -32769 does not fit a 16-bit register"},
		{"coil on", "1", true, edged.DeviceCommand{}, 0xFF00, ""},
		{"coil arg off", "{args.on}", true, edged.DeviceCommand{Args: json.RawMessage(`{"on": 0}`)}, 0, ""},
		{"coil arg 5", "{args.on}", true, edged.DeviceCommand{Args: json.RawMessage(`{"on": 5}`)}, 0, "value 5: a coil takes 0 or 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := parseValue(tt.value, tt.bit)
			if err != nil {
				t.Fatal(err)
			}
			got, err := v.eval(tt.cmd)
			gotErr := ""
			if err != nil {
				gotErr = err.Error()
			}
			if got != tt.want || gotErr != tt.wantErr {
				t.Errorf("eval = %#x, %q; want %#x, %q", got, gotErr, tt.want, tt.wantErr)
			}
		})
	}
}
