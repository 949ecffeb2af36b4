package local

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stationedge/edged"
)

// errReportFailed stops a connection whose message the station could not
// take, so the client resends it after reconnecting.
var errReportFailed = errors.New("station could not take the message")

// errDeviceListChanged ends the session of a device removed or given new secrets.
var errDeviceListChanged = errors.New("device list changed")

// hook is the broker's only mochi hook: authentication, ACL, ingest and
// presence. mochi ORs auth hooks, so there must never be another one (no
// AllowHook) beside it.
type hook struct {
	mqtt.HookBase
	b *Broker
}

func (h *hook) ID() string { return "edged-local" }

var provided = []byte{
	mqtt.OnConnect,
	mqtt.OnConnectAuthenticate,
	mqtt.OnACLCheck,
	mqtt.OnSessionEstablished,
	mqtt.OnDisconnect,
	mqtt.OnPublish,
	mqtt.OnPacketProcessed,
	mqtt.OnPacketRead,
	mqtt.OnWill,
	mqtt.OnWillSent,
	mqtt.OnPublishDropped,
}

func (h *hook) Provides(b byte) bool { return bytes.IndexByte(provided, b) >= 0 }

// authenticate checks a CONNECT: known device, client id = username =
// device id, right secret, and a will (if any) on the device's own up
// topics with a payload the topic accepts.
func (b *Broker) authenticate(pk packets.Packet) error {
	id := string(pk.Connect.Username)
	if b.device(id) == nil || !pk.Connect.UsernameFlag {
		return errUnknownDevice
	}
	if pk.Connect.ClientIdentifier != id {
		return errClientID
	}
	if err := b.secrets.check(b.ctx, id, pk.Connect.Password); err != nil {
		return err
	}
	if pk.Connect.WillFlag {
		kind, ok := upTopic(id, pk.Connect.WillTopic)
		if !ok || kind == topicGrants { // a will would relay past the rate limit
			return errWillRefused
		}
		if _, err := parse(kind, pk.Connect.WillPayload); err != nil {
			return errWillRefused
		}
	}
	return nil
}

// OnConnect authenticates, so that a refusal gets CONNACK "not authorized"
// (mochi's OnConnectAuthenticate refusal says "bad username or password").
func (h *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	greet(cl.Net.Conn)
	b := h.b
	err := b.authenticate(pk)
	if err == nil {
		return nil
	}
	// mochi maps these to 3.1.1's "not authorized" (5) and "server
	// unavailable" (3); MQTT 5 has its own codes.
	code := packets.ErrBadUsernameOrPassword
	busy := errors.Is(err, errAuthBusy)
	switch v5 := cl.Properties.ProtocolVersion == 5; {
	case busy && v5:
		code = packets.ErrServerBusy
	case busy:
		code = packets.ErrServerUnavailable
	case v5:
		code = packets.ErrNotAuthorized
	}
	if !busy {
		b.authFailures.Add(1)
	}
	// Refusals of configured devices and of made-up ids are limited
	// apart, so a flood of made-up ids cannot hide a real device's.
	kind := "unknown"
	if b.device(string(pk.Connect.Username)) != nil {
		kind = "known"
	}
	if ok, _ := b.authLog.allow(kind, "ids", kind); ok {
		b.log.Warn("device refused", "device", printable(string(pk.Connect.Username)),
			"client_id", printable(pk.Connect.ClientIdentifier), "remote", cl.Net.Remote, "reason", err.Error())
	}
	_ = b.srv.SendConnack(cl, code, false, nil)
	return code
}

// OnConnectAuthenticate repeats OnConnect's check, which its cache makes
// cheap: mochi admits nobody unless an auth hook says yes.
func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	return h.b.authenticate(pk) == nil
}

// OnACLCheck allows every publish (OnPublish enforces the topics: refusing
// here disconnects a 3.1.1 QoS 1 publisher, which then resends forever) and
// only the device's own commands topic for reading.
func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if write || cl.Net.Inline || topic == commandsTopic(cl.ID) {
		return true
	}
	h.b.aclDenials.Add(1)
	h.b.warn("acl", "subscription refused", "device", cl.ID, "filter", clip(topic))
	return false
}

// deniedPrefix marks a publish topic that mochi would drop silently.
const deniedPrefix = "edged-denied/"

// OnPacketRead renames publishes to topics that mochi drops without any
// acknowledgement ($SYS/..., malformed $share/...), so OnPublish refuses
// them like any other foreign topic: a QoS 1 publish left without a PUBACK
// would stay in the client's session and be resent on every reconnect.
func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Publish && pk.TopicName != "" && !mqtt.IsValidFilter(pk.TopicName, true) &&
		!strings.ContainsAny(pk.TopicName, "+#") { // wildcards: a protocol violation, mochi closes
		pk.TopicName = deniedPrefix + pk.TopicName
	}
	return pk, nil
}

// OnPublish checks and reports a device's publish before mochi
// acknowledges it. The error values it returns are bare packets.Code
// values, as mochi type-asserts them.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	b := h.b
	v5 := cl.Properties.ProtocolVersion == 5
	qos := pk.FixedHeader.Qos
	kind, ok := upTopic(cl.ID, pk.TopicName)
	if !ok {
		b.aclDenials.Add(1)
		b.warn("acl", "publish refused", "device", cl.ID, "topic", clip(strings.TrimPrefix(pk.TopicName, deniedPrefix)))
		return pk, refusal(v5, qos, packets.ErrNotAuthorized)
	}
	if kind == topicGrants {
		if code, ok := b.admitRelay(cl.ID); !ok {
			return pk, refusal(v5, qos, code)
		}
	}
	if d := b.device(cl.ID); d != nil && d.limit != nil {
		if wait := d.limit.reserve(time.Now()); wait > 0 {
			b.throttled.Add(1)
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-b.ctx.Done():
				t.Stop()
			}
		}
	}
	rep, err := parse(kind, pk.Payload)
	if err != nil {
		b.badInput.Add(1)
		b.inputWarn(cl.ID, "bad device message", "topic", pk.TopicName, "err", err)
		return pk, refusal(v5, qos, packets.ErrPayloadFormatInvalid)
	}
	ctx, cancel := context.WithTimeout(b.ctx, reportTimeout)
	err = offload(func() error { return rep(ctx, b.reporter, cl.ID) })
	cancel()
	if err != nil {
		if edged.ErrorCode(err) == edged.EINVALID {
			b.badInput.Add(1)
			b.inputWarn(cl.ID, "device message refused by station", "topic", pk.TopicName, "err", err)
			return pk, refusal(v5, qos, packets.ErrPayloadFormatInvalid)
		}
		return pk, b.reportFailed(cl, pk, err)
	}
	b.messagesIn.Add(1)
	pk.FixedHeader.Retain = false // nobody reads up topics back
	return pk, nil
}

// refusal is how OnPublish drops a message: a negative PUBACK where MQTT
// has one (5, QoS 1), else an acknowledgement that delivers nothing.
func refusal(v5 bool, qos byte, code packets.Code) error {
	if v5 && qos == 1 {
		return code
	}
	return packets.CodeSuccessIgnore
}

// reportFailed answers a publish the station could not take: never a
// success. See the package doc.
func (b *Broker) reportFailed(cl *mqtt.Client, pk packets.Packet, err error) error {
	v5 := cl.Properties.ProtocolVersion == 5
	switch qos := pk.FixedHeader.Qos; {
	case qos == 0:
		b.log.Error("device message lost: station could not take it", "device", cl.ID, "topic", pk.TopicName, "err", err)
		return packets.CodeSuccessIgnore
	case v5 && qos == 1:
		b.log.Error("device message refused: station could not take it", "device", cl.ID, "topic", pk.TopicName, "err", err)
		return packets.ErrUnspecifiedError
	default:
		b.log.Error("device disconnected: station could not take its message", "device", cl.ID, "topic", pk.TopicName, "err", err)
		if v5 {
			_ = b.srv.DisconnectClient(cl, packets.ErrUnspecifiedError)
		} else {
			cl.Stop(errReportFailed)
		}
		return packets.ErrRejectPacket
	}
}

// OnSessionEstablished makes the client the device's live session and
// reports the device online.
func (h *hook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	b := h.b
	d := b.device(cl.ID)
	if d == nil || cl.Net.Inline {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.current.Swap(cl) == nil {
		b.connected.Add(1)
	}
	b.log.Info("device connected", "device", cl.ID, "remote", cl.Net.Remote, "mqtt", cl.Properties.ProtocolVersion)
	ctx, cancel := context.WithTimeout(b.ctx, reportTimeout)
	defer cancel()
	if err := offload(func() error { return b.reporter.DeviceOnline(ctx, cl.ID, true) }); err != nil {
		b.log.Error("report device online", "device", cl.ID, "err", err)
	}
}

// OnDisconnect reports the device offline, unless the client was not its
// live session any more (taken over by a reconnect of the same device).
func (h *hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	b := h.b
	d := b.device(cl.ID)
	if d == nil || cl.Net.Inline {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.current.CompareAndSwap(cl, nil) {
		b.log.Debug("stale session ended", "device", cl.ID, "remote", cl.Net.Remote)
		return
	}
	b.connected.Add(-1)
	d.qmu.Lock()
	d.pending = nil
	d.qmu.Unlock()
	b.log.Info("device disconnected", "device", cl.ID, "remote", cl.Net.Remote, "err", err)
	ctx, cancel := context.WithTimeout(b.ctx, reportTimeout)
	defer cancel()
	if rerr := offload(func() error { return b.reporter.DeviceOnline(ctx, cl.ID, false) }); rerr != nil {
		b.log.Error("report device offline", "device", cl.ID, "err", rerr)
	}
}

// OnPacketProcessed delivers commands held for a device once its
// subscription is in place (after the SUBACK).
func (h *hook) OnPacketProcessed(cl *mqtt.Client, pk packets.Packet, err error) {
	if err != nil || pk.FixedHeader.Type != packets.Subscribe || cl.Net.Inline {
		return
	}
	if d := h.b.device(cl.ID); d != nil {
		h.b.flushPending(d)
	}
}

// OnWill keeps wills from being retained.
func (h *hook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	will.Retain = false
	return will, nil
}

// OnWillSent reports a device's will (checked at CONNECT) as if the device
// had published it.
func (h *hook) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	b := h.b
	if cl.Net.Inline || b.device(cl.ID) == nil {
		return
	}
	kind, ok := upTopic(cl.ID, pk.TopicName)
	if !ok {
		return
	}
	rep, err := parse(kind, pk.Payload)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(b.ctx, reportTimeout)
	defer cancel()
	if err := offload(func() error { return rep(ctx, b.reporter, cl.ID) }); err != nil {
		b.log.Error("report device will", "device", cl.ID, "topic", pk.TopicName, "err", err)
		return
	}
	b.messagesIn.Add(1)
}

// OnPublishDropped logs a command mochi dropped because the device's queue
// of pending writes (clientWritesPending) was full: Send had already
// returned success. The station resends start and stop until the device
// acknowledges them, so the command is late, not lost.
func (h *hook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	h.b.warn("dropped", "command dropped: device's write queue full", "device", cl.ID, "topic", clip(pk.TopicName))
}

// clip bounds a client-chosen string before it is logged.
func clip(s string) string {
	const n = 128
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
