package edged

import "unicode/utf8"

// ValidStationID reports whether s is a station id: [a-z0-9][a-z0-9-]{0,63}.
func ValidStationID(s string) bool {
	if len(s) < 1 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0:
		default:
			return false
		}
	}
	return true
}

// ValidDeviceID reports whether s is a device id: [A-Za-z0-9_-]{1,64}.
func ValidDeviceID(s string) bool {
	if len(s) < 1 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// ValidToken reports whether s is a renter id, rental id or cmd id: 1 to 128
// printable characters, none of '/', '+', '#' and no control characters.
func ValidToken(s string) bool {
	if s == "" || !utf8.ValidString(s) {
		return false
	}
	n := 0
	for _, r := range s {
		n++
		if n > 128 || r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) || r == '/' || r == '+' || r == '#' || r == utf8.RuneError {
			return false
		}
	}
	return true
}
