package edged

import "time"

// StoreWrites counts what a store's write transactions cost the disk and
// what they carried, since the store opened. An SD card wears and a
// customer waits per fsync, not per change: these say how well changes
// share them.
type StoreWrites struct {
	// Txs is the write transactions committed, by the operation that ran
	// them: "commit" (Commit calls, grouped or not), "ack" (an Ack no
	// commit carried), "device_flush" (the periodic flush of device
	// states), "device_now" (SaveDeviceStateNow), "prune" (release of
	// delivered events, log prune), "retention" (records past
	// retention), "registry" (the applied registry) and "open".
	Txs map[string]uint64
	// Fsyncs is the fsync and fdatasync calls those transactions made: two
	// per transaction (its pages, then its meta page) and one more per
	// growth of the file (Grows).
	Fsyncs uint64
	Grows  uint64
	// Commits, Acks and DeviceStates are the operations the transactions
	// made durable: Commit calls, Ack calls, device states written.
	Commits, Acks, DeviceStates uint64
	// WriteTime is how long each of those transactions took to reach the
	// disk: its pages written and synced, then its meta page. A grant
	// waits for one; a failing SD card shows here first.
	WriteTime DurationHistogram
}

// WriteTimeBounds are the upper bounds of StoreWrites.WriteTime's
// buckets: a healthy disk syncs in about a millisecond, a tired SD card
// in tens.
var WriteTimeBounds = [...]time.Duration{
	250 * time.Microsecond, 500 * time.Microsecond, time.Millisecond, 2 * time.Millisecond,
	5 * time.Millisecond, 10 * time.Millisecond, 20 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, time.Second,
}

// DurationHistogram counts durations by bucket.
type DurationHistogram struct {
	// Bounds are the buckets' upper bounds, ascending.
	Bounds []time.Duration
	// Counts has one more entry than Bounds: Counts[i] counts the
	// durations in (Bounds[i-1], Bounds[i]], the last those above every
	// bound.
	Counts []uint64
	// Sum is the total of the durations counted.
	Sum time.Duration
}

// Count returns how many durations h counted.
func (h DurationHistogram) Count() uint64 {
	var n uint64
	for _, c := range h.Counts {
		n += c
	}
	return n
}

// Tx returns the total of Txs.
func (w StoreWrites) Tx() uint64 {
	var n uint64
	for _, v := range w.Txs {
		n += v
	}
	return n
}
