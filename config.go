package edged

import (
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"time"
)

// Config is the station's configuration file (§8). The yaml tags are the
// contract's key names; decoding is done by cmd/edged.
type Config struct {
	Station  StationConfig      `yaml:"station"`
	DataDir  string             `yaml:"data_dir"`
	Local    LocalConfig        `yaml:"local"`
	Uplink   UplinkConfig       `yaml:"uplink"`
	Rentals  RentalsConfig      `yaml:"rentals"`
	Clock    ClockConfig        `yaml:"clock"`
	HTTP     HTTPConfig         `yaml:"http"`
	Serial   SerialConfig       `yaml:"serial"`
	Profiles map[string]Profile `yaml:"profiles"`
	// DevicesFrom says who manages the device list: "config" (the
	// default, this file) or "cloud" (signed registries, §3.6, with
	// Devices only seeding it until the first one arrives).
	DevicesFrom string   `yaml:"devices_from"`
	Devices     []Device `yaml:"devices"`
}

// Where the device list comes from (devices_from, §8).
const (
	DevicesFromConfig = "config"
	DevicesFromCloud  = "cloud"
)

// StationConfig names the station.
type StationConfig struct {
	ID       string    `yaml:"id"`
	Name     string    `yaml:"name"`
	Location *Location `yaml:"location"`
}

// LocalConfig is the LAN broker's configuration (§2).
type LocalConfig struct {
	Listen      string `yaml:"listen"`
	TLSListen   string `yaml:"tls_listen"`
	TLSCertFile string `yaml:"tls_cert_file"`
	TLSKeyFile  string `yaml:"tls_key_file"`
	WSListen    string `yaml:"ws_listen"`
	MaxPacketKB int    `yaml:"max_packet_kb"`
	// MaxClients bounds concurrent device connections (0: no bound).
	MaxClients int `yaml:"max_clients"`
	// MaxPublishRate is each device's sustained publishes per second; a
	// faster device is slowed, never dropped (0: no limit).
	MaxPublishRate float64 `yaml:"max_publish_rate"`
}

// UplinkConfig is the cloud connection's configuration (§3).
type UplinkConfig struct {
	URL         string `yaml:"url"`
	ClientID    string `yaml:"client_id"`
	Username    string `yaml:"username"`
	Password    string `yaml:"password"`
	CAFile      string `yaml:"ca_file"`
	CertFile    string `yaml:"cert_file"`
	KeyFile     string `yaml:"key_file"`
	TopicRoot   string `yaml:"topic_root"`
	RenterTopic string `yaml:"renter_topic"`
	OutboxMaxMB int    `yaml:"outbox_max_mb"`
	// InsecureSkipVerify turns off server verification; it is logged.
	InsecureSkipVerify bool `yaml:"insecure_skip_verify"`
	// ReconnectMax caps the reconnect backoff.
	ReconnectMax time.Duration `yaml:"reconnect_max"`
	// KeepAlive is the MQTT keepalive, which detects a silent dead link.
	KeepAlive time.Duration `yaml:"keepalive"`
	// Window is how many QoS 1 publishes may await their PUBACK at once.
	Window int `yaml:"window"`
	// Profile fits the uplink to the cloud's MQTT service (§3.5): generic
	// (the default), aws or aliyun.
	Profile string `yaml:"profile"`
	// BatchEvents is how many events go in one message; 0 means the
	// profile's default (§3.3, §3.5).
	BatchEvents int `yaml:"batch_events"`
	// MaxPublishRate caps PUBLISH packets per second on the connection; 0
	// means the profile's default (none for generic).
	MaxPublishRate int `yaml:"max_publish_rate"`
	// MaxMessageKB is the largest payload edged sends, in KiB; 0 means the
	// profile's default.
	MaxMessageKB int `yaml:"max_message_kb"`
	// Aliyun is the station's identity on Alibaba Cloud IoT Platform
	// (profile aliyun only).
	Aliyun AliyunConfig `yaml:"aliyun"`
}

// Cloud profiles of uplink.profile (§3.5).
const (
	ProfileGeneric = "generic"
	ProfileAWS     = "aws"
	ProfileAliyun  = "aliyun"
)

// ProfileDefaults are a cloud profile's defaults for the keys an operator
// may leave at 0 (§3.5). MaxPublishRate 0 means no limit.
type ProfileDefaults struct {
	BatchEvents, MaxPublishRate, MaxMessageKB int
}

// CloudProfile returns the defaults of a profile ("" is generic); ok is
// false for an unknown profile.
func CloudProfile(name string) (d ProfileDefaults, ok bool) {
	switch name {
	case "", ProfileGeneric:
		return ProfileDefaults{BatchEvents: 1, MaxPublishRate: 0, MaxMessageKB: 256}, true
	case ProfileAWS:
		// AWS IoT Core allows 100 publishes/s and 128 KB per message on a
		// connection; 90 leaves room for the clocks not agreeing.
		return ProfileDefaults{BatchEvents: 200, MaxPublishRate: 90, MaxMessageKB: 128}, true
	case ProfileAliyun:
		// The IoT Platform allows about 30 publishes/s per device.
		return ProfileDefaults{BatchEvents: 200, MaxPublishRate: 25, MaxMessageKB: 256}, true
	}
	return ProfileDefaults{}, false
}

// Effective returns c with the profile's defaults filled in where c has 0.
func (c UplinkConfig) Effective() UplinkConfig {
	d, _ := CloudProfile(c.Profile)
	if c.Profile == "" {
		c.Profile = ProfileGeneric
	}
	if c.BatchEvents <= 0 {
		c.BatchEvents = d.BatchEvents
	}
	if c.MaxPublishRate <= 0 {
		c.MaxPublishRate = d.MaxPublishRate
	}
	if c.MaxMessageKB <= 0 {
		c.MaxMessageKB = d.MaxMessageKB
	}
	return c
}

// AliyunConfig is the station as one IoT Platform device (§3.5).
type AliyunConfig struct {
	ProductKey   string `yaml:"product_key"`
	DeviceName   string `yaml:"device_name"`
	DeviceSecret string `yaml:"device_secret"`
}

// String hides the device secret, so a config printed with %v or %+v
// never shows it.
func (a AliyunConfig) String() string {
	secret := ""
	if a.DeviceSecret != "" {
		secret = "(redacted)"
	}
	return fmt.Sprintf("{ProductKey:%s DeviceName:%s DeviceSecret:%s}", a.ProductKey, a.DeviceName, secret)
}

// LogValue hides the device secret from slog.
func (a AliyunConfig) LogValue() slog.Value {
	return slog.StringValue(a.String())
}

// Limits of the profile keys.
const (
	// MaxBatchEvents bounds batch_events; a batch is one message and its
	// events leave the outbox together.
	MaxBatchEvents = 10000
	// MaxMessageKBLimit is the largest max_message_kb: MQTT's own limit is
	// 256 MiB, but edged's messages are far smaller.
	MaxMessageKBLimit = 256 * 1024
)

// AWSMaxSlashes is the most slashes AWS IoT Core allows in a topic.
const AWSMaxSlashes = 7

// TLSURL reports whether an uplink URL uses TLS (ssl, tls, mqtts, wss).
func TLSURL(u string) bool {
	for _, p := range []string{"ssl://", "tls://", "mqtts://", "wss://"} {
		if strings.HasPrefix(u, p) {
			return true
		}
	}
	return false
}

// RentalsConfig holds the rental rules' settings (§3.1, §4).
type RentalsConfig struct {
	VerifyKey    string        `yaml:"verify_key"`
	StartTimeout time.Duration `yaml:"start_timeout"`
}

// ClockConfig is §4's clock setting.
type ClockConfig struct {
	AssumeSynced bool `yaml:"assume_synced"`
}

// HTTPConfig is the technicians' HTTP server (§7).
type HTTPConfig struct {
	Listen string     `yaml:"listen"`
	Users  []HTTPUser `yaml:"users"`
}

// HTTPUser is a technician allowed on the status page.
type HTTPUser struct {
	Name         string `yaml:"name"`
	PasswordHash string `yaml:"password_hash"`
}

// SerialConfig lists the RS-485 buses (§5).
type SerialConfig struct {
	Buses []Bus `yaml:"buses"`
}

// Bus is one RS-485 port.
type Bus struct {
	Name         string        `yaml:"name"`
	Port         string        `yaml:"port"`
	Baud         int           `yaml:"baud"`
	DataBits     int           `yaml:"data_bits"`
	Parity       string        `yaml:"parity"`
	StopBits     int           `yaml:"stop_bits"`
	Timeout      time.Duration `yaml:"timeout"`
	PollInterval time.Duration `yaml:"poll_interval"`
}

// Profile maps the device contract onto Modbus registers (§5).
type Profile struct {
	Status    *StatusRegister            `yaml:"status"`
	Telemetry []TelemetryRegister        `yaml:"telemetry"`
	Commands  map[string]CommandRegister `yaml:"commands"`
}

// StatusRegister is where a serial device's status is read, and what its
// values mean.
type StatusRegister struct {
	Table   string         `yaml:"table"`
	Address int            `yaml:"address"`
	Values  map[int]Status `yaml:"values"`
}

// TelemetryRegister is one telemetry value read from a register.
type TelemetryRegister struct {
	Name    string  `yaml:"name"`
	Table   string  `yaml:"table"`
	Address int     `yaml:"address"`
	Scale   float64 `yaml:"scale"`
	Signed  bool    `yaml:"signed"`
}

// CommandRegister is the write that carries out a command. Value is a
// number or a template such as "{duration_s}" or "{args.level}".
type CommandRegister struct {
	Table   string `yaml:"table"`
	Address int    `yaml:"address"`
	Value   string `yaml:"value"`
}

// DefaultConfig returns the built-in defaults (§8, §9): station dev, data
// in ./edged-data, no uplink, no devices.
func DefaultConfig() Config {
	return Config{
		Station: StationConfig{ID: "dev"},
		DataDir: "./edged-data",
		Local:   LocalConfig{Listen: ":1883", MaxPacketKB: 4096},
		Uplink: UplinkConfig{
			TopicRoot: "stations", OutboxMaxMB: 64, Profile: ProfileGeneric,
			ReconnectMax: 60 * time.Second, KeepAlive: 30 * time.Second, Window: 256,
		},
		Rentals: RentalsConfig{StartTimeout: 5 * time.Second},
		HTTP:    HTTPConfig{Listen: "127.0.0.1:8080"},
	}
}

// FieldError is a configuration mistake at a key path such as
// "devices[2].id"; cmd/edged turns the path into a line number.
type FieldError struct {
	Path    string
	Message string
}

func (e FieldError) Error() string { return e.Path + ": " + e.Message }

// ConfigErrors is every mistake found in a configuration.
type ConfigErrors []FieldError

func (es ConfigErrors) Error() string {
	s := make([]string, len(es))
	for i, e := range es {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

// ProfileChecker checks a serial profile beyond its shape; the serial
// package provides one. It returns errors with paths relative to the profile.
type ProfileChecker func(p Profile) []FieldError

// Validate checks c against the contract. checkProfile may be nil.
func (c *Config) Validate(checkProfile ProfileChecker) error {
	var errs ConfigErrors
	add := func(path, format string, args ...any) {
		errs = append(errs, FieldError{Path: path, Message: fmt.Sprintf(format, args...)})
	}
	if !ValidStationID(c.Station.ID) {
		add("station.id", "%q is not a station id ([a-z0-9][a-z0-9-]{0,63})", c.Station.ID)
	}
	if c.Station.Location != nil && !c.Station.Location.Valid() {
		add("station.location", "lat must be in -90..90 and lon in -180..180")
	}
	if c.DataDir == "" {
		add("data_dir", "must not be empty")
	}
	checkAddr := func(path, addr string, required bool) {
		if addr == "" {
			if required {
				add(path, "must not be empty")
			}
			return
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			add(path, "%q is not host:port", addr)
		}
	}
	checkAddr("local.listen", c.Local.Listen, false)
	checkAddr("local.tls_listen", c.Local.TLSListen, false)
	checkAddr("local.ws_listen", c.Local.WSListen, false)
	if c.Local.TLSListen != "" && (c.Local.TLSCertFile == "" || c.Local.TLSKeyFile == "") {
		add("local.tls_listen", "needs tls_cert_file and tls_key_file")
	}
	if c.Local.MaxPacketKB < 65 || c.Local.MaxPacketKB > 256*1024 {
		add("local.max_packet_kb", "must be between 65 and 262144")
	}
	if c.Local.MaxClients < 0 {
		add("local.max_clients", "must not be negative")
	}
	if c.Local.MaxPublishRate < 0 || c.Local.MaxPublishRate > 1e6 {
		add("local.max_publish_rate", "must be between 0 (no limit) and 1000000")
	}
	if u := c.Uplink.URL; u != "" {
		ok := false
		for _, p := range []string{"tcp://", "ssl://", "tls://", "ws://", "wss://", "mqtt://", "mqtts://"} {
			if strings.HasPrefix(u, p) {
				ok = true
			}
		}
		if !ok {
			add("uplink.url", "scheme must be tcp, ssl, tls, ws or wss")
		}
	}
	if c.Uplink.ClientID != "" && !ValidToken(c.Uplink.ClientID) {
		add("uplink.client_id", "not a valid client id")
	}
	if (c.Uplink.CertFile == "") != (c.Uplink.KeyFile == "") {
		add("uplink.cert_file", "cert_file and key_file go together")
	}
	if c.Uplink.TopicRoot == "" || strings.ContainsAny(c.Uplink.TopicRoot, "+#") {
		add("uplink.topic_root", "must be a topic without wildcards")
	}
	if t := c.Uplink.RenterTopic; t != "" && strings.ContainsAny(t, "+#") {
		add("uplink.renter_topic", "must not contain wildcards")
	}
	if c.Uplink.OutboxMaxMB < 1 {
		add("uplink.outbox_max_mb", "must be at least 1")
	}
	if c.Uplink.ReconnectMax < time.Second {
		add("uplink.reconnect_max", "must be at least 1s")
	}
	if c.Uplink.KeepAlive < time.Second {
		add("uplink.keepalive", "must be at least 1s")
	}
	if c.Uplink.Window < 1 || c.Uplink.Window > 65535 {
		add("uplink.window", "must be between 1 and 65535")
	}
	for _, e := range c.Uplink.validateProfile() {
		add(e.Path, "%s", e.Message)
	}
	if c.Rentals.VerifyKey != "" {
		if _, err := ParseVerifyKey(c.Rentals.VerifyKey); err != nil {
			add("rentals.verify_key", "%v", err)
		}
	}
	if c.Rentals.StartTimeout < 100*time.Millisecond || c.Rentals.StartTimeout > 10*time.Minute {
		add("rentals.start_timeout", "must be between 100ms and 10m")
	}
	checkAddr("http.listen", c.HTTP.Listen, false)
	if c.HTTP.Listen != "" && len(c.HTTP.Users) == 0 && !LoopbackAddr(c.HTTP.Listen) {
		add("http.listen", "with no http.users, edged listens only on a loopback address")
	}
	users := map[string]bool{}
	for i, u := range c.HTTP.Users {
		p := fmt.Sprintf("http.users[%d]", i)
		if u.Name == "" || strings.ContainsAny(u.Name, ":") {
			add(p+".name", "must be a name without ':'")
		}
		if users[u.Name] {
			add(p+".name", "%q appears twice", u.Name)
		}
		users[u.Name] = true
		if !bcryptHash(u.PasswordHash) {
			add(p+".password_hash", "must be a bcrypt hash (edged hash-secret)")
		}
	}
	buses := map[string]bool{}
	for i, b := range c.Serial.Buses {
		p := fmt.Sprintf("serial.buses[%d]", i)
		if b.Name == "" {
			add(p+".name", "must not be empty")
		}
		if buses[b.Name] {
			add(p+".name", "%q appears twice", b.Name)
		}
		buses[b.Name] = true
		if b.Port == "" {
			add(p+".port", "must not be empty")
		}
		if b.Baud <= 0 {
			add(p+".baud", "must be positive")
		}
		if b.DataBits != 7 && b.DataBits != 8 {
			add(p+".data_bits", "must be 7 or 8")
		}
		if b.Parity != "none" && b.Parity != "even" && b.Parity != "odd" {
			add(p+".parity", "must be none, even or odd")
		}
		if b.StopBits != 1 && b.StopBits != 2 {
			add(p+".stop_bits", "must be 1 or 2")
		}
		if b.Timeout < 100*time.Millisecond || b.Timeout > 25*time.Second {
			add(p+".timeout", "must be between 100ms and 25s")
		}
		if b.PollInterval < 10*time.Millisecond {
			add(p+".poll_interval", "must be at least 10ms")
		}
	}
	for name, pr := range c.Profiles {
		if checkProfile != nil {
			for _, e := range checkProfile(pr) {
				add("profiles."+name+"."+e.Path, "%s", e.Message)
			}
		}
	}
	if c.DevicesFrom != "" && c.DevicesFrom != DevicesFromConfig && c.DevicesFrom != DevicesFromCloud {
		add("devices_from", "must be config or cloud")
	}
	errs = append(errs, c.ValidateDevices(c.Devices, "devices")...)
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// ValidateDevices checks a device list against the contract and the rest
// of c (a serial device's bus and profile must exist): the config file's
// devices and a registry from the cloud (§3.6) are checked alike. Paths
// start with path, such as "devices[2].id".
func (c *Config) ValidateDevices(devs []Device, path string) ConfigErrors {
	var errs ConfigErrors
	add := func(path, format string, args ...any) {
		errs = append(errs, FieldError{Path: path, Message: fmt.Sprintf(format, args...)})
	}
	ids := map[string]bool{}
	units := map[string]bool{}
	for i, d := range devs {
		p := fmt.Sprintf("%s[%d]", path, i)
		if !ValidDeviceID(d.ID) {
			add(p+".id", "%q is not a device id ([A-Za-z0-9_-]{1,64})", d.ID)
		}
		if ids[d.ID] {
			add(p+".id", "%q appears twice", d.ID)
		}
		ids[d.ID] = true
		if d.Kind == "" {
			add(p+".kind", "must not be empty")
		}
		if d.Location != nil && !d.Location.Valid() {
			add(p+".location", "lat must be in -90..90 and lon in -180..180")
		}
		switch d.Transport {
		case TransportMQTT:
			if d.SecretHash == "" && len(d.SecretHashes) == 0 {
				add(p+".secret_hash", "an mqtt device needs secret_hash or secret_hashes (edged hash-secret)")
			}
			if d.SecretHash != "" && !bcryptHash(d.SecretHash) {
				add(p+".secret_hash", "must be a bcrypt hash (edged hash-secret)")
			}
			for j, h := range d.SecretHashes {
				if !bcryptHash(h) {
					add(fmt.Sprintf("%s.secret_hashes[%d]", p, j), "must be a bcrypt hash (edged hash-secret)")
				}
			}
			if d.Bus != "" || d.Unit != 0 || d.Profile != "" {
				add(p+".transport", "bus, unit and profile are for serial devices")
			}
		case TransportSerial:
			if !slices.ContainsFunc(c.Serial.Buses, func(b Bus) bool { return b.Name == d.Bus }) {
				add(p+".bus", "no bus named %q in serial.buses", d.Bus)
			}
			if d.Unit < 1 || d.Unit > 247 {
				add(p+".unit", "must be between 1 and 247")
			}
			key := fmt.Sprintf("%s/%d", d.Bus, d.Unit)
			if units[key] {
				add(p+".unit", "unit %d is used twice on bus %s", d.Unit, d.Bus)
			}
			units[key] = true
			if _, ok := c.Profiles[d.Profile]; !ok {
				add(p+".profile", "no profile named %q", d.Profile)
			}
			if d.SecretHash != "" || len(d.SecretHashes) > 0 {
				add(p+".secret_hash", "serial devices have no secret")
			}
		default:
			add(p+".transport", "must be mqtt or serial")
		}
	}
	return errs
}

// validateProfile checks uplink.profile and what it requires (§3.5).
func (u *UplinkConfig) validateProfile() []FieldError {
	var errs []FieldError
	add := func(path, format string, args ...any) {
		errs = append(errs, FieldError{Path: path, Message: fmt.Sprintf(format, args...)})
	}
	if _, ok := CloudProfile(u.Profile); !ok {
		add("uplink.profile", "%q is not a profile (generic, aws or aliyun)", u.Profile)
	}
	if u.BatchEvents < 0 || u.BatchEvents > MaxBatchEvents {
		add("uplink.batch_events", "must be between 0 (the profile's default) and %d", MaxBatchEvents)
	}
	if u.MaxPublishRate < 0 || u.MaxPublishRate > 1000000 {
		add("uplink.max_publish_rate", "must be between 0 (the profile's default) and 1000000")
	}
	if u.MaxMessageKB != 0 && (u.MaxMessageKB < 1 || u.MaxMessageKB > MaxMessageKBLimit) {
		add("uplink.max_message_kb", "must be between 1 and %d, or 0 for the profile's default", MaxMessageKBLimit)
	}
	a := u.Aliyun
	if u.Profile != ProfileAliyun {
		if a.ProductKey != "" || a.DeviceName != "" || a.DeviceSecret != "" {
			add("uplink.aliyun", "is for profile aliyun only")
		}
	}
	if u.Profile != ProfileAWS && u.Profile != ProfileAliyun {
		return errs
	}
	if u.URL != "" && !TLSURL(u.URL) {
		add("uplink.url", "profile %s needs TLS (ssl://, tls:// or wss://)", u.Profile)
	}
	if u.KeepAlive < 30*time.Second || u.KeepAlive > 1200*time.Second {
		add("uplink.keepalive", "profile %s needs a keepalive between 30s and 1200s", u.Profile)
	}
	switch u.Profile {
	case ProfileAWS:
		// AWS IoT Core takes at most 7 slashes in a topic; the longest is
		// R/S/up/devices/D.
		if strings.Count(u.TopicRoot, "/") > AWSMaxSlashes-4 {
			add("uplink.topic_root", "profile aws allows at most %d slashes in a topic: at most %d in topic_root", AWSMaxSlashes, AWSMaxSlashes-4)
		}
		if strings.Count(u.RenterTopic, "/") > AWSMaxSlashes {
			add("uplink.renter_topic", "profile aws allows at most %d slashes in a topic", AWSMaxSlashes)
		}
		if u.CertFile == "" {
			add("uplink.cert_file", "profile aws needs a client certificate (cert_file and key_file)")
		}
		if u.KeyFile == "" {
			add("uplink.key_file", "profile aws needs a client certificate (cert_file and key_file)")
		}
	case ProfileAliyun:
		if !aliyunName(a.ProductKey) {
			add("uplink.aliyun.product_key", "profile aliyun needs the product key (letters, digits, _)")
		}
		if !aliyunName(a.DeviceName) {
			add("uplink.aliyun.device_name", "profile aliyun needs the device name (letters, digits, _, -, @, ., :)")
		}
		if a.DeviceSecret == "" {
			add("uplink.aliyun.device_secret", "profile aliyun needs the device secret")
		}
	}
	return errs
}

// aliyunName reports whether s may be an IoT Platform product key or
// device name: it goes into topics and the client id, so no '/', '&', '|',
// ',' or wildcards.
func aliyunName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case r == '_', r == '-', r == '@', r == '.', r == ':':
		default:
			return false
		}
	}
	return true
}

// bcryptHash reports whether s looks like a bcrypt hash ($2a$, $2b$ or $2y$
// with a cost and 53 characters of salt and hash).
func bcryptHash(s string) bool {
	if len(s) != 60 || s[0] != '$' || s[3] != '$' || s[6] != '$' {
		return false
	}
	switch s[1:3] {
	case "2a", "2b", "2y":
	default:
		return false
	}
	return s[4] >= '0' && s[4] <= '3' && s[5] >= '0' && s[5] <= '9'
}

// LoopbackAddr reports whether a listen address binds only loopback.
func LoopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
