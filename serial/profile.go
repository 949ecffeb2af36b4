package serial

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/modbus"
)

// Register tables of §5 and the function codes that read and write them.
var tables = map[string]struct {
	read, write byte
	bits        bool
}{
	"coil":     {modbus.FuncReadCoils, modbus.FuncWriteSingleCoil, true},
	"discrete": {modbus.FuncReadDiscreteInputs, 0, true},
	"holding":  {modbus.FuncReadHoldingRegisters, modbus.FuncWriteSingleRegister, false},
	"input":    {modbus.FuncReadInputRegisters, 0, false},
}

var (
	nameRE     = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	templateRE = regexp.MustCompile(`^\{(duration_s|args\.([A-Za-z0-9_-]{1,64}))\}$`)
)

// CheckProfile is an edged.ProfileChecker. It reports every mistake in p
// with a path relative to the profile, such as "telemetry[1].table" or
// "commands.start.value", for cmd/edged to turn into a line number.
func CheckProfile(p edged.Profile) []edged.FieldError {
	var errs []edged.FieldError
	add := func(path, format string, args ...any) {
		errs = append(errs, edged.FieldError{Path: path, Message: fmt.Sprintf(format, args...)})
	}
	checkTable := func(path, table string) (bits, ok bool) {
		t, ok := tables[table]
		if !ok {
			add(path+".table", "must be coil, discrete, holding or input")
		}
		return t.bits, ok
	}
	checkAddress := func(path string, a int) {
		if a < 0 || a > 0xFFFF {
			add(path+".address", "must be between 0 and 65535")
		}
	}

	if s := p.Status; s == nil {
		add("status", "is required: edged learns idle, in_use and fault from it")
	} else {
		bits, _ := checkTable("status", s.Table)
		checkAddress("status", s.Address)
		if len(s.Values) == 0 {
			add("status.values", "must map register values to idle, in_use or fault")
		}
		for _, v := range slices.Sorted(maps.Keys(s.Values)) {
			path := fmt.Sprintf("status.values.%d", v)
			switch {
			case bits && v != 0 && v != 1:
				add(path, "a %s is 0 or 1", s.Table)
			case v < -32768 || v > 65535:
				add(path, "does not fit a 16-bit register")
			}
			switch s.Values[v] {
			case edged.StatusIdle, edged.StatusInUse, edged.StatusFault:
			default:
				add(path, "%q is not idle, in_use or fault", s.Values[v])
			}
		}
	}

	names := map[string]bool{}
	for i, t := range p.Telemetry {
		path := fmt.Sprintf("telemetry[%d]", i)
		switch {
		case !nameRE.MatchString(t.Name):
			add(path+".name", "%q is not a telemetry name ([A-Za-z0-9_-]{1,64})", t.Name)
		case t.Name == "status" || t.Name == "fault" || t.Name == "ts":
			add(path+".name", "%q is reserved for the device state", t.Name)
		case names[t.Name]:
			add(path+".name", "%q appears twice", t.Name)
		}
		names[t.Name] = true
		bits, ok := checkTable(path, t.Table)
		checkAddress(path, t.Address)
		if math.IsNaN(t.Scale) || math.IsInf(t.Scale, 0) {
			add(path+".scale", "must be a finite number")
		}
		if ok && bits && t.Signed {
			add(path+".signed", "a %s is a bit, it has no sign", t.Table)
		}
	}
	if len(p.Telemetry) > edged.MaxTelemetryKeys {
		add("telemetry", "at most %d values", edged.MaxTelemetryKeys)
	}

	for _, name := range slices.Sorted(maps.Keys(p.Commands)) {
		c := p.Commands[name]
		path := "commands." + name
		if !nameRE.MatchString(name) {
			add(path, "%q is not an action name ([A-Za-z0-9_-]{1,64})", name)
		}
		if name == edged.ActionEnd {
			add(path, "%q is the gateway's own action (it ends the rental)", name)
		}
		t, ok := tables[c.Table]
		switch {
		case !ok:
			add(path+".table", "must be coil or holding")
		case t.write == 0:
			add(path+".table", "a %s cannot be written; use coil or holding", c.Table)
		}
		checkAddress(path, c.Address)
		if _, err := parseValue(c.Value, t.bits); err != nil {
			add(path+".value", "%v", err)
		}
	}
	return errs
}

// valueTemplate is a command's value: a literal, the command's duration,
// or a number from its args.
type valueTemplate struct {
	literal  int64
	duration bool
	arg      string
	bit      bool // coil: 0 or 1 only
}

func parseValue(s string, bit bool) (valueTemplate, error) {
	s = strings.TrimSpace(s)
	v := valueTemplate{bit: bit}
	if m := templateRE.FindStringSubmatch(s); m != nil {
		if m[1] == "duration_s" {
			if bit {
				return v, fmt.Errorf("a coil takes 0 or 1, not {duration_s}")
			}
			v.duration = true
		} else {
			v.arg = m[2]
		}
		return v, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return v, fmt.Errorf("%q is not a number, {duration_s} or {args.NAME}", s)
	}
	v.literal = n
	if _, err := v.word(n); err != nil {
		return v, err
	}
	return v, nil
}

// word turns n into the 16-bit value written: a coil takes 0 or 1
// (sent as 0x0000 or 0xFF00), a holding register -32768..65535 (negative
// values as int16).
func (v valueTemplate) word(n int64) (uint16, error) {
	if v.bit {
		switch n {
		case 0:
			return 0, nil
		case 1:
			return 0xFF00, nil
		}
		return 0, fmt.Errorf("value %d: a coil takes 0 or 1", n)
	}
	if n < -32768 || n > 65535 {
		return 0, fmt.Errorf("value %d does not fit a 16-bit register", n)
	}
	return uint16(n), nil
}

// eval fills in the template from cmd. {duration_s} is clamped to
// 0..65535 (a device's own countdown is a safety net; edged sends stop
// itself at the rental's end); an argument out of range is refused.
func (v valueTemplate) eval(cmd edged.DeviceCommand) (uint16, error) {
	switch {
	case v.duration:
		if cmd.DurationS < 0 {
			return 0, fmt.Errorf("duration_s %d is negative", cmd.DurationS)
		}
		return uint16(min(cmd.DurationS, 65535)), nil
	case v.arg != "":
		n, err := argNumber(cmd.Args, v.arg)
		if err != nil {
			return 0, err
		}
		return v.word(n)
	default:
		return v.word(v.literal)
	}
}

func argNumber(raw json.RawMessage, name string) (int64, error) {
	var args map[string]json.RawMessage
	if len(raw) == 0 || json.Unmarshal(raw, &args) != nil {
		return 0, fmt.Errorf("args.%s is missing (args is not an object)", name)
	}
	a, ok := args[name]
	if !ok {
		return 0, fmt.Errorf("args.%s is missing", name)
	}
	d := json.NewDecoder(bytes.NewReader(a))
	d.UseNumber()
	var x any
	_ = d.Decode(&x)
	num, ok := x.(json.Number)
	if !ok {
		return 0, fmt.Errorf("args.%s is not a number", name)
	}
	if n, err := num.Int64(); err == nil {
		return n, nil
	}
	f, err := num.Float64()
	if err != nil || f != math.Trunc(f) || math.Abs(f) > 1<<53 {
		return 0, fmt.Errorf("args.%s is not a whole number", name)
	}
	return int64(f), nil
}

// point is one register or bit a poll reads: which request, which item.
type point struct{ read, index int }

type telemetryPoint struct {
	point
	name   string
	scale  float64
	signed bool
}

type commandOp struct {
	fn      byte
	address uint16
	value   valueTemplate
}

// plan is a compiled profile: the reads of one poll, contiguous registers
// of a table grouped into one request, and the writes of its commands.
type plan struct {
	reads     []modbus.Request // Unit left 0; filled in per device
	status    point
	values    map[int]edged.Status
	telemetry []telemetryPoint
	commands  map[string]commandOp
}

// compile turns a checked profile into a plan. Only adjacent registers
// share a request: a gap could be an address the device does not have.
func compile(p edged.Profile) (*plan, error) {
	if errs := CheckProfile(p); len(errs) > 0 {
		return nil, edged.ConfigErrors(errs)
	}
	type key struct {
		table string
		addr  int
	}
	var keys []key
	keys = append(keys, key{p.Status.Table, p.Status.Address})
	for _, t := range p.Telemetry {
		keys = append(keys, key{t.Table, t.Address})
	}
	sorted := slices.Clone(keys)
	slices.SortFunc(sorted, func(a, b key) int {
		if c := strings.Compare(a.table, b.table); c != 0 {
			return c
		}
		return a.addr - b.addr
	})
	sorted = slices.Compact(sorted)
	pl := &plan{values: p.Status.Values, commands: map[string]commandOp{}}
	where := map[key]point{}
	for _, k := range sorted {
		t := tables[k.table]
		limit := modbus.MaxReadRegisters
		if t.bits {
			limit = modbus.MaxReadBits
		}
		if n := len(pl.reads); n > 0 {
			last := &pl.reads[n-1]
			if last.Func == t.read && int(last.Address)+int(last.Quantity) == k.addr && int(last.Quantity) < limit {
				where[k] = point{n - 1, int(last.Quantity)}
				last.Quantity++
				continue
			}
		}
		where[k] = point{len(pl.reads), 0}
		pl.reads = append(pl.reads, modbus.Request{Func: t.read, Address: uint16(k.addr), Quantity: 1})
	}
	pl.status = where[keys[0]]
	for i, t := range p.Telemetry {
		scale := t.Scale
		if scale == 0 {
			scale = 1
		}
		pl.telemetry = append(pl.telemetry, telemetryPoint{where[keys[i+1]], t.Name, scale, t.Signed})
	}
	for name, c := range p.Commands {
		t := tables[c.Table]
		v, _ := parseValue(c.Value, t.bits)
		pl.commands[name] = commandOp{fn: t.write, address: uint16(c.Address), value: v}
	}
	return pl, nil
}

// word returns the value at pt of a poll's replies.
func (pl *plan) word(resps []modbus.Response, pt point) uint16 {
	r := resps[pt.read]
	if r.Bits != nil {
		if r.Bits[pt.index] {
			return 1
		}
		return 0
	}
	return r.Registers[pt.index]
}

// state maps a poll's replies to the device state: the status through
// the profile's values (an unmapped value is a fault "status_<n>"), and
// telemetry scaled.
func (pl *plan) state(resps []modbus.Response) (edged.Status, string, map[string]any) {
	raw := pl.word(resps, pl.status)
	st, ok := pl.values[int(raw)]
	if !ok {
		st, ok = pl.values[int(int16(raw))]
	}
	fault := ""
	if !ok {
		st, fault = edged.StatusFault, fmt.Sprintf("status_%d", raw)
	}
	tel := make(map[string]any, len(pl.telemetry))
	for _, t := range pl.telemetry {
		w := pl.word(resps, t.point)
		x := float64(w)
		if t.signed {
			x = float64(int16(w))
		}
		tel[t.name] = roundScaled(x * t.scale)
	}
	return st, fault, tel
}

// roundScaled trims float noise from scaling (235*0.1 is 23.5, not
// 23.500000000000004) by keeping 12 significant digits.
func roundScaled(x float64) float64 {
	r, err := strconv.ParseFloat(strconv.FormatFloat(x, 'g', 12, 64), 64)
	if err != nil {
		return x
	}
	return r
}

// request builds the write of action for unit from cmd.
func (op commandOp) request(unit byte, cmd edged.DeviceCommand) (modbus.Request, error) {
	v, err := op.value.eval(cmd)
	if err != nil {
		return modbus.Request{}, err
	}
	return modbus.Request{Unit: unit, Func: op.fn, Address: op.address, Value: v}, nil
}
