package edged

import (
	"crypto/ed25519"
	"encoding/base64"
	"strconv"
	"strings"
)

// signatureContext opens every signed rental text (§3.1).
const signatureContext = "edged-rental-v1"

// SignedText returns the text a rental message's sig covers (§3.1): the
// context, the station id, op, rental_id, device_id, renter_id, duration_s in
// decimal and not_after exactly as sent, joined by newlines.
func SignedText(station string, m RentalMessage) []byte {
	return []byte(strings.Join([]string{
		signatureContext, station, m.Op, m.RentalID, m.DeviceID, m.RenterID,
		strconv.FormatInt(m.DurationS, 10), m.NotAfter,
	}, "\n"))
}

// ParseVerifyKey decodes a base64 (standard, padded) Ed25519 public key.
func ParseVerifyKey(s string) (ed25519.PublicKey, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, invalid("verify key is not base64: %v", err)
	}
	if len(b) != ed25519.PublicKeySize {
		return nil, invalid("verify key is %d bytes, want %d", len(b), ed25519.PublicKeySize)
	}
	return ed25519.PublicKey(b), nil
}

// VerifyRental checks m's sig against key for this station. A missing or
// wrong signature is an *Error with reason bad_signature.
func VerifyRental(key ed25519.PublicKey, station string, m RentalMessage) error {
	bad := &Error{Code: EINVALID, Reason: ReasonBadSignature, Message: "bad signature"}
	if m.Sig == "" {
		bad.Message = "missing signature"
		return bad
	}
	sig, err := base64.StdEncoding.DecodeString(m.Sig)
	if err != nil || len(sig) != ed25519.SignatureSize {
		return bad
	}
	if !ed25519.Verify(key, SignedText(station, m), sig) {
		return bad
	}
	return nil
}

// SignRental returns the base64 signature of m for station.
func SignRental(key ed25519.PrivateKey, station string, m RentalMessage) string {
	return base64.StdEncoding.EncodeToString(ed25519.Sign(key, SignedText(station, m)))
}
