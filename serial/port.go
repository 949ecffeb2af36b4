package serial

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/serial/modbus"
	tarm "github.com/tarm/serial"
)

// Port is the bus's view of a serial port. The bus reads it on one
// goroutine and writes, flushes and closes it on another.
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

// reader reads a Port on its own goroutine, so that the bus can wait for a
// reply with a precise deadline: tarm/serial's read timeout only comes in
// 0.1 s steps, which would stretch a 100 ms timeout to 200 ms. Bytes that
// arrive while nobody waits are kept until the next Flush.
type reader struct {
	port     Port
	chunks   chan []byte
	failed   chan struct{} // closed when the port fails; err is then set
	err      error
	done     chan struct{}
	wg       sync.WaitGroup
	pending  []byte
	deadline time.Time
}

func newReader(p Port) *reader {
	r := &reader{port: p, chunks: make(chan []byte, 16), failed: make(chan struct{}), done: make(chan struct{})}
	r.wg.Add(1)
	go r.loop()
	return r
}

func (r *reader) loop() {
	defer r.wg.Done()
	buf := make([]byte, modbus.MaxADU)
	for {
		start := time.Now()
		n, err := r.port.Read(buf)
		if n > 0 {
			select {
			case r.chunks <- bytes.Clone(buf[:n]):
			case <-r.done:
				return
			}
		}
		if err != nil && !errors.Is(err, io.EOF) {
			r.err = err
			close(r.failed)
			return
		}
		select {
		case <-r.done:
			return
		default:
		}
		if n == 0 && time.Since(start) < time.Millisecond {
			// A hung-up tty may return EOF at once; do not spin.
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// SetReadDeadline sets when Read gives up waiting.
func (r *reader) SetReadDeadline(t time.Time) { r.deadline = t }

// Read returns received bytes, waiting until the deadline at most; it then
// returns 0 and nil. After the port failed it returns the port's error.
func (r *reader) Read(p []byte) (int, error) {
	if len(r.pending) == 0 {
		t := time.NewTimer(time.Until(r.deadline))
		defer t.Stop()
		select {
		case r.pending = <-r.chunks:
		case <-r.failed:
			return 0, r.err
		case <-t.C:
			return 0, nil
		}
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

// Write writes to the port.
func (r *reader) Write(p []byte) (int, error) { return r.port.Write(p) }

// Flush discards what was received and not read.
func (r *reader) Flush() error {
	r.pending = nil
	for {
		select {
		case <-r.chunks:
		default:
			return r.port.Flush()
		}
	}
}

// Close stops the goroutine and closes the port.
func (r *reader) Close() error {
	close(r.done)
	err := r.port.Close()
	r.wg.Wait()
	return err
}
