package modbus

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

func TestCRC16(t *testing.T) {
	tests := []struct {
		in   string
		want uint16
	}{
		// Read holding registers 0x006B..0x006D of unit 0x11, as in the
		// Modbus over Serial Line specification's examples: CRC 0x8776
		// (sent 76 87).
		{"1103006b0003", 0x8776},
		{"010300000001", 0x0A84},
		{"", 0xFFFF},
	}
	for _, tt := range tests {
		b, _ := hex.DecodeString(tt.in)
		if got := CRC16(b); got != tt.want {
			t.Errorf("CRC16(%s) = %#04x, want %#04x", tt.in, got, tt.want)
		}
	}
}

func TestEncodeKnownFrame(t *testing.T) {
	got, err := Request{Unit: 0x11, Func: FuncReadHoldingRegisters, Address: 0x6B, Quantity: 3}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if want := "1103006b00037687"; hex.EncodeToString(got) != want {
		t.Errorf("Encode = %x, want %s", got, want)
	}
}

// roundTrips are requests with the reply a slave would give, one per
// function code.
var roundTrips = []struct {
	name string
	req  Request
	resp Response
}{
	{"fc01", Request{Unit: 1, Func: FuncReadCoils, Address: 19, Quantity: 11},
		Response{Bits: []bool{true, false, true, true, false, false, true, true, true, true, false}}},
	{"fc02", Request{Unit: 2, Func: FuncReadDiscreteInputs, Address: 196, Quantity: 3},
		Response{Bits: []bool{false, false, true}}},
	{"fc03", Request{Unit: 17, Func: FuncReadHoldingRegisters, Address: 107, Quantity: 3},
		Response{Registers: []uint16{0x022B, 0, 0x64}}},
	{"fc04", Request{Unit: 247, Func: FuncReadInputRegisters, Address: 8, Quantity: 125},
		Response{Registers: make([]uint16, 125)}},
	{"fc05", Request{Unit: 3, Func: FuncWriteSingleCoil, Address: 172, Value: 0xFF00}, Response{Address: 172, Value: 0xFF00}},
	{"fc06", Request{Unit: 4, Func: FuncWriteSingleRegister, Address: 1, Value: 3}, Response{Address: 1, Value: 3}},
	{"fc15", Request{Unit: 5, Func: FuncWriteMultipleCoils, Address: 19, Bits: []bool{true, false, true, true, false, false, true, true, true, false}},
		Response{Address: 19, Quantity: 10}},
	{"fc16", Request{Unit: 6, Func: FuncWriteMultipleRegisters, Address: 1, Values: []uint16{0x000A, 0x0102}},
		Response{Address: 1, Quantity: 2}},
}

func TestRoundTrip(t *testing.T) {
	for _, tt := range roundTrips {
		t.Run(tt.name, func(t *testing.T) {
			adu, err := tt.req.Encode()
			if err != nil {
				t.Fatal(err)
			}
			if len(adu) != tt.req.RequestLen() {
				t.Errorf("request is %d bytes, RequestLen says %d", len(adu), tt.req.RequestLen())
			}
			if n := RequestFrameLen(adu); n != len(adu) {
				t.Errorf("RequestFrameLen = %d, want %d", n, len(adu))
			}
			gotReq, err := DecodeRequest(adu)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.req, gotReq, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("request round trip (-sent +decoded):\n%s", diff)
			}
			reply := EncodeResponse(gotReq, tt.resp, 0)
			if len(reply) != tt.req.ResponseLen() {
				t.Errorf("reply is %d bytes, ResponseLen says %d", len(reply), tt.req.ResponseLen())
			}
			got, err := DecodeResponse(tt.req, reply)
			if err != nil {
				t.Fatal(err)
			}
			want := tt.resp
			want.Unit, want.Func = tt.req.Unit, tt.req.Func
			if isRead(tt.req.Func) {
				want.Quantity = tt.req.Quantity
			}
			if diff := cmp.Diff(want, got, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("reply round trip (-sent +decoded):\n%s", diff)
			}
		})
	}
}

func TestDecodeResponseErrors(t *testing.T) {
	req := Request{Unit: 7, Func: FuncReadHoldingRegisters, Address: 0, Quantity: 2}
	good := EncodeResponse(req, Response{Registers: []uint16{1, 2}}, 0)
	corrupt := bytes.Clone(good)
	corrupt[3] ^= 0x10
	otherUnit := EncodeResponse(Request{Unit: 8, Func: req.Func, Quantity: 2}, Response{Registers: []uint16{1, 2}}, 0)
	short := EncodeResponse(Request{Unit: 7, Func: req.Func, Quantity: 1}, Response{Registers: []uint16{1}}, 0)
	wrongEcho := EncodeResponse(Request{Unit: 7, Func: FuncWriteSingleRegister, Address: 5, Value: 9}, Response{}, 0)
	tests := []struct {
		name string
		req  Request
		adu  []byte
		want error
	}{
		{"crc", req, corrupt, ErrCRC},
		{"other unit", req, otherUnit, ErrMismatch},
		{"wrong length", req, short, ErrFrame},
		{"too short", req, good[:4], ErrFrame},
		{"too long", req, make([]byte, 257), ErrFrame},
		{"echo differs", Request{Unit: 7, Func: FuncWriteSingleRegister, Address: 5, Value: 10}, wrongEcho, ErrMismatch},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := DecodeResponse(tt.req, tt.adu); !errors.Is(err, tt.want) {
				t.Errorf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestException(t *testing.T) {
	req := Request{Unit: 9, Func: FuncWriteSingleRegister, Address: 16, Value: 60}
	adu := EncodeResponse(req, Response{}, 2)
	if want := []byte{9, 0x86, 2}; !bytes.Equal(adu[:3], want) {
		t.Fatalf("exception frame = %x", adu)
	}
	_, err := DecodeResponse(req, adu)
	var exc *ExceptionError
	if !errors.As(err, &exc) || exc.Code != 2 {
		t.Fatalf("err = %v, want exception 2", err)
	}
	if got, want := exc.Error(), "modbus exception 2 (illegal data address)"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestValidate(t *testing.T) {
	bad := []Request{
		{Unit: 1, Func: FuncReadHoldingRegisters, Quantity: 0},
		{Unit: 1, Func: FuncReadHoldingRegisters, Quantity: 126},
		{Unit: 1, Func: FuncReadCoils, Quantity: 2001},
		{Unit: 1, Func: FuncReadHoldingRegisters, Address: 0xFFFF, Quantity: 2},
		{Unit: 1, Func: FuncWriteSingleCoil, Value: 1},
		{Unit: 1, Func: FuncWriteMultipleRegisters, Values: make([]uint16, 124)},
		{Unit: 1, Func: 0x2B},
	}
	for _, r := range bad {
		if _, err := r.Encode(); !errors.Is(err, ErrBadRequest) {
			t.Errorf("Encode(%+v) err = %v, want ErrBadRequest", r, err)
		}
	}
}

// chunkPort is a Port that hands out data in chunks of at most step bytes,
// then reports timeouts (0, io.EOF). It records the largest read asked.
type chunkPort struct {
	data    []byte
	end     error // returned once data is used up; nil: timeouts (0, io.EOF)
	step    int
	read    int
	maxWant int
}

func (p *chunkPort) Read(b []byte) (int, error) {
	p.maxWant = max(p.maxWant, len(b))
	if len(p.data) == 0 {
		if p.end != nil {
			return 0, p.end
		}
		return 0, io.EOF
	}
	n := min(len(b), p.step, len(p.data))
	copy(b, p.data[:n])
	p.data = p.data[n:]
	p.read += n
	return n, nil
}
func (p *chunkPort) Write(b []byte) (int, error) { return len(b), nil }
func (p *chunkPort) Flush() error                { return nil }
func (p *chunkPort) Close() error                { return nil }

func TestReadFrameResync(t *testing.T) {
	req := Request{Unit: 4, Func: FuncReadInputRegisters, Address: 2, Quantity: 2}
	good := EncodeResponse(req, Response{Registers: []uint16{1500, 231}}, 0)
	bad := bytes.Clone(good)
	bad[4] ^= 1
	exc := EncodeResponse(req, Response{}, 4)
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	tests := []struct {
		name string
		wire []byte
		want []byte
		err  error
	}{
		{"clean", good, good, nil},
		{"garbage first", cat([]byte{0xFF, 0x00, 4, 0x99, 4}, good), good, nil},
		{"unit byte in garbage", cat([]byte{4, 4, 4}, good), good, nil},
		{"exception", exc, exc, nil},
		{"bad crc", bad, nil, ErrCRC},
		{"truncated", good[:6], nil, ErrFrame},
		{"nothing", nil, nil, ErrTimeout},
		{"garbage only", bytes.Repeat([]byte{0x55}, 300), nil, ErrFrame},
		{"bad then good", cat(bad, good), good, nil},
	}
	for _, tt := range tests {
		for _, step := range []int{1, 3, 256} {
			p := &chunkPort{data: tt.wire, step: step}
			got, err := ReadFrame(p, req, time.Now().Add(50*time.Millisecond), 5*time.Millisecond)
			if !errors.Is(err, tt.err) || !bytes.Equal(got, tt.want) {
				t.Errorf("%s/step %d: readFrame = %x, %v; want %x, %v", tt.name, step, got, err, tt.want, tt.err)
			}
			if p.read > MaxADU {
				t.Errorf("%s/step %d: read %d bytes, more than %d", tt.name, step, p.read, MaxADU)
			}
		}
	}
}

// FuzzDecodeResponse: the decoder never panics, never accepts more than
// MaxADU bytes, and what it accepts re-encodes to the same bytes.
func FuzzDecodeResponse(f *testing.F) {
	for _, tt := range roundTrips {
		f.Add(tt.req.Func, tt.req.Quantity, EncodeResponse(tt.req, tt.resp, 0))
		f.Add(tt.req.Func, tt.req.Quantity, EncodeResponse(tt.req, tt.resp, 3))
	}
	f.Add(FuncReadHoldingRegisters, uint16(1), []byte{1, 3, 2, 0, 1})
	f.Add(FuncReadCoils, uint16(0), []byte{})
	f.Fuzz(func(t *testing.T, fc byte, qty uint16, adu []byte) {
		if len(adu) < 2 {
			return
		}
		req := Request{Unit: adu[0], Func: fc, Quantity: qty}
		switch fc {
		case FuncWriteSingleCoil, FuncWriteSingleRegister:
			if len(adu) >= 6 {
				req.Address, req.Value = uint16(adu[2])<<8|uint16(adu[3]), uint16(adu[4])<<8|uint16(adu[5])
			}
		case FuncWriteMultipleRegisters:
			req.Values = make([]uint16, qty%200)
		case FuncWriteMultipleCoils:
			req.Bits = make([]bool, qty%2000)
		}
		resp, err := DecodeResponse(req, adu)
		if err != nil {
			return
		}
		if len(adu) > MaxADU {
			t.Fatalf("accepted %d bytes", len(adu))
		}
		// Register reads re-encode exactly; bit reads may carry padding
		// bits the decoder ignores.
		if again := EncodeResponse(req, resp, 0); isRead(fc) && !isBitRead(fc) && !bytes.Equal(again, adu) {
			t.Fatalf("decoded %x, re-encoded %x", adu, again)
		}
	})
}

// FuzzReadFrame: whatever arrives on the wire, in any chunking, the frame
// reader never panics, never consumes more than MaxADU bytes, and returns
// only frames that decode.
func FuzzReadFrame(f *testing.F) {
	req := Request{Unit: 5, Func: FuncReadHoldingRegisters, Address: 0, Quantity: 3}
	good := EncodeResponse(req, Response{Registers: []uint16{1, 2, 3}}, 0)
	f.Add(good, uint8(1))
	f.Add(append([]byte{5, 3, 6, 5}, good...), uint8(2))
	f.Add(EncodeResponse(req, Response{}, 2), uint8(7))
	f.Add(bytes.Repeat([]byte{5}, 400), uint8(255))
	f.Add(good[:5], uint8(3))
	f.Fuzz(func(t *testing.T, wire []byte, step uint8) {
		// The wire then fails, so each run ends at once instead of at
		// the deadline.
		p := &chunkPort{data: wire, step: int(step%64) + 1, end: errors.New("unplugged")}
		frame, err := ReadFrame(p, req, time.Now().Add(time.Second), time.Millisecond)
		if p.read > MaxADU || p.maxWant > MaxADU {
			t.Fatalf("read %d bytes (largest read %d), limit %d", p.read, p.maxWant, MaxADU)
		}
		if err != nil {
			return
		}
		if _, err := DecodeResponse(req, frame); err != nil {
			var exc *ExceptionError
			if !errors.As(err, &exc) {
				t.Fatalf("readFrame returned %x, which does not decode: %v", frame, err)
			}
		}
	})
}
