package modbus

import (
	"errors"
	"fmt"
	"io"
	"time"
)

// ReadFrame reads the reply to req from p: at most MaxADU bytes in all,
// never more than the frame in hand can still need, until a frame of the
// right unit, function and length with a good CRC is found or deadline
// passes. Leading garbage is skipped (resynchronisation); a candidate with
// a bad CRC is skipped too. Once bytes have arrived, a silence of quiet
// ends the wait: a frame is sent without pauses, so after a truncated or
// corrupted frame nothing more will come. It returns the frame, or ErrTimeout (nothing came),
// ErrCRC (a frame with a bad CRC came), ErrFrame (garbage or a truncated
// frame), or p's error. p's Read should return within about 100 ms when
// nothing arrives, with 0 bytes and nil or io.EOF; the deadline is checked
// between reads. When p has a SetReadDeadline(time.Time) method, as the
// serial bus's reader does, ReadFrame sets the deadline on it so that a
// Read can end exactly then.
func ReadFrame(p io.Reader, req Request, deadline time.Time, quiet time.Duration) ([]byte, error) {
	var buf [MaxADU]byte
	n, total := 0, 0
	crcBad := false
	want := req.ResponseLen()
	setDeadline := func() {}
	if d, ok := p.(interface{ SetReadDeadline(time.Time) }); ok {
		setDeadline = func() { d.SetReadDeadline(deadline) }
	}
	setDeadline()
	fail := func() error {
		switch {
		case crcBad:
			return ErrCRC
		case total == 0:
			return ErrTimeout
		default:
			return ErrFrame
		}
	}
	for {
		start, need, frame, bad := scanFrame(req, want, buf[:n])
		if frame != nil {
			out := make([]byte, len(frame))
			copy(out, frame)
			return out, nil
		}
		crcBad = crcBad || bad
		n = copy(buf[:], buf[start:n])
		if need <= 0 {
			need = want
		}
		if total >= MaxADU {
			return nil, fail()
		}
		need = min(need, MaxADU-total)
		now := time.Now()
		if !now.Before(deadline) {
			return nil, fail()
		}
		k, err := p.Read(buf[n : n+need])
		if k < 0 || k > need {
			return nil, fmt.Errorf("read returned %d bytes for %d", k, need)
		}
		n += k
		total += k
		if k > 0 {
			// A frame is sent without pauses: once bytes came, a quiet
			// period means nothing more is coming (a truncated frame, a
			// bad CRC, garbage), so give up early rather than wait for
			// the whole timeout.
			if d := time.Now().Add(quiet); d.Before(deadline) {
				deadline = d
				setDeadline()
			}
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		if k == 0 && time.Since(now) < time.Millisecond {
			// A hung-up tty may return EOF at once; do not spin.
			time.Sleep(min(5*time.Millisecond, time.Until(deadline)))
		}
	}
}

// scanFrame looks for the reply to req in b. It returns the offset of the
// first byte that may still start the reply (everything before it is
// garbage), how many more bytes that candidate needs (0 when none is
// pending), the frame when one is complete with a good CRC, and whether a
// complete candidate had a bad CRC.
func scanFrame(req Request, want int, b []byte) (start, need int, frame []byte, crcBad bool) {
	for i := 0; i < len(b); i++ {
		if b[i] != req.Unit {
			continue
		}
		if i+1 >= len(b) {
			return i, 4, nil, crcBad // the shortest reply is 5 bytes
		}
		var l int
		switch b[i+1] {
		case req.Func | 0x80:
			l = 5
		case req.Func:
			l = want
			if isRead(req.Func) && i+2 < len(b) && int(b[i+2]) != want-5 {
				continue
			}
		default:
			continue
		}
		if i+l > len(b) {
			return i, i + l - len(b), nil, crcBad
		}
		if checkCRC(b[i : i+l]) {
			return i, 0, b[i : i+l], crcBad
		}
		crcBad = true
	}
	return len(b), 0, nil, crcBad
}
