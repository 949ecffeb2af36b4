package edged

import (
	"strconv"
	"time"
)

// RentalState is where a rental is in its life.
type RentalState string

// Rental states. A granted rental is starting until its device acknowledges
// start, then active until it ends. A refused grant is kept as rejected, so a
// redelivery reports the same result.
const (
	RentalStarting RentalState = "starting"
	RentalActive   RentalState = "active"
	RentalEnded    RentalState = "ended"
	RentalRejected RentalState = "rejected"
)

// Rental is a rental as the station stores it: the grant, where it is in its
// life, and the checkpoint from which it resumes after a restart.
type Rental struct {
	ID       string      `json:"rental_id"`
	DeviceID string      `json:"device_id"`
	RenterID string      `json:"renter_id"`
	State    RentalState `json:"state"`
	// Duration is the total granted duration, extends included.
	Duration  time.Duration `json:"duration_ns"`
	GrantedAt time.Time     `json:"granted_at"`
	// Reason is why a grant was rejected or why the rental ended.
	Reason    Reason    `json:"reason,omitempty"`
	StartedAt time.Time `json:"started_at,omitzero"`
	EndsAt    time.Time `json:"ends_at,omitzero"`
	EndedAt   time.Time `json:"ended_at,omitzero"`
	// Used is how long the rental had run at CheckpointAt.
	Used         time.Duration `json:"used_ns"`
	CheckpointAt time.Time     `json:"checkpoint_at,omitzero"`
	// CheckpointSynced tells whether the wall clock was synchronized at
	// CheckpointAt, so that the downtime after it can be measured.
	CheckpointSynced bool `json:"checkpoint_synced"`
	// StartCmdID is the cmd_id of the start command awaiting its ack.
	StartCmdID string `json:"start_cmd_id,omitempty"`
	// Via is ViaDevice for a grant relayed by its device (§2), else empty.
	Via string `json:"via,omitempty"`
}

// Remaining is the time the rental still has to run, given how long it has
// been used.
func (r Rental) Remaining(used time.Duration) time.Duration {
	if d := r.Duration - used; d > 0 {
		return d
	}
	return 0
}

// CommandRecord is the idempotency record of a renter command: its result
// once known.
type CommandRecord struct {
	CmdID    string    `json:"cmd_id"`
	DeviceID string    `json:"device_id"`
	RenterID string    `json:"renter_id"`
	Action   string    `json:"action"`
	Done     bool      `json:"done"`
	OK       bool      `json:"ok"`
	Reason   Reason    `json:"reason,omitempty"`
	Error    string    `json:"error,omitempty"`
	At       time.Time `json:"at"`
}

// ResultRecord is the result a rental message got, kept so that a
// redelivery of the same message re-reports it (§3.1) whenever it comes:
// after the rental ended, past its not_after, after a restart.
type ResultRecord struct {
	RentalID string `json:"rental_id"`
	Op       string `json:"op"`
	// DurationS is the extend's duration_s; 0 for grant and cancel, which
	// are idempotent by rental id alone.
	DurationS int64     `json:"duration_s"`
	DeviceID  string    `json:"device_id"`
	OK        bool      `json:"ok"`
	Reason    Reason    `json:"reason,omitempty"`
	At        time.Time `json:"at"`
}

// Key is the record's key: see ResultKey.
func (r ResultRecord) Key() string { return ResultKey(r.RentalID, r.Op, r.DurationS) }

// ResultKey names the message a result answers: op, rental id and, for an
// extend, its duration_s. A grant or cancel is the same message whatever
// its duration, so a grant redelivered with another duration still does
// not start the device twice. Ids hold no control characters, so the
// separator is unambiguous.
func ResultKey(rentalID, op string, durationS int64) string {
	if op != OpExtend {
		durationS = 0
	}
	return op + "\x00" + rentalID + "\x00" + strconv.FormatInt(durationS, 10)
}

// StopRecord is a stop the station still has to deliver to a device (§4):
// kept until the device acknowledges a stop with ok true or reports idle,
// across restarts.
type StopRecord struct {
	DeviceID string `json:"device_id"`
	// RentalID is the rental that ended; empty for unrented use.
	RentalID string    `json:"rental_id,omitempty"`
	Since    time.Time `json:"since"`
	// Done deletes the record: the stop was delivered.
	Done bool `json:"-"`
}
