package serial

import (
	"context"
	"fmt"
	"maps"
	"time"

	"github.com/stationedge/edged"
)

// listChange is a new device list handed to the Run goroutine, which owns
// the devices' polling state.
type listChange struct {
	devices []*device
}

// ApplyDevices takes a change of the device list (edged.DeviceSet) while
// the bus runs: this bus's added serial devices are polled at once, its
// gone ones are no longer polled, and a changed one is polled afresh with
// its new unit and profile. Every other device keeps its polling and state.
// Errors: EINVALID (nothing changed) for a unit out of 1..247 or used
// twice, or a profile missing or broken.
func (b *Bus) ApplyDevices(ctx context.Context, d edged.DeviceDiff) error {
	b.applyMu.Lock()
	defer b.applyMu.Unlock()
	bad := func(format string, a ...any) error {
		return &edged.Error{Code: edged.EINVALID, Reason: edged.ReasonInvalid,
			Message: "serial bus " + b.cfg.Bus.Name + ": " + fmt.Sprintf(format, a...)}
	}
	b.mu.Lock()
	byID := maps.Clone(b.byID)
	order := append([]*device(nil), b.devices...)
	if b.change != nil {
		order = append([]*device(nil), b.change.devices...)
	}
	profiles := b.profiles
	b.mu.Unlock()
	if profiles == nil {
		profiles = b.cfg.Profiles
	}

	mine := func(dev edged.Device) bool {
		return dev.Transport == edged.TransportSerial && dev.Bus == b.cfg.Bus.Name
	}
	drop := map[string]bool{}
	for _, g := range d.Gone() {
		drop[g.ID] = true
	}
	fresh := map[string]*device{}
	plans := map[string]*plan{}
	for _, dev := range append(append([]edged.Device{}, d.Added...), d.Changed...) {
		if !mine(dev) {
			drop[dev.ID] = true // gone to another bus or to mqtt
			continue
		}
		if dev.Unit < 1 || dev.Unit > 247 {
			return bad("device %s: unit %d is not in 1..247", dev.ID, dev.Unit)
		}
		pl, ok := plans[dev.Profile]
		if !ok {
			p, found := profiles[dev.Profile]
			if !found {
				return bad("device %s: no profile named %q", dev.ID, dev.Profile)
			}
			var err error
			if pl, err = compile(p); err != nil {
				return bad("profile %s: %v", dev.Profile, err)
			}
			plans[dev.Profile] = pl
		}
		dv := &device{dev: dev, unit: byte(dev.Unit), plan: pl, nextPoll: time.Now()}
		for _, r := range pl.reads {
			r.Unit = dv.unit
			dv.reads = append(dv.reads, r)
		}
		dv.health = edged.BusDeviceHealth{DeviceID: dev.ID, Unit: dev.Unit, State: stateUnknown.String()}
		fresh[dev.ID] = dv
	}
	var next []*device
	for _, dv := range order {
		switch id := dv.dev.ID; {
		case fresh[id] != nil:
			next = append(next, fresh[id])
			delete(fresh, id)
		case !drop[id]:
			next = append(next, dv)
		}
	}
	for _, dev := range d.Added { // list order
		if dv := fresh[dev.ID]; dv != nil {
			next = append(next, dv)
			delete(fresh, dev.ID)
		}
	}
	for _, dev := range d.Changed { // moved here from another bus
		if dv := fresh[dev.ID]; dv != nil {
			next = append(next, dv)
		}
	}
	units := map[int]string{}
	for _, dv := range next {
		if other, dup := units[int(dv.unit)]; dup {
			return bad("unit %d is used by %s and %s", dv.unit, other, dv.dev.ID)
		}
		units[int(dv.unit)] = dv.dev.ID
	}
	byID = make(map[string]*device, len(next))
	for _, dv := range next {
		byID[dv.dev.ID] = dv
	}
	b.mu.Lock()
	b.byID = byID
	b.change = &listChange{devices: next}
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
	b.log.Info("device list applied", "devices", len(next))
	return nil
}

// SetProfiles replaces the profiles that devices applied from now on use
// (a reload); a device keeps its compiled profile until it is applied as
// changed.
func (b *Bus) SetProfiles(p map[string]edged.Profile) {
	b.mu.Lock()
	b.profiles = p
	b.mu.Unlock()
}

// takeChange installs a device list handed over by ApplyDevices; Run calls
// it.
func (b *Bus) takeChange() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.change == nil {
		return
	}
	b.devices = b.change.devices
	b.change = nil
}

// device returns the device id of this bus, nil when there is none.
func (b *Bus) device(id string) *device {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.byID[id]
}

var _ edged.DeviceSet = (*Bus)(nil)

// Name is the bus's name in serial.buses.
func (b *Bus) Name() string { return b.cfg.Bus.Name }
