package edged

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"slices"
	"time"
)

// Transport is how a device reaches the station.
type Transport string

// Transports of the contract.
const (
	TransportMQTT   Transport = "mqtt"
	TransportSerial Transport = "serial"
)

// Status is what a device says it is doing (§2, §3.4).
type Status string

// Device statuses. StatusUnknown is edged's own: nothing heard yet.
const (
	StatusIdle    Status = "idle"
	StatusInUse   Status = "in_use"
	StatusFault   Status = "fault"
	StatusUnknown Status = "unknown"
)

// MaxPayload is the largest device payload accepted (§2).
const MaxPayload = 64 << 10

// Location is a position reported by a device or fixed in config.
type Location struct {
	Lat       float64  `json:"lat" yaml:"lat"`
	Lon       float64  `json:"lon" yaml:"lon"`
	AccuracyM *float64 `json:"accuracy_m,omitempty" yaml:"accuracy_m,omitempty"`
	TS        string   `json:"ts,omitempty" yaml:"-"`
}

// Valid reports whether l is on the globe.
func (l Location) Valid() bool {
	ok := l.Lat >= -90 && l.Lat <= 90 && l.Lon >= -180 && l.Lon <= 180 &&
		!math.IsNaN(l.Lat) && !math.IsNaN(l.Lon)
	if l.AccuracyM != nil && (*l.AccuracyM < 0 || math.IsNaN(*l.AccuracyM) || math.IsInf(*l.AccuracyM, 0)) {
		return false
	}
	return ok
}

// Device is a device declared in the station's configuration.
type Device struct {
	ID         string    `yaml:"id"`
	Kind       string    `yaml:"kind"`
	Transport  Transport `yaml:"transport"`
	SecretHash string    `yaml:"secret_hash"`
	// SecretHashes are more accepted secrets beside SecretHash, so a
	// secret can be rolled without a gap: add the new hash, let the device
	// switch, remove the old one.
	SecretHashes []string  `yaml:"secret_hashes"`
	Location     *Location `yaml:"location"`
	Bus          string    `yaml:"bus"`
	Unit         int       `yaml:"unit"`
	Profile      string    `yaml:"profile"`
}

// DeviceRental is the binding of a device to its renter, as shown in
// device state (§3.4).
type DeviceRental struct {
	RentalID  string    `json:"rental_id"`
	RenterID  string    `json:"renter_id"`
	StartedAt time.Time `json:"started_at"`
	EndsAt    time.Time `json:"ends_at"`
}

// DeviceState is the latest known state of a device (§3.4).
type DeviceState struct {
	DeviceID    string         `json:"device_id"`
	Kind        string         `json:"kind"`
	Transport   Transport      `json:"transport"`
	Online      bool           `json:"online"`
	Status      Status         `json:"status"`
	Fault       string         `json:"fault,omitempty"`
	Maintenance bool           `json:"maintenance"`
	Rental      *DeviceRental  `json:"rental"`
	Telemetry   map[string]any `json:"telemetry"`
	Location    *Location      `json:"location"`
	LastSeen    *time.Time     `json:"last_seen"`
	UpdatedAt   time.Time      `json:"updated_at"`
	// Version rises by one with every change of the state in this process.
	// Readers that coalesce (the uplink) compare it, not UpdatedAt: two
	// changes within one millisecond share a timestamp, never a version.
	Version uint64 `json:"-"`
}

// Clone returns a deep copy of s, safe to hand to another goroutine.
func (s DeviceState) Clone() DeviceState {
	c := s
	if s.Rental != nil {
		r := *s.Rental
		c.Rental = &r
	}
	c.Telemetry = make(map[string]any, len(s.Telemetry))
	for k, v := range s.Telemetry {
		c.Telemetry[k] = v
	}
	if s.Location != nil {
		l := *s.Location
		c.Location = &l
	}
	if s.LastSeen != nil {
		t := *s.LastSeen
		c.LastSeen = &t
	}
	return c
}

// StateReport is what a device publishes on devices/D/state.
type StateReport struct {
	Status Status
	Fault  string
	TS     string
	// Extra holds the fields beyond status, fault and ts: telemetry.
	Extra map[string]any
}

// CommandAck is a device's answer on devices/D/commands/ack.
type CommandAck struct {
	CmdID string `json:"cmd_id"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	// Code is a device-specific error code, such as a Modbus exception.
	Code int `json:"code,omitempty"`
}

// DeviceCommand is a command to a device on devices/D/commands (§2).
type DeviceCommand struct {
	CmdID     string          `json:"cmd_id"`
	Action    string          `json:"action"`
	RentalID  string          `json:"rental_id,omitempty"`
	RenterID  string          `json:"renter_id,omitempty"`
	DurationS int64           `json:"duration_s,omitempty"`
	EndsAt    *time.Time      `json:"ends_at,omitempty"`
	Args      json.RawMessage `json:"args,omitempty"`
}

// Actions of the gateway's own.
const (
	ActionStart = "start"
	ActionStop  = "stop"
	ActionEnd   = "end"
)

func invalid(format string, args ...any) error {
	return &Error{Code: EINVALID, Reason: ReasonInvalid, Message: fmt.Sprintf(format, args...)}
}

// decodeObject decodes a JSON object with numbers kept exact, refusing
// anything that is not a single object of at most MaxPayload bytes.
func decodeObject(payload []byte) (map[string]any, error) {
	if len(payload) > MaxPayload {
		return nil, invalid("payload of %d bytes is over %d", len(payload), MaxPayload)
	}
	d := json.NewDecoder(bytes.NewReader(payload))
	d.UseNumber()
	var m map[string]any
	if err := d.Decode(&m); err != nil {
		return nil, invalid("payload is not a JSON object: %v", err)
	}
	if m == nil {
		return nil, invalid("payload is not a JSON object")
	}
	if d.More() {
		return nil, invalid("trailing data after the JSON object")
	}
	if _, err := d.Token(); err == nil {
		return nil, invalid("trailing data after the JSON object")
	}
	return m, nil
}

// ValidObject reports whether payload is a single JSON object within MaxPayload.
func ValidObject(payload []byte) error {
	_, err := decodeObject(payload)
	return err
}

func optString(m map[string]any, key string) (string, error) {
	v, ok := m[key]
	if !ok || v == nil {
		return "", nil
	}
	s, ok := v.(string)
	if !ok {
		return "", invalid("%s must be a string", key)
	}
	return s, nil
}

func optTime(m map[string]any, key string) (string, error) {
	s, err := optString(m, key)
	if err != nil || s == "" {
		return s, err
	}
	if _, err := time.Parse(time.RFC3339Nano, s); err != nil {
		return "", invalid("%s must be an RFC 3339 time", key)
	}
	return s, nil
}

// flatValue converts a decoded JSON value to a telemetry value: a number,
// string or boolean.
func flatValue(key string, v any) (any, error) {
	switch x := v.(type) {
	case json.Number:
		f, err := x.Float64()
		if err != nil || math.IsInf(f, 0) {
			return nil, invalid("telemetry %q is not a finite number", key)
		}
		return f, nil
	case string:
		if len(x) > MaxTelemetryString || jsonLen(x) > MaxTelemetryString {
			return nil, invalid("telemetry %q is over %d bytes", key, MaxTelemetryString)
		}
		return x, nil
	case bool:
		return x, nil
	default:
		return nil, invalid("telemetry %q must be a number, string or boolean", key)
	}
}

// State bounds (§2): what one device's latest telemetry may hold, so that
// its state stays near 20 KiB however it is written and never nears the
// cloud's largest message.
const (
	// MaxTelemetryKeys bounds the fields of a device's telemetry, merged
	// reports included.
	MaxTelemetryKeys = 64
	// MaxTelemetryKey bounds a field name, in bytes.
	MaxTelemetryKey = 64
	// MaxTelemetryString bounds a string value, in bytes.
	MaxTelemetryString = 256
)

// validTelemetryKey reports whether k may name a telemetry field: 1 to 64
// printable characters without '/', '+' or '#'.
//
// Both bounds in bytes (names here, string values in flatValue) are also
// applied to the value as JSON writes it: json.Marshal escapes '<', '>',
// '&' and control characters as six bytes each, which would let 64 fields
// of "<<<..." reach 120 KiB. Plain text is unaffected.
func validTelemetryKey(k string) bool {
	return k != "" && len(k) <= MaxTelemetryKey && ValidToken(k) && jsonLen(k) <= MaxTelemetryKey
}

// escapedLen is the length of the compact JSON b once json.Marshal has
// escaped it for HTML, as it does to a json.RawMessage.
func escapedLen(b []byte) int {
	n := len(b)
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case c == '<' || c == '>' || c == '&':
			n += 5 // \u003c
		case c == 0xE2 && i+2 < len(b) && b[i+1] == 0x80 && b[i+2]&^1 == 0xA8:
			n += 3 // U+2028, U+2029: three bytes become six
		}
	}
	return n
}

// jsonLen is the length of s as json.Marshal writes it, without the quotes.
func jsonLen(s string) int {
	b, _ := json.Marshal(s) // a string always marshals
	return len(b) - 2
}

// BoundTelemetry removes from m, in place, the fields that break the state
// bounds (§2): bad names, values that are not a bounded number, string or
// boolean, and beyond MaxTelemetryKeys fields the names that sort last. It
// returns how many it removed. It is for telemetry restored from a store
// written before the bounds existed; reports are refused whole instead.
func BoundTelemetry(m map[string]any) int {
	n := 0
	for k, v := range m {
		ok := validTelemetryKey(k)
		switch x := v.(type) {
		case string:
			ok = ok && len(x) <= MaxTelemetryString && jsonLen(x) <= MaxTelemetryString
		case float64:
			ok = ok && !math.IsNaN(x) && !math.IsInf(x, 0)
		case bool, json.Number:
		default:
			ok = false
		}
		if !ok {
			delete(m, k)
			n++
		}
	}
	if len(m) > MaxTelemetryKeys {
		keys := slices.Sorted(maps.Keys(m))
		for _, k := range keys[MaxTelemetryKeys:] {
			delete(m, k)
			n++
		}
	}
	return n
}

// CheckTelemetryMerge reports whether merging add into cur keeps the
// telemetry within MaxTelemetryKeys fields. Errors: EINVALID.
func CheckTelemetryMerge(cur, add map[string]any) error {
	n := len(cur)
	for k := range add {
		if _, ok := cur[k]; !ok {
			n++
		}
	}
	if n > MaxTelemetryKeys {
		return Errorf(EINVALID, "telemetry would hold %d fields, over %d", n, MaxTelemetryKeys)
	}
	return nil
}

// ParseState parses a devices/D/state payload.
func ParseState(payload []byte) (StateReport, error) {
	m, err := decodeObject(payload)
	if err != nil {
		return StateReport{}, err
	}
	var r StateReport
	st, err := optString(m, "status")
	if err != nil {
		return r, err
	}
	switch Status(st) {
	case StatusIdle, StatusInUse, StatusFault:
		r.Status = Status(st)
	default:
		return r, invalid("status must be idle, in_use or fault")
	}
	if r.Fault, err = optString(m, "fault"); err != nil {
		return r, err
	}
	if len(r.Fault) > 128 {
		return r, invalid("fault code is too long")
	}
	if r.TS, err = optTime(m, "ts"); err != nil {
		return r, err
	}
	delete(m, "status")
	delete(m, "fault")
	delete(m, "ts")
	if len(m) > 0 {
		r.Extra, err = flatten(m)
	}
	return r, err
}

func flatten(m map[string]any) (map[string]any, error) {
	if len(m) > MaxTelemetryKeys {
		return nil, invalid("more than %d telemetry fields", MaxTelemetryKeys)
	}
	out := make(map[string]any, len(m))
	for k, v := range m {
		if !validTelemetryKey(k) {
			return nil, invalid("bad telemetry field name")
		}
		fv, err := flatValue(k, v)
		if err != nil {
			return nil, err
		}
		out[k] = fv
	}
	return out, nil
}

// ParseTelemetry parses a devices/D/telemetry payload: a flat object.
func ParseTelemetry(payload []byte) (map[string]any, error) {
	m, err := decodeObject(payload)
	if err != nil {
		return nil, err
	}
	return flatten(m)
}

// ParseLocation parses a devices/D/location payload.
func ParseLocation(payload []byte) (Location, error) {
	m, err := decodeObject(payload)
	if err != nil {
		return Location{}, err
	}
	num := func(key string, required bool) (*float64, error) {
		v, ok := m[key]
		if !ok || v == nil {
			if required {
				return nil, invalid("%s is required", key)
			}
			return nil, nil
		}
		n, ok := v.(json.Number)
		if !ok {
			return nil, invalid("%s must be a number", key)
		}
		f, err := n.Float64()
		if err != nil {
			return nil, invalid("%s must be a number", key)
		}
		return &f, nil
	}
	var l Location
	lat, err := num("lat", true)
	if err != nil {
		return l, err
	}
	lon, err := num("lon", true)
	if err != nil {
		return l, err
	}
	l.Lat, l.Lon = *lat, *lon
	if l.AccuracyM, err = num("accuracy_m", false); err != nil {
		return l, err
	}
	if l.TS, err = optTime(m, "ts"); err != nil {
		return l, err
	}
	if !l.Valid() {
		return l, invalid("location out of range")
	}
	return l, nil
}

// ParseDeviceEvent checks a devices/D/events payload: an object with a
// string "type". It returns the payload as sent, compacted.
func ParseDeviceEvent(payload []byte) (json.RawMessage, error) {
	m, err := decodeObject(payload)
	if err != nil {
		return nil, err
	}
	t, ok := m["type"].(string)
	if !ok || t == "" {
		return nil, invalid("event needs a string type")
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, payload); err != nil {
		return nil, invalid("event is not JSON: %v", err)
	}
	// The event goes upstream as json.Marshal writes it, where '<', '>',
	// '&', U+2028 and U+2029 take six bytes each: bound that size, so a
	// device cannot make one event message several times MaxPayload, over
	// the cloud's largest message.
	if n := escapedLen(buf.Bytes()); n > MaxPayload {
		return nil, invalid("event is %d bytes as sent upstream, over %d", n, MaxPayload)
	}
	return buf.Bytes(), nil
}

// ParseAck parses a devices/D/commands/ack payload.
func ParseAck(payload []byte) (CommandAck, error) {
	m, err := decodeObject(payload)
	if err != nil {
		return CommandAck{}, err
	}
	var a CommandAck
	id, ok := m["cmd_id"].(string)
	if !ok || !ValidToken(id) {
		return a, invalid("cmd_id must be a valid id")
	}
	a.CmdID = id
	okv, isBool := m["ok"].(bool)
	if !isBool {
		return a, invalid("ok must be a boolean")
	}
	a.OK = okv
	if a.Error, err = optString(m, "error"); err != nil {
		return a, err
	}
	if len(a.Error) > 256 {
		a.Error = a.Error[:256]
	}
	return a, nil
}
