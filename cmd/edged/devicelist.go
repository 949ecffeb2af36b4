package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/stationedge/edged"
	"github.com/stationedge/edged/local/web"
	"github.com/stationedge/edged/systemd"
	"go.yaml.in/yaml/v3"
)

// deviceLists is the daemon's side of a changing device list: a reload
// (SIGHUP, §9) and a registry from the cloud (§3.6) both end in
// Main.applyDevices, the one path that tells the station, the command
// router, the broker and the buses.
type deviceLists struct {
	mu sync.Mutex // one change at a time, reload or registry
	// running is the config in force: the file's at start, with the
	// devices, profiles and users of every reload since.
	running edged.Config
	applied *edged.AppliedRegistry // the registry in force, nil when none
	// settle is the list to apply once the parts are built, when removed
	// devices with rentals were restored beside it (startDevices).
	settle []edged.Device

	stMu   sync.Mutex // guards source
	source DeviceSource
}

// DeviceSource says where the device list came from, and the last refused
// change, for the status page and STATUS=.
type DeviceSource struct {
	// From is "config" or "registry".
	From      string    `json:"from"`
	Version   uint64    `json:"version,omitempty"`
	AppliedAt time.Time `json:"applied_at"`
	// LastRefusal is the last reload or registry refused, nil when none.
	LastRefusal *Refusal `json:"last_refusal,omitempty"`
}

// Refusal is a refused reload or registry.
type Refusal struct {
	At      time.Time `json:"at"`
	What    string    `json:"what"` // "reload" or "registry"
	Version uint64    `json:"version,omitempty"`
	Reason  string    `json:"reason"`
	Errors  []string  `json:"errors,omitempty"`
}

// Source returns where the device list came from and the last refusal.
func (m *Main) Source() DeviceSource {
	m.devs.stMu.Lock()
	defer m.devs.stMu.Unlock()
	s := m.devs.source
	if s.LastRefusal != nil {
		r := *s.LastRefusal
		s.LastRefusal = &r
	}
	return s
}

func (m *Main) setSource(f func(*DeviceSource)) {
	m.devs.stMu.Lock()
	defer m.devs.stMu.Unlock()
	f(&m.devs.source)
}

// startDevices decides the device list edged starts with: with
// devices_from cloud, the applied registry kept in the store replaces the
// config file's devices. Removed devices whose rentals still ran at the
// last stop come back beside the list, so the station resumes those
// rentals; settleDevices then removes them again, as retiring.
func (m *Main) startDevices(ctx context.Context, cfg edged.Config) []edged.Device {
	list := m.listAtStart(ctx, cfg)
	retiring, err := m.Store.Retiring(ctx)
	if err != nil {
		m.Logger.Error("removed devices with rentals unreadable: their rentals end now", "err", err)
	}
	out := slices.Clone(list)
	for _, r := range retiring {
		if !slices.ContainsFunc(list, func(d edged.Device) bool { return d.ID == r.ID }) {
			out = append(out, r)
		}
	}
	if len(out) > len(list) {
		m.devs.settle = list
		if m.devs.settle == nil {
			m.devs.settle = []edged.Device{}
		}
	}
	return out
}

// settleDevices removes again the devices startDevices restored for their
// rentals; call it once the station is open and the links are built.
func (m *Main) settleDevices(ctx context.Context) {
	if m.devs.settle == nil {
		return
	}
	m.devs.mu.Lock()
	defer m.devs.mu.Unlock()
	d, err := m.applyDevices(ctx, m.devs.settle, nil)
	if err != nil {
		m.Logger.Error("restored removed devices", "err", err)
	}
	m.devs.settle = nil
	m.Logger.Info("removed devices kept until their rentals end", "retiring", len(d.Retiring))
}

// listAtStart is the device list of the config, or of the stored registry.
func (m *Main) listAtStart(ctx context.Context, cfg edged.Config) []edged.Device {
	m.devs.running = cfg
	m.devs.source = DeviceSource{From: "config", AppliedAt: m.StartedAt}
	if cfg.DevicesFrom != edged.DevicesFromCloud {
		return cfg.Devices
	}
	r, ok, err := m.Store.Registry(ctx)
	if err != nil {
		m.Logger.Error("stored device registry unreadable: starting with the config's devices", "err", err)
		return cfg.Devices
	}
	if !ok {
		return cfg.Devices
	}
	devs, idx, why := parseRegistryDevices(cfg, r.Devices)
	if why != "" {
		m.Logger.Error("stored device registry no longer fits the config: starting with the config's devices",
			"version", r.Version, "index", idx, "reason", why)
		return cfg.Devices
	}
	m.devs.applied = &r
	m.devs.running.Devices = devs
	m.devs.source = DeviceSource{From: "registry", Version: r.Version, AppliedAt: r.AppliedAt}
	m.Logger.Info("devices from the stored registry", "version", r.Version, "devices", len(devs))
	return devs
}

// applyDevices makes devs the device list of every part, station first: a
// removed device takes no new rental from that moment, and an added one is
// known to the station before it can connect. Then the command router,
// the broker and the buses. profiles, when not nil, replace the serial
// profiles; a serial device whose profile changed is applied as changed.
// Call with m.devs.mu held.
func (m *Main) applyDevices(ctx context.Context, devs []edged.Device, profiles map[string]edged.Profile) (edged.DeviceDiff, error) {
	// The devices this change removes are kept in the store first: one
	// still rented when edged stops must come back to end its rental.
	if pre := edged.DiffDevices(m.Station.Devices(), devs); len(pre.Removed) > 0 {
		m.saveRetiring(ctx, append(m.Station.RetiringDevices(), pre.Removed...))
	}
	d, err := m.Station.ApplyDevices(ctx, devs)
	if err != nil {
		return d, err
	}
	if len(d.Removed) > 0 {
		m.saveRetiring(ctx, m.Station.RetiringDevices())
	}
	links := d
	if profiles != nil {
		old := m.devs.running.Profiles
		for _, id := range d.Unchanged {
			for _, dev := range devs {
				if dev.ID == id && dev.Transport == edged.TransportSerial && !reflect.DeepEqual(old[dev.Profile], profiles[dev.Profile]) {
					links.Changed = append(links.Changed, dev)
				}
			}
		}
		for _, b := range m.Buses {
			b.SetProfiles(profiles)
		}
		m.devs.running.Profiles = profiles
	}
	m.devs.running.Devices = devs
	m.applyLinks(ctx, links)
	return d, nil
}

// applyLinks tells the router, the broker and the buses. Their errors are
// logged: the list was validated whole before, so one means a bug, and
// the other parts must still learn the change.
func (m *Main) applyLinks(ctx context.Context, d edged.DeviceDiff) {
	m.router.apply(d, m)
	if err := m.Broker.ApplyDevices(ctx, d); err != nil {
		m.Logger.Error("local broker refused the device list", "err", err)
	}
	for _, b := range m.Buses {
		if err := b.ApplyDevices(ctx, d); err != nil {
			m.Logger.Error("serial bus refused the device list", "err", err)
		}
	}
}

// saveRetiring keeps devs as the removed devices to restore at start; a
// failure is logged: it costs only the rentals of those devices, ended at
// the next start instead of resumed.
func (m *Main) saveRetiring(ctx context.Context, devs []edged.Device) {
	if err := m.Store.SaveRetiring(ctx, devs); err != nil {
		m.Logger.Warn("removed devices with rentals not saved", "err", err)
	}
}

// retireLoop drops from the links the removed devices the station let go:
// their rental ended and its stop was delivered.
func (m *Main) retireLoop(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-m.Station.RetiredNotify():
		}
		gone := m.Station.Retired()
		if len(gone) == 0 {
			continue
		}
		m.devs.mu.Lock()
		m.applyLinks(ctx, edged.DeviceDiff{Removed: gone})
		m.saveRetiring(ctx, m.Station.RetiringDevices())
		m.devs.mu.Unlock()
	}
}

// Reload re-reads the config file (SIGHUP, §9). Devices (with
// devices_from config), profiles and http.users take effect at once; any
// other changed key is logged as needing a restart and keeps its old
// value. A config with errors is refused whole: every error is logged
// with its line, shown on the status page and in STATUS=, and the old
// config keeps running.
func (m *Main) Reload(ctx context.Context) error {
	m.devs.mu.Lock()
	defer m.devs.mu.Unlock()
	log := m.Logger.With("system", "reload")
	cfg, err := loadConfig(m.ConfigPath)
	old := m.devs.running
	if err == nil && old.DevicesFrom != edged.DevicesFromCloud {
		// Devices are checked against what runs: a new bus needs a
		// restart, so a device on it cannot be served yet.
		check := old
		check.Profiles = cfg.Profiles
		if fes := check.ValidateDevices(cfg.Devices, "devices"); len(fes) > 0 {
			err = m.withLines(fes, "(serial.buses change at the next restart)")
		}
	}
	if err != nil {
		lines := errorLines(err)
		for _, l := range lines {
			log.Error("reload refused: the old config keeps running", "error", l)
		}
		m.setSource(func(s *DeviceSource) {
			s.LastRefusal = &Refusal{At: time.Now().UTC(), What: "reload", Reason: "invalid", Errors: lines}
		})
		_ = systemd.Status(m.statusLine())
		return err
	}
	for _, k := range restartKeys(old, cfg) {
		log.Warn("config key changed: it takes effect at the next restart, the old value is kept", "key", k)
	}
	if m.HTTP != nil && !reflect.DeepEqual(old.HTTP.Users, cfg.HTTP.Users) {
		if err := m.HTTP.SetUsers(cfg.HTTP.Users); err != nil {
			log.Error("http.users not applied", "err", err)
		} else {
			m.devs.running.HTTP.Users = cfg.HTTP.Users
			log.Info("http.users applied", "users", len(cfg.HTTP.Users))
		}
	}
	devs := m.devs.running.Devices
	if old.DevicesFrom != edged.DevicesFromCloud {
		devs = cfg.Devices
	} else if !reflect.DeepEqual(m.Config.Devices, cfg.Devices) {
		log.Info("devices in the config file are ignored: devices_from is cloud")
	}
	d, err := m.applyDevices(ctx, devs, cfg.Profiles)
	if err != nil {
		return err
	}
	if old.DevicesFrom != edged.DevicesFromCloud {
		m.setSource(func(s *DeviceSource) { s.From, s.Version, s.AppliedAt = "config", 0, time.Now().UTC() })
	}
	m.setSource(func(s *DeviceSource) { s.LastRefusal = nil })
	_ = systemd.Status(m.statusLine())
	log.Info("config reloaded", "added", len(d.Added), "removed", len(d.Removed), "changed", len(d.Changed),
		"retiring", len(d.Retiring))
	return nil
}

// withLines turns errors found against the running config into the
// config file's errors with their lines.
func (m *Main) withLines(fes edged.ConfigErrors, note string) error {
	ce := &configErrors{File: m.ConfigPath}
	var root yaml.Node
	data, _ := os.ReadFile(m.ConfigPath)
	_ = yaml.Unmarshal(data, &root)
	idx := indexNode(&root)
	for _, fe := range fes {
		ce.Errs = append(ce.Errs, configError{Line: idx.line(fe.Path), Path: fe.Path, Message: fe.Message + " " + note})
	}
	return ce
}

// restartKeys names the top-level keys (http.listen apart) that differ
// between a and b, leaving out what a reload applies.
func restartKeys(a, b edged.Config) []string {
	var out []string
	diff := func(name string, x, y any) {
		if !reflect.DeepEqual(x, y) {
			out = append(out, name)
		}
	}
	diff("station", a.Station, b.Station)
	diff("data_dir", a.DataDir, b.DataDir)
	diff("local", a.Local, b.Local)
	diff("uplink", a.Uplink, b.Uplink)
	diff("rentals", a.Rentals, b.Rentals)
	diff("clock", a.Clock, b.Clock)
	diff("http.listen", a.HTTP.Listen, b.HTTP.Listen)
	diff("serial", a.Serial, b.Serial)
	diff("devices_from", a.DevicesFrom, b.DevicesFrom)
	return out
}

// errorLines splits a config error into its lines.
func errorLines(err error) []string {
	var out []string
	for l := range bytes.SplitSeq([]byte(err.Error()), []byte("\n")) {
		if len(l) > 0 {
			out = append(out, string(l))
		}
	}
	return out
}

// statusLine is systemd's STATUS=: the devices, rentals and uplink, and a
// refused reload or registry while it is the last word.
func (m *Main) statusLine() string {
	online, total := m.Station.Online()
	s := fmt.Sprintf("%d/%d devices online, %d rentals, uplink %s",
		online, total, len(m.Station.ActiveRentals()), m.uplinkState())
	if r := m.Source().LastRefusal; r != nil {
		s += fmt.Sprintf("; %s refused (%s)", r.What, r.Reason)
		if len(r.Errors) > 0 {
			s += ": " + r.Errors[0]
		}
	}
	return s
}

// registryHandler takes the registries of R/S/down/registry (§3.6).
type registryHandler struct{ m *Main }

// Registry applies a registry: verified, validated whole, saved durably,
// applied to every part, and answered with registry.result. It returns
// nil once the registry (when applied) and its result are durable, so the
// uplink may acknowledge it.
func (h registryHandler) Registry(ctx context.Context, payload []byte) error {
	m := h.m
	m.devs.mu.Lock()
	defer m.devs.mu.Unlock()
	ctx = context.WithoutCancel(ctx) // a registry, once begun, is applied whole
	log := m.Logger.With("system", "registry")
	msg, perr := edged.ParseRegistryMessage(payload)
	res := edged.RegistryResultData{Version: msg.Version}
	refuse := func(reason edged.Reason, idx *int, detail string) error {
		res.OK, res.Reason, res.Index, res.Detail = false, reason, idx, detail
		log.Warn("registry refused", "version", msg.Version, "reason", reason, "index", idx, "detail", detail)
		m.setSource(func(s *DeviceSource) {
			s.LastRefusal = &Refusal{At: time.Now().UTC(), What: "registry", Version: msg.Version, Reason: string(reason)}
			if detail != "" {
				s.LastRefusal.Errors = []string{detail}
			}
		})
		return m.Station.RecordEvent(ctx, edged.EventRegistryResult, res)
	}
	cfg := m.devs.running
	switch {
	case perr != nil:
		return refuse(edged.ReasonInvalid, nil, perr.Error())
	case cfg.DevicesFrom != edged.DevicesFromCloud || cfg.Rentals.VerifyKey == "":
		return refuse(edged.ReasonUnsupported, nil, "")
	}
	key, err := edged.ParseVerifyKey(cfg.Rentals.VerifyKey)
	if err != nil {
		return refuse(edged.ReasonUnsupported, nil, "")
	}
	if err := edged.VerifyRegistry(key, cfg.Station.ID, msg); err != nil {
		return refuse(edged.ReasonBadSignature, nil, "")
	}
	if a := m.devs.applied; a != nil {
		switch {
		case msg.Version == a.Version:
			// A redelivery: the same result again, nothing changes.
			return m.Station.RecordEvent(ctx, edged.EventRegistryResult, a.Result)
		case msg.Version < a.Version:
			return refuse(edged.ReasonStale, nil, fmt.Sprintf("version %d is applied", a.Version))
		}
	}
	devs, idx, why := parseRegistryDevices(cfg, msg.Devices)
	if why != "" {
		return refuse(edged.ReasonInvalid, idx, why)
	}
	d := edged.DiffDevices(m.Station.Devices(), devs)
	res = edged.RegistryResultData{Version: msg.Version, OK: true, Added: len(d.Added), Removed: len(d.Removed), Changed: len(d.Changed)}
	rec := edged.AppliedRegistry{Version: msg.Version, Devices: msg.Devices, AppliedAt: time.Now().UTC(), Result: res}
	// Durable before anything is applied: a crash from here on restarts
	// on this registry, and the redelivery re-reports its result.
	if err := m.Store.SaveRegistry(ctx, rec); err != nil {
		return fmt.Errorf("registry %d not saved: %w", msg.Version, err)
	}
	m.devs.applied = &rec
	if _, err := m.applyDevices(ctx, devs, nil); err != nil {
		log.Error("registry saved but not applied", "version", msg.Version, "err", err)
	}
	m.setSource(func(s *DeviceSource) {
		s.From, s.Version, s.AppliedAt, s.LastRefusal = "registry", rec.Version, rec.AppliedAt, nil
	})
	log.Info("registry applied", "version", msg.Version, "added", res.Added, "removed", res.Removed, "changed", res.Changed)
	return m.Station.RecordEvent(ctx, edged.EventRegistryResult, res)
}

var entryPath = regexp.MustCompile(`^devices\[(\d+)\]`)

// parseRegistryDevices decodes a registry's devices string (a JSON array
// of §8 entries; JSON is YAML, so the config's strict decoder reads it)
// and validates it whole against cfg. On a refusal it returns the index of
// the first bad entry (nil when the array itself is bad) and why.
func parseRegistryDevices(cfg edged.Config, s string) (devs []edged.Device, idx *int, why string) {
	dec := yaml.NewDecoder(bytes.NewReader([]byte(s)))
	dec.KnownFields(true)
	if err := dec.Decode(&devs); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil, "devices is empty: send [] to remove every device"
		}
		return nil, nil, "devices: " + cleanYAMLMessage(err.Error())
	}
	fes := cfg.ValidateDevices(devs, "devices")
	if len(fes) == 0 {
		return devs, nil, ""
	}
	fe := fes[0]
	if mm := entryPath.FindStringSubmatch(fe.Path); mm != nil {
		i, _ := strconv.Atoi(mm[1])
		idx = &i
	}
	return nil, idx, fe.Error()
}

// registryEntry is a §8 device entry as a registry carries it, in JSON
// with the config's key names.
type registryEntry struct {
	ID           string          `json:"id" yaml:"id"`
	Kind         string          `json:"kind" yaml:"kind"`
	Transport    edged.Transport `json:"transport" yaml:"transport"`
	SecretHash   string          `json:"secret_hash,omitempty" yaml:"secret_hash"`
	SecretHashes []string        `json:"secret_hashes,omitempty" yaml:"secret_hashes"`
	Location     *edged.Location `json:"location,omitempty" yaml:"location"`
	Bus          string          `json:"bus,omitempty" yaml:"bus"`
	Unit         int             `json:"unit,omitempty" yaml:"unit"`
	Profile      string          `json:"profile,omitempty" yaml:"profile"`
}

// readDeviceList reads a devices list for sign-registry: a YAML or JSON
// array of entries, or a config-like document with a devices key. Unknown
// keys are errors, as in the config.
func readDeviceList(data []byte) ([]registryEntry, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("devices: %s", cleanYAMLMessage(err.Error()))
	}
	var devs []registryEntry
	if len(doc.Content) > 0 && doc.Content[0].Kind == yaml.MappingNode {
		var wrap struct {
			Devices []registryEntry `yaml:"devices"`
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(&wrap); err != nil {
			return nil, fmt.Errorf("devices: %s", cleanYAMLMessage(err.Error()))
		}
		devs = wrap.Devices
	} else {
		dec := yaml.NewDecoder(bytes.NewReader(data))
		dec.KnownFields(true)
		if err := dec.Decode(&devs); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("devices: %s", cleanYAMLMessage(err.Error()))
		}
	}
	if devs == nil {
		devs = []registryEntry{}
	}
	return devs, nil
}

// deviceListView is Source as the status page takes it.
func (m *Main) deviceListView() web.DeviceListView {
	s := m.Source()
	v := web.DeviceListView{From: s.From, Version: s.Version, AppliedAt: s.AppliedAt}
	if r := s.LastRefusal; r != nil {
		v.LastRefusal = &web.RefusalView{At: r.At, What: r.What, Version: r.Version, Reason: r.Reason, Errors: r.Errors}
	}
	return v
}
