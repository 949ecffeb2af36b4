package main

import "golang.org/x/sys/unix"

// kernelClockSynced reports what timedatectl shows as "System clock
// synchronized": adjtimex, read only, without STA_UNSYNC.
func kernelClockSynced() bool {
	var tx unix.Timex
	state, err := unix.Adjtimex(&tx)
	if err != nil {
		return false
	}
	return state != unix.TIME_ERROR && tx.Status&unix.STA_UNSYNC == 0
}
