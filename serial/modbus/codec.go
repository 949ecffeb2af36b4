// Package modbus is edged's Modbus RTU codec: CRC-16, the requests and
// replies of function codes 01, 02, 03, 04, 05, 06, 15 and 16, exception
// replies, and a frame reader that reads a reply by its expected length
// with an overall deadline, resynchronising after garbage. No frame is
// longer than MaxADU (256 bytes) and the reader never consumes more.
package modbus

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// MaxADU is the largest Modbus RTU frame (Modbus over Serial Line V1.02,
// §2.5.1): unit, function, at most 252 bytes of data, CRC.
const MaxADU = 256

// Function codes of the Modbus application protocol that edged speaks.
const (
	FuncReadCoils              byte = 0x01
	FuncReadDiscreteInputs     byte = 0x02
	FuncReadHoldingRegisters   byte = 0x03
	FuncReadInputRegisters     byte = 0x04
	FuncWriteSingleCoil        byte = 0x05
	FuncWriteSingleRegister    byte = 0x06
	FuncWriteMultipleCoils     byte = 0x0F
	FuncWriteMultipleRegisters byte = 0x10
)

// Quantity limits of the protocol, so that every frame fits in MaxADU.
const (
	MaxReadBits       = 2000
	MaxReadRegisters  = 125
	MaxWriteBits      = 1968
	MaxWriteRegisters = 123
)

// Request is one master request. Which fields matter depends on Func:
// reads use Address and Quantity; FC05 and FC06 use Address and Value
// (FC05: 0xFF00 on, 0x0000 off); FC15 uses Address and Bits; FC16 uses
// Address and Values.
type Request struct {
	Unit     byte
	Func     byte
	Address  uint16
	Quantity uint16
	Value    uint16
	Bits     []bool
	Values   []uint16
}

// Response is a decoded reply. Registers holds FC03/FC04 data and Bits
// FC01/FC02 data (Quantity of them); writes echo Address and Value (FC05,
// FC06) or Quantity (FC15, FC16). A Modbus exception is returned as an
// *ExceptionError, never as a Response.
type Response struct {
	Unit      byte
	Func      byte
	Address   uint16
	Value     uint16
	Quantity  uint16
	Registers []uint16
	Bits      []bool
}

// ExceptionError is a Modbus exception reply.
type ExceptionError struct {
	Func byte // the request's function code
	Code byte
}

func (e *ExceptionError) Error() string {
	return fmt.Sprintf("modbus exception %d (%s)", e.Code, ExceptionName(e.Code))
}

// ExceptionName is the name the Modbus specification gives an exception code.
func ExceptionName(code byte) string {
	switch code {
	case 1:
		return "illegal function"
	case 2:
		return "illegal data address"
	case 3:
		return "illegal data value"
	case 4:
		return "server device failure"
	case 5:
		return "acknowledge"
	case 6:
		return "server device busy"
	case 8:
		return "memory parity error"
	case 10:
		return "gateway path unavailable"
	case 11:
		return "gateway target device failed to respond"
	default:
		return "unknown exception"
	}
}

// Errors of the codec and of the frame reader. They are counted apart in
// the bus health.
var (
	ErrTimeout    = errors.New("timeout")
	ErrCRC        = errors.New("crc mismatch")
	ErrFrame      = errors.New("malformed or truncated frame")
	ErrMismatch   = errors.New("reply does not match the request")
	ErrBadRequest = errors.New("bad request")
)

// CRC16 is the Modbus CRC: initial 0xFFFF, reflected polynomial 0xA001.
// It is sent low byte first.
func CRC16(b []byte) uint16 {
	crc := uint16(0xFFFF)
	for _, c := range b {
		crc = crc>>8 ^ crcTable[byte(crc)^c]
	}
	return crc
}

var crcTable = func() (t [256]uint16) {
	for i := range t {
		c := uint16(i)
		for range 8 {
			if c&1 != 0 {
				c = c>>1 ^ 0xA001
			} else {
				c >>= 1
			}
		}
		t[i] = c
	}
	return t
}()

func appendCRC(b []byte) []byte {
	return binary.LittleEndian.AppendUint16(b, CRC16(b))
}

// checkCRC reports whether frame ends with the CRC of what precedes it.
func checkCRC(frame []byte) bool {
	n := len(frame)
	return n >= 4 && CRC16(frame[:n-2]) == binary.LittleEndian.Uint16(frame[n-2:])
}

// isRead reports whether fc is one of the four read functions.
func isRead(fc byte) bool { return fc >= FuncReadCoils && fc <= FuncReadInputRegisters }

func isBitRead(fc byte) bool { return fc == FuncReadCoils || fc == FuncReadDiscreteInputs }

// Validate checks that r is a request edged can send: a known function,
// quantities within the protocol's limits, FC05 value 0xFF00 or 0.
func (r Request) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrBadRequest, fmt.Sprintf(format, a...))
	}
	last := func(q int) error {
		if int(r.Address)+q > 0x10000 {
			return bad("address %d + %d runs past 65535", r.Address, q)
		}
		return nil
	}
	switch r.Func {
	case FuncReadCoils, FuncReadDiscreteInputs:
		if r.Quantity < 1 || r.Quantity > MaxReadBits {
			return bad("read of %d bits", r.Quantity)
		}
		return last(int(r.Quantity))
	case FuncReadHoldingRegisters, FuncReadInputRegisters:
		if r.Quantity < 1 || r.Quantity > MaxReadRegisters {
			return bad("read of %d registers", r.Quantity)
		}
		return last(int(r.Quantity))
	case FuncWriteSingleCoil:
		if r.Value != 0xFF00 && r.Value != 0 {
			return bad("coil value %#x", r.Value)
		}
	case FuncWriteSingleRegister:
	case FuncWriteMultipleCoils:
		if len(r.Bits) < 1 || len(r.Bits) > MaxWriteBits {
			return bad("write of %d coils", len(r.Bits))
		}
		return last(len(r.Bits))
	case FuncWriteMultipleRegisters:
		if len(r.Values) < 1 || len(r.Values) > MaxWriteRegisters {
			return bad("write of %d registers", len(r.Values))
		}
		return last(len(r.Values))
	default:
		return bad("function code %d", r.Func)
	}
	return nil
}

// Encode returns the request's ADU, CRC included.
func (r Request) Encode() ([]byte, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, MaxADU)
	b = append(b, r.Unit, r.Func)
	b = binary.BigEndian.AppendUint16(b, r.Address)
	switch r.Func {
	case FuncWriteSingleCoil, FuncWriteSingleRegister:
		b = binary.BigEndian.AppendUint16(b, r.Value)
	case FuncWriteMultipleCoils:
		b = binary.BigEndian.AppendUint16(b, uint16(len(r.Bits)))
		b = append(b, byte((len(r.Bits)+7)/8))
		b = appendBits(b, r.Bits)
	case FuncWriteMultipleRegisters:
		b = binary.BigEndian.AppendUint16(b, uint16(len(r.Values)))
		b = append(b, byte(2*len(r.Values)))
		for _, v := range r.Values {
			b = binary.BigEndian.AppendUint16(b, v)
		}
	default:
		b = binary.BigEndian.AppendUint16(b, r.Quantity)
	}
	return appendCRC(b), nil
}

func appendBits(b []byte, bits []bool) []byte {
	for i := 0; i < len(bits); i += 8 {
		var c byte
		for j := 0; j < 8 && i+j < len(bits); j++ {
			if bits[i+j] {
				c |= 1 << j
			}
		}
		b = append(b, c)
	}
	return b
}

// ResponseLen is the length of a normal reply to r; an exception reply is
// always 5 bytes.
func (r Request) ResponseLen() int {
	switch r.Func {
	case FuncReadCoils, FuncReadDiscreteInputs:
		return 5 + (int(r.Quantity)+7)/8
	case FuncReadHoldingRegisters, FuncReadInputRegisters:
		return 5 + 2*int(r.Quantity)
	default:
		return 8
	}
}

// RequestLen is the length of r's ADU on the wire.
func (r Request) RequestLen() int {
	switch r.Func {
	case FuncWriteMultipleCoils:
		return 9 + (len(r.Bits)+7)/8
	case FuncWriteMultipleRegisters:
		return 9 + 2*len(r.Values)
	default:
		return 8
	}
}

// DecodeResponse decodes adu, a whole reply to req. It returns an
// *ExceptionError for an exception reply, ErrCRC, ErrFrame for a frame of
// the wrong shape and ErrMismatch for a well-formed reply to another
// request. It never reads outside adu and refuses anything over MaxADU.
func DecodeResponse(req Request, adu []byte) (Response, error) {
	if len(adu) > MaxADU || len(adu) < 5 {
		return Response{}, ErrFrame
	}
	if !checkCRC(adu) {
		return Response{}, ErrCRC
	}
	if adu[0] != req.Unit {
		return Response{}, ErrMismatch
	}
	if adu[1] == req.Func|0x80 {
		if len(adu) != 5 {
			return Response{}, ErrFrame
		}
		return Response{}, &ExceptionError{Func: req.Func, Code: adu[2]}
	}
	if adu[1] != req.Func {
		return Response{}, ErrMismatch
	}
	if len(adu) != req.ResponseLen() {
		return Response{}, ErrFrame
	}
	resp := Response{Unit: adu[0], Func: adu[1]}
	data := adu[2 : len(adu)-2]
	switch {
	case isRead(req.Func):
		if int(data[0]) != len(data)-1 {
			return Response{}, ErrFrame
		}
		data = data[1:]
		resp.Quantity = req.Quantity
		if isBitRead(req.Func) {
			resp.Bits = make([]bool, req.Quantity)
			for i := range resp.Bits {
				resp.Bits[i] = data[i/8]&(1<<(i%8)) != 0
			}
		} else {
			resp.Registers = make([]uint16, req.Quantity)
			for i := range resp.Registers {
				resp.Registers[i] = binary.BigEndian.Uint16(data[2*i:])
			}
		}
	default:
		resp.Address = binary.BigEndian.Uint16(data)
		second := binary.BigEndian.Uint16(data[2:])
		if resp.Address != req.Address {
			return Response{}, ErrMismatch
		}
		switch req.Func {
		case FuncWriteSingleCoil, FuncWriteSingleRegister:
			resp.Value = second
			if second != req.Value {
				return Response{}, ErrMismatch
			}
		case FuncWriteMultipleCoils:
			resp.Quantity = second
			if int(second) != len(req.Bits) {
				return Response{}, ErrMismatch
			}
		case FuncWriteMultipleRegisters:
			resp.Quantity = second
			if int(second) != len(req.Values) {
				return Response{}, ErrMismatch
			}
		}
	}
	return resp, nil
}

// DecodeRequest decodes a master's request ADU; the simulator (the slave
// side) uses it. It returns ErrCRC or ErrFrame for a bad frame and
// ErrBadRequest for a function or quantity edged does not speak.
func DecodeRequest(adu []byte) (Request, error) {
	if len(adu) > MaxADU || len(adu) < 8 {
		return Request{}, ErrFrame
	}
	if !checkCRC(adu) {
		return Request{}, ErrCRC
	}
	r := Request{Unit: adu[0], Func: adu[1], Address: binary.BigEndian.Uint16(adu[2:])}
	second := binary.BigEndian.Uint16(adu[4:])
	switch r.Func {
	case FuncReadCoils, FuncReadDiscreteInputs, FuncReadHoldingRegisters, FuncReadInputRegisters:
		r.Quantity = second
		if len(adu) != 8 {
			return Request{}, ErrFrame
		}
	case FuncWriteSingleCoil, FuncWriteSingleRegister:
		r.Value = second
		if len(adu) != 8 {
			return Request{}, ErrFrame
		}
	case FuncWriteMultipleCoils, FuncWriteMultipleRegisters:
		if len(adu) < 9 || int(adu[6]) != len(adu)-9 {
			return Request{}, ErrFrame
		}
		data := adu[7 : len(adu)-2]
		if r.Func == FuncWriteMultipleCoils {
			if (int(second)+7)/8 != len(data) {
				return Request{}, ErrFrame
			}
			r.Bits = make([]bool, second)
			for i := range r.Bits {
				r.Bits[i] = data[i/8]&(1<<(i%8)) != 0
			}
		} else {
			if 2*int(second) != len(data) {
				return Request{}, ErrFrame
			}
			r.Values = make([]uint16, second)
			for i := range r.Values {
				r.Values[i] = binary.BigEndian.Uint16(data[2*i:])
			}
		}
	default:
		return r, ErrBadRequest
	}
	if err := r.Validate(); err != nil {
		return r, err
	}
	return r, nil
}

// RequestFrameLen tells a slave how long the request starting in b is:
// the length, or 0 when b is too short to know, or -1 when b cannot start
// a request edged would send.
func RequestFrameLen(b []byte) int {
	if len(b) < 2 {
		return 0
	}
	switch b[1] {
	case FuncReadCoils, FuncReadDiscreteInputs, FuncReadHoldingRegisters, FuncReadInputRegisters,
		FuncWriteSingleCoil, FuncWriteSingleRegister:
		return 8
	case FuncWriteMultipleCoils, FuncWriteMultipleRegisters:
		if len(b) < 7 {
			return 0
		}
		n := 9 + int(b[6])
		if n > MaxADU {
			return -1
		}
		return n
	}
	return -1
}

// EncodeResponse builds the slave's reply to req: resp's data for a
// normal reply, or an exception reply when exc is not zero.
func EncodeResponse(req Request, resp Response, exc byte) []byte {
	b := make([]byte, 0, MaxADU)
	if exc != 0 {
		return appendCRC(append(b, req.Unit, req.Func|0x80, exc))
	}
	b = append(b, req.Unit, req.Func)
	switch req.Func {
	case FuncReadCoils, FuncReadDiscreteInputs:
		b = append(b, byte((len(resp.Bits)+7)/8))
		b = appendBits(b, resp.Bits)
	case FuncReadHoldingRegisters, FuncReadInputRegisters:
		b = append(b, byte(2*len(resp.Registers)))
		for _, v := range resp.Registers {
			b = binary.BigEndian.AppendUint16(b, v)
		}
	case FuncWriteSingleCoil, FuncWriteSingleRegister:
		b = binary.BigEndian.AppendUint16(b, req.Address)
		b = binary.BigEndian.AppendUint16(b, req.Value)
	case FuncWriteMultipleCoils:
		b = binary.BigEndian.AppendUint16(b, req.Address)
		b = binary.BigEndian.AppendUint16(b, uint16(len(req.Bits)))
	case FuncWriteMultipleRegisters:
		b = binary.BigEndian.AppendUint16(b, req.Address)
		b = binary.BigEndian.AppendUint16(b, uint16(len(req.Values)))
	}
	return appendCRC(b)
}
