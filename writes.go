package edged

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
}

// Tx returns the total of Txs.
func (w StoreWrites) Tx() uint64 {
	var n uint64
	for _, v := range w.Txs {
		n += v
	}
	return n
}
