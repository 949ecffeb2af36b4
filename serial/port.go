package serial

import (
	"errors"
	"fmt"
	"time"

	"github.com/stationedge/edged"
	tarm "github.com/tarm/serial"
)

// Port is the bus's view of a serial port. Only the bus goroutine uses it.
//
// Read must return within about 100 ms even when nothing arrives; it then
// returns 0 bytes and either nil or io.EOF (tarm/serial's timeout). Any
// other error means the port is gone (a USB adapter pulled): the bus
// closes it and reopens the path with backoff. Flush discards bytes
// received but not read.
type Port interface {
	Read(p []byte) (int, error)
	Write(p []byte) (int, error)
	Flush() error
	Close() error
}

// portReadTimeout is the read timeout given to tarm/serial: VTIME in 0.1 s
// steps, so 100 ms is the finest it can do. The bus keeps its own overall
// deadline on top of it.
const portReadTimeout = 100 * time.Millisecond

// OpenTarm opens b's port with tarm/serial. It is what NewBus uses when
// Config.Open is nil.
func OpenTarm(b edged.Bus) (Port, error) {
	c := &tarm.Config{
		Name:        b.Port,
		Baud:        b.Baud,
		ReadTimeout: portReadTimeout,
		Size:        byte(b.DataBits),
		StopBits:    tarm.Stop1,
	}
	if b.StopBits == 2 {
		c.StopBits = tarm.Stop2
	}
	switch b.Parity {
	case "even":
		c.Parity = tarm.ParityEven
	case "odd":
		c.Parity = tarm.ParityOdd
	default:
		c.Parity = tarm.ParityNone
	}
	p, err := tarm.OpenPort(c)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", b.Port, err)
	}
	return p, nil
}

// portError marks an I/O failure of the port itself, as opposed to a
// device that does not answer.
type portError struct{ err error }

func (e *portError) Error() string { return "serial port: " + e.err.Error() }
func (e *portError) Unwrap() error { return e.err }

func isPortError(err error) bool {
	var pe *portError
	return errors.As(err, &pe)
}
