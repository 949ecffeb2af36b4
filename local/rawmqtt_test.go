package local

import (
	"bytes"
	"io"
	"net"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// rawConnectPacket encodes the MQTT 3.1.1 CONNECT a device sends: a clean
// session, its id as client id, user and password.
func rawConnectPacket(clientID, user, password string, keepalive uint16) []byte {
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Connect},
		ProtocolVersion: 4,
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: keepalive,
			ClientIdentifier: clientID, UsernameFlag: true, Username: []byte(user),
			PasswordFlag: true, Password: []byte(password),
		},
	}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		panic("encode connect: " + err.Error()) // fixed, valid fields
	}
	return buf.Bytes()
}

// rawSubscribePacket encodes a 3.1.1 SUBSCRIBE of filter at QoS 1, id 1.
func rawSubscribePacket(filter string) []byte {
	pk := packets.Packet{
		FixedHeader:     packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		ProtocolVersion: 4,
		PacketID:        1,
		Filters:         packets.Subscriptions{{Filter: filter, Qos: 1}},
	}
	var buf bytes.Buffer
	if err := pk.SubscribeEncode(&buf); err != nil {
		panic("encode subscribe: " + err.Error())
	}
	return buf.Bytes()
}

// rawExchange writes pkt to conn and reads the n-byte reply (a CONNACK is
// 4, a SUBACK of one filter 5), all within wait. It leaves conn without a
// deadline.
func rawExchange(conn net.Conn, pkt []byte, n int, wait time.Duration) ([]byte, error) {
	_ = conn.SetDeadline(time.Now().Add(wait))
	defer conn.SetDeadline(time.Time{})
	if _, err := conn.Write(pkt); err != nil {
		return nil, err
	}
	reply := make([]byte, n)
	if _, err := io.ReadFull(conn, reply); err != nil {
		return reply, err
	}
	return reply, nil
}
