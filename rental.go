package edged

import "time"

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
