package local

import (
	"bytes"
	"context"
	"fmt"
	"maps"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/crypto/bcrypt"

	"github.com/stationedge/edged"
)

// device returns the configured MQTT device id, nil when there is none.
func (b *Broker) device(id string) *device {
	return (*b.devices.Load())[id]
}

// joinHashes returns the device's accepted bcrypt hashes joined by
// newlines, as the secrets table keeps them.
func joinHashes(d edged.Device) ([]byte, error) {
	hs := d.Hashes()
	if len(hs) == 0 {
		return nil, &edged.Error{Code: edged.EINVALID, Message: fmt.Sprintf("local: device %q has no secret_hash", d.ID)}
	}
	for _, h := range hs {
		if _, err := bcrypt.Cost([]byte(h)); err != nil {
			return nil, &edged.Error{Code: edged.EINVALID, Message: fmt.Sprintf("local: device %q: secret_hash is not a bcrypt hash", d.ID)}
		}
	}
	return []byte(joinLines(hs)), nil
}

func joinLines(hs []string) string {
	var buf bytes.Buffer
	for i, h := range hs {
		if i > 0 {
			buf.WriteByte('\n')
		}
		buf.WriteString(h)
	}
	return buf.String()
}

// ApplyDevices takes a change of the device list (edged.DeviceSet) while
// serving: added MQTT devices may log in at once; a gone device and one
// whose secrets changed are disconnected (the first can no longer log in,
// the second must log in again, with bcrypt: its verifier covered the old
// hash). Every other session is kept. A retiring device (removed with a
// rental running) keeps its session until the station lets it go, so it
// hears its stop. Errors: EINVALID for an entry without a bcrypt hash,
// and nothing is changed.
func (b *Broker) ApplyDevices(ctx context.Context, d edged.DeviceDiff) error {
	b.applyMu.Lock()
	defer b.applyMu.Unlock()
	devices := maps.Clone(*b.devices.Load())
	b.secrets.mu.RLock()
	hashes := maps.Clone(b.secrets.hashes)
	b.secrets.mu.RUnlock()

	var drop []string
	remove := func(id string) {
		if _, ok := devices[id]; ok {
			delete(devices, id)
			delete(hashes, id)
			drop = append(drop, id)
		}
	}
	for _, dev := range d.Gone() {
		remove(dev.ID)
	}
	for _, dev := range append(append([]edged.Device{}, d.Added...), d.Changed...) {
		if dev.Transport != edged.TransportMQTT {
			remove(dev.ID) // now a serial device
			continue
		}
		if !edged.ValidDeviceID(dev.ID) {
			return edged.Errorf(edged.EINVALID, "local: invalid device id %q", dev.ID)
		}
		h, err := joinHashes(dev)
		if err != nil {
			return err
		}
		if _, ok := devices[dev.ID]; !ok {
			devices[dev.ID] = &device{id: dev.ID, limit: newRateLimit(b.cfg.MaxPublishRate)}
		} else if !bytes.Equal(hashes[dev.ID], h) {
			drop = append(drop, dev.ID) // must log in with the new secrets
		}
		hashes[dev.ID] = h
	}
	old := *b.devices.Load()
	// Secrets first: a device dropped below cannot come back in between
	// with a secret that no longer holds.
	b.secrets.setHashes(hashes)
	b.devices.Store(&devices)
	for _, id := range drop {
		b.disconnect(old[id], devices[id] == nil)
	}
	if len(drop) > 0 {
		b.log.Info("device list applied: sessions closed", "closed", len(drop))
	}
	return nil
}

// disconnect closes the live session of dev, if any. For a device no
// longer configured, the broker marks it offline here: OnDisconnect no
// longer finds it.
func (b *Broker) disconnect(dev *device, gone bool) {
	if dev == nil {
		return
	}
	var cl *mqtt.Client
	if gone {
		dev.mu.Lock()
		cl = dev.current.Swap(nil)
		if cl != nil {
			b.connected.Add(-1)
		}
		dev.mu.Unlock()
	} else {
		cl = dev.current.Load()
	}
	if cl == nil {
		return
	}
	b.drops.Add(1)
	b.log.Info("device disconnected: the device list changed", "device", dev.id, "removed", gone)
	if cl.Properties.ProtocolVersion == 5 {
		_ = b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
	} else {
		cl.Stop(errDeviceListChanged)
	}
}

// ListDrops counts the sessions closed by device list changes.
func (b *Broker) ListDrops() uint64 { return b.drops.Load() }

var _ edged.DeviceSet = (*Broker)(nil)
