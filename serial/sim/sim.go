// Package sim is a Modbus RTU slave simulator on a pty pair, for edged's
// tests and its demo. It serves any number of units behind one port,
// paces its replies as a real wire at the configured baud rate would, and
// can be told to misbehave: no reply, corrupted CRCs, garbage, truncated
// frames, exceptions, slow replies, and the port vanishing (Unplug) and
// coming back (Replug).
//
// The bus opens Path, a symlink that always points at the current pty's
// slave side, as a technician's /dev/serial/by-id link would.
package sim

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"github.com/stationedge/edged/serial/modbus"
)

// Table is a Modbus register table.
type Table int

// The four tables.
const (
	Coil Table = iota
	Discrete
	Holding
	Input
)

// Unit is one simulated device. Change it only inside Sim.Update.
type Unit struct {
	Coils    map[uint16]bool
	Discrete map[uint16]bool
	Holding  map[uint16]uint16
	Input    map[uint16]uint16

	// Dead units never answer.
	Dead bool
	// Exception, when not zero, answers every request with that code;
	// WriteException only the writes.
	Exception      byte
	WriteException byte
	// Delay is added before every reply, on top of the wire time.
	Delay time.Duration
	// OnWrite, when set, runs after a successful write, under the
	// simulator's lock; it may change the unit (a charger starting).
	OnWrite func(u *Unit, t Table, addr, value uint16)
}

// NewUnit returns a unit with empty tables.
func NewUnit() *Unit {
	return &Unit{Coils: map[uint16]bool{}, Discrete: map[uint16]bool{},
		Holding: map[uint16]uint16{}, Input: map[uint16]uint16{}}
}

// Faults are probabilities, per reply, of misbehaving on the whole bus.
type Faults struct {
	NoReply  float64 // the reply is not sent
	Corrupt  float64 // one bit of the reply is flipped (the CRC no longer matches)
	Garbage  float64 // random bytes precede the reply
	Truncate float64 // only the first part of the reply is sent
}

// Options configure a simulator.
type Options struct {
	// Dir holds the Path symlink; required (a test's t.TempDir()).
	Dir string
	// Baud and BitsPerChar pace the replies: (request + reply) bytes *
	// BitsPerChar / Baud, plus the 3.5-character gap. BitsPerChar
	// defaults to 10 (8N1).
	Baud        int
	BitsPerChar int
	// Seed makes the faults repeatable.
	Seed uint64
}

// Write is one write a unit accepted.
type Write struct {
	Unit  byte
	Table Table
	Addr  uint16
	Value uint16
}

// Sim is a running simulator.
type Sim struct {
	opt  Options
	path string

	mu       sync.Mutex
	units    map[byte]*Unit
	faults   Faults
	rng      *rand.Rand
	requests map[byte]int
	writes   []Write
	master   *os.File
	tty      *os.File
	wmu      sync.Mutex // one writer of the master at a time
	closed   bool
	wg       sync.WaitGroup
	stop     chan struct{}
}

// Start opens a pty pair, links Path to its slave side and serves it.
func Start(opt Options) (*Sim, error) {
	if opt.Dir == "" || opt.Baud <= 0 {
		return nil, errors.New("sim: Dir and Baud are required")
	}
	if opt.BitsPerChar == 0 {
		opt.BitsPerChar = 10
	}
	s := &Sim{
		opt:      opt,
		path:     filepath.Join(opt.Dir, "ttySIM"),
		units:    map[byte]*Unit{},
		rng:      rand.New(rand.NewPCG(opt.Seed, opt.Seed^0x5eed)),
		requests: map[byte]int{},
		stop:     make(chan struct{}),
	}
	if err := s.Replug(); err != nil {
		return nil, err
	}
	return s, nil
}

// Path is the serial port to open: a symlink to the current pty slave.
func (s *Sim) Path() string { return s.path }

// Update runs fn on unit n under the simulator's lock, creating the unit
// if needed. Units never created do not answer, like an empty address.
func (s *Sim) Update(n byte, fn func(u *Unit)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.units[n]
	if u == nil {
		u = NewUnit()
		s.units[n] = u
	}
	fn(u)
}

// Add puts u at unit address n, replacing any unit there.
func (s *Sim) Add(n byte, u *Unit) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.units[n] = u
}

// Holding returns a holding register of unit n.
func (s *Sim) Holding(n byte, addr uint16) uint16 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if u := s.units[n]; u != nil {
		return u.Holding[addr]
	}
	return 0
}

// SetFaults sets the bus-wide fault probabilities.
func (s *Sim) SetFaults(f Faults) {
	s.mu.Lock()
	s.faults = f
	s.mu.Unlock()
}

// Requests returns how many well-formed requests unit n was sent.
func (s *Sim) Requests(n byte) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests[n]
}

// Writes returns the writes accepted so far, oldest first.
func (s *Sim) Writes() []Write {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Write(nil), s.writes...)
}

// Unplug makes the port vanish: the pty is closed, so the bus's reads and
// writes fail, and Path no longer exists until Replug.
func (s *Sim) Unplug() error {
	s.mu.Lock()
	m, t := s.master, s.tty
	s.master, s.tty = nil, nil
	s.mu.Unlock()
	if m == nil {
		return nil
	}
	err := os.Remove(s.path)
	s.wmu.Lock()
	m.Close()
	s.wmu.Unlock()
	t.Close()
	return err
}

// Replug opens a new pty and points Path at it, as a USB adapter plugged
// back in.
func (s *Sim) Replug() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("sim: closed")
	}
	if s.master != nil {
		return nil
	}
	m, t, err := pty.Open()
	if err != nil {
		return fmt.Errorf("sim: open pty: %w", err)
	}
	// pty.Open leaves the master in blocking mode (it called Fd); a
	// pollable copy lets Close interrupt a pending Read.
	fd, err := syscall.Dup(int(m.Fd()))
	m.Close()
	if err == nil {
		err = syscall.SetNonblock(fd, true)
	}
	if err != nil {
		t.Close()
		return fmt.Errorf("sim: pty master: %w", err)
	}
	master := os.NewFile(uintptr(fd), "/dev/ptmx")
	_ = os.Remove(s.path)
	if err := os.Symlink(t.Name(), s.path); err != nil {
		master.Close()
		t.Close()
		return fmt.Errorf("sim: link %s: %w", s.path, err)
	}
	s.master, s.tty = master, t
	s.wg.Add(1)
	go s.serve(master)
	return nil
}

// Close stops the simulator and waits for its goroutines.
func (s *Sim) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	close(s.stop)
	s.mu.Unlock()
	err := s.Unplug()
	s.wg.Wait()
	return err
}

func (s *Sim) charTime() time.Duration {
	return time.Duration(s.opt.BitsPerChar) * time.Second / time.Duration(s.opt.Baud)
}

// serve reads requests from master until it is closed. Requests are
// framed by their length, as the function code tells it; a frame with a
// bad CRC is dropped a byte at a time, as a slave's resync would.
func (s *Sim) serve(master *os.File) {
	defer s.wg.Done()
	var buf []byte
	tmp := make([]byte, modbus.MaxADU)
	for {
		n, err := master.Read(tmp)
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return
			}
			select {
			case <-s.stop:
				return
			case <-time.After(5 * time.Millisecond): // EIO while no slave is open
			}
			continue
		}
		buf = append(buf, tmp[:n]...)
		for len(buf) > 0 {
			l := modbus.RequestFrameLen(buf)
			if l == 0 || l > len(buf) {
				break
			}
			if l < 0 {
				buf = buf[1:]
				continue
			}
			req, err := modbus.DecodeRequest(buf[:l])
			if errors.Is(err, modbus.ErrCRC) || errors.Is(err, modbus.ErrFrame) {
				buf = buf[1:]
				continue
			}
			reqLen := l
			buf = buf[l:]
			s.handle(master, req, reqLen, err)
		}
		if len(buf) > 2*modbus.MaxADU {
			buf = nil
		}
	}
}

// handle answers one request after the time the wire would take.
func (s *Sim) handle(master *os.File, req modbus.Request, reqLen int, decodeErr error) {
	s.mu.Lock()
	u := s.units[req.Unit]
	if u == nil || u.Dead || req.Unit == 0 {
		if u != nil {
			s.requests[req.Unit]++
		}
		s.mu.Unlock()
		return
	}
	s.requests[req.Unit]++
	reply := s.reply(u, req, decodeErr)
	delay := u.Delay
	f := s.faults
	roll := func(p float64) bool { return p > 0 && s.rng.Float64() < p }
	switch {
	case roll(f.NoReply):
		reply = nil
	case roll(f.Corrupt):
		reply[s.rng.IntN(len(reply))] ^= 1 << s.rng.IntN(8)
	case roll(f.Garbage):
		g := make([]byte, 1+s.rng.IntN(8))
		for i := range g {
			g[i] = byte(s.rng.Uint32())
		}
		reply = append(g, reply...)
	case roll(f.Truncate):
		reply = reply[:1+s.rng.IntN(len(reply)-1)]
	}
	s.mu.Unlock()
	if reply == nil {
		return
	}
	ct := s.charTime()
	gap := ct * 7 / 2
	if s.opt.Baud > 19200 {
		gap = 1750 * time.Microsecond
	}
	wire := time.Duration(reqLen+len(reply))*ct + gap + delay
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTimer(wire)
		defer t.Stop()
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		s.wmu.Lock()
		defer s.wmu.Unlock()
		master.Write(reply) // after Unplug the write fails, as on a dead wire
	}()
}

// reply computes the unit's answer to req; s.mu is held.
func (s *Sim) reply(u *Unit, req modbus.Request, decodeErr error) []byte {
	exc := func(code byte) []byte { return modbus.EncodeResponse(req, modbus.Response{}, code) }
	if decodeErr != nil {
		return exc(1)
	}
	if u.Exception != 0 {
		return exc(u.Exception)
	}
	write := req.Func == modbus.FuncWriteSingleCoil || req.Func == modbus.FuncWriteSingleRegister ||
		req.Func == modbus.FuncWriteMultipleCoils || req.Func == modbus.FuncWriteMultipleRegisters
	if write && u.WriteException != 0 {
		return exc(u.WriteException)
	}
	var resp modbus.Response
	bitsOf := func(m map[uint16]bool) bool {
		for i := range int(req.Quantity) {
			v, ok := m[req.Address+uint16(i)]
			if !ok {
				return false
			}
			resp.Bits = append(resp.Bits, v)
		}
		return true
	}
	wordsOf := func(m map[uint16]uint16) bool {
		for i := range int(req.Quantity) {
			v, ok := m[req.Address+uint16(i)]
			if !ok {
				return false
			}
			resp.Registers = append(resp.Registers, v)
		}
		return true
	}
	ok := true
	var writes []Write
	switch req.Func {
	case modbus.FuncReadCoils:
		ok = bitsOf(u.Coils)
	case modbus.FuncReadDiscreteInputs:
		ok = bitsOf(u.Discrete)
	case modbus.FuncReadHoldingRegisters:
		ok = wordsOf(u.Holding)
	case modbus.FuncReadInputRegisters:
		ok = wordsOf(u.Input)
	case modbus.FuncWriteSingleCoil:
		writes = []Write{{req.Unit, Coil, req.Address, req.Value}}
	case modbus.FuncWriteSingleRegister:
		writes = []Write{{req.Unit, Holding, req.Address, req.Value}}
	case modbus.FuncWriteMultipleCoils:
		for i, b := range req.Bits {
			v := uint16(0)
			if b {
				v = 0xFF00
			}
			writes = append(writes, Write{req.Unit, Coil, req.Address + uint16(i), v})
		}
	case modbus.FuncWriteMultipleRegisters:
		for i, v := range req.Values {
			writes = append(writes, Write{req.Unit, Holding, req.Address + uint16(i), v})
		}
	}
	for _, w := range writes {
		if w.Table == Coil {
			_, ok = u.Coils[w.Addr]
		} else {
			_, ok = u.Holding[w.Addr]
		}
		if !ok {
			break
		}
	}
	if !ok {
		return exc(2)
	}
	for _, w := range writes {
		if w.Table == Coil {
			u.Coils[w.Addr] = w.Value != 0
		} else {
			u.Holding[w.Addr] = w.Value
		}
		s.writes = append(s.writes, w)
		if u.OnWrite != nil {
			u.OnWrite(u, w.Table, w.Addr, w.Value)
		}
	}
	return modbus.EncodeResponse(req, resp, 0)
}

// Charger returns a unit that behaves as the contract's charger-v1
// profile describes: status in holding 0 (0 idle, 1 in use, 2 fault),
// power_w in input 2, temp_c*10 in input 3; writing holding 16 (the
// duration) starts it, writing holding 17 stops it.
func Charger() *Unit {
	u := NewUnit()
	u.Holding[0] = 0
	u.Holding[16] = 0
	u.Holding[17] = 0
	u.Input[2] = 0
	u.Input[3] = 215
	u.OnWrite = func(u *Unit, t Table, addr, value uint16) {
		if t != Holding {
			return
		}
		switch addr {
		case 16:
			if value > 0 {
				u.Holding[0], u.Input[2] = 1, 7200
			}
		case 17:
			u.Holding[0], u.Input[2] = 0, 0
		}
	}
	return u
}
