package edged

import (
	"bytes"
	"encoding/json"
	"math"
	"time"
)

// Rental ops of R/S/down/rentals (§3.1).
const (
	OpGrant  = "grant"
	OpExtend = "extend"
	OpCancel = "cancel"
)

// MaxDuration bounds a rental's duration: a week.
const MaxDuration = 7 * 24 * time.Hour

// RentalMessage is a message of R/S/down/rentals.
type RentalMessage struct {
	Op        string `json:"op"`
	RentalID  string `json:"rental_id"`
	DeviceID  string `json:"device_id"`
	RenterID  string `json:"renter_id"`
	DurationS int64  `json:"duration_s,omitempty"`
	NotAfter  string `json:"not_after,omitempty"`
	Sig       string `json:"sig,omitempty"`
}

// RenterCommand is a message of R/S/down/commands.
type RenterCommand struct {
	CmdID    string          `json:"cmd_id"`
	DeviceID string          `json:"device_id"`
	RenterID string          `json:"renter_id"`
	Action   string          `json:"action"`
	Args     json.RawMessage `json:"args,omitempty"`
}

// ParseRentalMessage decodes and checks a rental message. On error the
// returned message still holds whatever ids could be read, so the refusal
// can be reported against them.
func ParseRentalMessage(payload []byte) (RentalMessage, error) {
	var m RentalMessage
	obj, err := decodeObject(payload)
	if err != nil {
		return m, err
	}
	str := func(key string) (string, bool) {
		v, ok := obj[key]
		if !ok {
			return "", true
		}
		s, ok := v.(string)
		return s, ok
	}
	var okOp, okR, okD, okU, okN, okS bool
	m.Op, okOp = str("op")
	m.RentalID, okR = str("rental_id")
	m.DeviceID, okD = str("device_id")
	m.RenterID, okU = str("renter_id")
	m.NotAfter, okN = str("not_after")
	m.Sig, okS = str("sig")
	if !okOp || !okR || !okD || !okU || !okN || !okS {
		return m, invalid("fields must be strings")
	}
	if !ValidToken(m.RentalID) {
		return m, invalid("bad rental_id")
	}
	if !ValidDeviceID(m.DeviceID) {
		return m, invalid("bad device_id")
	}
	if !ValidToken(m.RenterID) {
		return m, invalid("bad renter_id")
	}
	if v, ok := obj["duration_s"]; ok {
		n, isNum := v.(json.Number)
		if !isNum {
			return m, invalid("duration_s must be a number")
		}
		d, err := n.Int64()
		if err != nil {
			f, ferr := n.Float64()
			if ferr != nil || f != math.Trunc(f) || math.Abs(f) > math.MaxInt32 {
				return m, invalid("duration_s must be whole seconds")
			}
			d = int64(f)
		}
		m.DurationS = d
	}
	if m.NotAfter != "" {
		if _, err := time.Parse(time.RFC3339Nano, m.NotAfter); err != nil {
			return m, invalid("not_after must be an RFC 3339 time")
		}
	}
	switch m.Op {
	case OpGrant, OpExtend:
		if m.DurationS <= 0 || time.Duration(m.DurationS)*time.Second > MaxDuration {
			return m, invalid("duration_s must be between 1 and %d", int64(MaxDuration/time.Second))
		}
	case OpCancel:
		if m.DurationS != 0 {
			return m, invalid("cancel takes no duration_s")
		}
	default:
		return m, invalid("op must be grant, extend or cancel")
	}
	return m, nil
}

// ParseRenterCommand decodes and checks a renter command. On error the
// returned command holds whatever ids could be read.
func ParseRenterCommand(payload []byte) (RenterCommand, error) {
	var c RenterCommand
	obj, err := decodeObject(payload)
	if err != nil {
		return c, err
	}
	get := func(key string) string { s, _ := obj[key].(string); return s }
	c.CmdID, c.DeviceID, c.RenterID, c.Action = get("cmd_id"), get("device_id"), get("renter_id"), get("action")
	if !ValidToken(c.CmdID) {
		return c, invalid("bad cmd_id")
	}
	if !ValidDeviceID(c.DeviceID) {
		return c, invalid("bad device_id")
	}
	if !ValidToken(c.RenterID) {
		return c, invalid("bad renter_id")
	}
	if !ValidToken(c.Action) || len(c.Action) > 64 {
		return c, invalid("bad action")
	}
	if a, ok := obj["args"]; ok && a != nil {
		if _, isObj := a.(map[string]any); !isObj {
			return c, invalid("args must be an object")
		}
		// Re-encode from the raw payload to keep numbers as sent.
		var raw struct {
			Args json.RawMessage `json:"args"`
		}
		if err := json.Unmarshal(payload, &raw); err != nil {
			return c, invalid("bad args")
		}
		var buf bytes.Buffer
		if err := json.Compact(&buf, raw.Args); err != nil {
			return c, invalid("bad args")
		}
		c.Args = buf.Bytes()
	}
	return c, nil
}
