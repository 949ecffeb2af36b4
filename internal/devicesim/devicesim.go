// Package devicesim is a simulated MQTT device of the edged contract (§2):
// a chair or charger that connects to the station's local broker with its
// own credentials, obeys start and stop, stops itself when its duration
// runs out, and reports state, telemetry and events. Tests and
// `edged demo` use it.
package devicesim

import (
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// Device is one simulated device.
type Device struct {
	ID, Secret string
	// Broker is the local broker's address, such as tcp://127.0.0.1:1883.
	Broker string
	// RefuseStart makes the device answer start with ok false.
	RefuseStart bool
	// NoAck makes the device ignore commands without answering.
	NoAck bool
	// Answer, when set, decides how the device answers each command, as
	// misbehaving firmware would: answer false loses the command (no ack,
	// no effect), ok false refuses it. A start or stop refused or lost
	// changes nothing: the device keeps doing what it did.
	Answer func(Command) (answer, ok bool)

	mu       sync.Mutex
	client   mqtt.Client
	status   string
	rental   string
	stopAt   *time.Timer
	commands []Command
	onCmd    func(Command)
}

// Command is a command the device received.
type Command struct {
	CmdID     string          `json:"cmd_id"`
	Action    string          `json:"action"`
	RentalID  string          `json:"rental_id"`
	RenterID  string          `json:"renter_id"`
	DurationS int64           `json:"duration_s"`
	Args      json.RawMessage `json:"args"`
	At        time.Time       `json:"-"`
}

// Connect connects the device and subscribes to its commands; it reports
// what it is doing: idle at first, in_use when it connects again while
// still running (a stop it lost or refused).
func (d *Device) Connect(timeout time.Duration) error {
	o := mqtt.NewClientOptions().AddBroker(d.Broker).SetClientID(d.ID).
		SetUsername(d.ID).SetPassword(d.Secret).SetProtocolVersion(4).
		SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(timeout).SetKeepAlive(30 * time.Second)
	c := mqtt.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(timeout) {
		return fmt.Errorf("%s: connect timed out", d.ID)
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("%s: connect: %w", d.ID, err)
	}
	d.mu.Lock()
	d.client = c
	if d.status == "" {
		d.status = "idle"
	}
	status := d.status
	d.mu.Unlock()
	sub := c.Subscribe("devices/"+d.ID+"/commands", 1, d.handle)
	if !sub.WaitTimeout(timeout) || sub.Error() != nil {
		c.Disconnect(0)
		return fmt.Errorf("%s: subscribe: %v", d.ID, sub.Error())
	}
	return d.Publish("state", map[string]any{"status": status})
}

// Disconnect closes the connection.
func (d *Device) Disconnect() {
	d.mu.Lock()
	c := d.client
	d.client = nil
	if d.stopAt != nil {
		d.stopAt.Stop()
	}
	d.mu.Unlock()
	if c != nil {
		c.Disconnect(50)
	}
}

// Publish sends v as JSON on devices/ID/<sub> at QoS 1 and waits for the
// PUBACK.
func (d *Device) Publish(sub string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return d.PublishRaw("devices/"+d.ID+"/"+sub, b)
}

// PublishRaw sends payload on any topic at QoS 1 and waits for the PUBACK.
func (d *Device) PublishRaw(topic string, payload []byte) error {
	d.mu.Lock()
	c := d.client
	d.mu.Unlock()
	if c == nil {
		return errors.New("not connected")
	}
	tok := c.Publish(topic, 1, false, payload)
	if !tok.WaitTimeout(5 * time.Second) {
		return fmt.Errorf("%s: publish on %s timed out", d.ID, topic)
	}
	return tok.Error()
}

// Relay publishes a signed rental message on devices/ID/grants, as a
// device does with one the renter's phone handed it (contract §2), and
// waits for the PUBACK. The answer comes as a rental_result command, which
// the device acknowledges like any other: see Commands.
func (d *Device) Relay(payload []byte) error {
	return d.PublishRaw("devices/"+d.ID+"/grants", payload)
}

// Status is what the device is doing: idle or in_use.
func (d *Device) Status() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.status
}

// Commands returns the commands received so far.
func (d *Device) Commands() []Command {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]Command(nil), d.commands...)
}

// OnCommand sets a function called for every command received.
func (d *Device) OnCommand(f func(Command)) {
	d.mu.Lock()
	d.onCmd = f
	d.mu.Unlock()
}

func (d *Device) handle(_ mqtt.Client, m mqtt.Message) {
	var c Command
	if err := json.Unmarshal(m.Payload(), &c); err != nil {
		return
	}
	c.At = time.Now()
	d.mu.Lock()
	d.commands = append(d.commands, c)
	f := d.onCmd
	answerFn := d.Answer
	answer, ok := !d.NoAck, !(d.RefuseStart && c.Action == "start")
	d.mu.Unlock()
	if f != nil {
		f(c)
	}
	if answerFn != nil && answer {
		answer, ok = answerFn(c)
	}
	if !answer {
		return
	}
	// Answer from a new goroutine: paho's handler must not wait on its own
	// client's publishes.
	go func() {
		if ok {
			switch c.Action {
			case "start":
				d.run(c)
			case "stop":
				d.halt()
			}
		}
		ack := map[string]any{"cmd_id": c.CmdID, "ok": ok}
		if !ok {
			ack["error"] = "refused"
		}
		_ = d.Publish("commands/ack", ack)
		if ok && (c.Action == "start" || c.Action == "stop") {
			_ = d.Publish("state", map[string]any{"status": d.Status()})
		}
	}()
}

// run starts (or re-times) the device for the command's duration, after
// which it stops itself, as the contract lets a device do when it loses
// the gateway.
func (d *Device) run(c Command) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.status, d.rental = "in_use", c.RentalID
	if d.stopAt != nil {
		d.stopAt.Stop()
	}
	if c.DurationS > 0 {
		d.stopAt = time.AfterFunc(time.Duration(c.DurationS)*time.Second+time.Second, func() {
			d.halt()
			_ = d.Publish("state", map[string]any{"status": "idle"})
		})
	}
}

func (d *Device) halt() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.status, d.rental = "idle", ""
	if d.stopAt != nil {
		d.stopAt.Stop()
		d.stopAt = nil
	}
}
