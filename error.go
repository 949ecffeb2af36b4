package edged

import (
	"errors"
	"fmt"
)

// Error codes: the kind of failure, for callers that branch on it.
const (
	EINVALID     = "invalid"
	ENOTFOUND    = "not_found"
	ECONFLICT    = "conflict"
	EUNAVAILABLE = "unavailable"
	EINTERNAL    = "internal"
)

// Reason is a reason string of the contract (§6), reported to the cloud in
// rental.result, rental.ended and command.result events.
type Reason string

// Reasons of the contract, §6.
const (
	ReasonUnknownDevice Reason = "unknown_device"
	ReasonDeviceOffline Reason = "device_offline"
	ReasonDeviceBusy    Reason = "device_busy"
	ReasonDeviceFault   Reason = "device_fault"
	ReasonMaintenance   Reason = "maintenance"
	ReasonBadSignature  Reason = "bad_signature"
	ReasonExpired       Reason = "expired"
	ReasonInvalid       Reason = "invalid"
	ReasonTimeout       Reason = "timeout"
	ReasonNotRenter     Reason = "not_renter"
	ReasonNoRental      Reason = "no_rental"
	ReasonUnsupported   Reason = "unsupported"
	ReasonDeviceError   Reason = "device_error"
	// ReasonUnavailable: the station cannot record the message now (its
	// store cannot write, §4).
	ReasonUnavailable Reason = "unavailable"

	// Rental end reasons; expired and device_fault are shared with the
	// above. Cancelled is also a grant's result when it was cancelled
	// before its start was acknowledged (§3.1).
	ReasonCancelled   Reason = "cancelled"
	ReasonRenterEnded Reason = "renter_ended"
	ReasonOperator    Reason = "operator"
)

// Error is edged's error type: a code for programs, a reason of the contract
// when one applies, and a message for people.
type Error struct {
	Code    string
	Reason  Reason
	Message string
	Err     error
}

func (e *Error) Error() string {
	msg := e.Message
	if msg == "" {
		msg = e.Code
	}
	if e.Err != nil {
		return msg + ": " + e.Err.Error()
	}
	return msg
}

func (e *Error) Unwrap() error { return e.Err }

// Errorf returns an *Error with the given code and formatted message.
func Errorf(code string, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// ErrorCode returns the code of the first *Error in err's chain, EINTERNAL
// for any other error and "" for nil.
func ErrorCode(err error) string {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return EINTERNAL
}

// ErrorReason returns the contract reason carried by err, or "".
func ErrorReason(err error) Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

// ErrorMessage returns the human message of err without internal detail
// for *Error values, and "internal error" for any other error.
func ErrorMessage(err error) string {
	var e *Error
	if errors.As(err, &e) && e.Message != "" {
		return e.Message
	}
	if ErrorCode(err) == EINTERNAL {
		return "internal error"
	}
	return err.Error()
}
