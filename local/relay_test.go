package local

import (
	"context"
	"errors"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	pahov3 "github.com/eclipse/paho.mqtt.golang"
	pahopackets "github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stationedge/edged"
)

// relayReporter is a fakeReporter that also takes relayed rentals.
type relayReporter struct{ *fakeReporter }

func (r relayReporter) RelayRental(ctx context.Context, id string, payload []byte) error {
	r.record(call{"relay", id, string(payload)})
	return nil
}

func withRelay(c *Config) { c.Reporter = relayReporter{c.Reporter.(*fakeReporter)} }

const grant = `{"op":"grant","rental_id":"r-1","device_id":"dev-a","renter_id":"alice","duration_s":60,"sig":"x"}`

// A device may relay only on its own grants topic; the station gets the
// message with the relaying device's id.
func TestRelayACL(t *testing.T) {
	for _, proto := range []string{"v3", "v5"} {
		t.Run(proto, func(t *testing.T) {
			e := start(t, withRelay)
			var a interface {
				alive(testing.TB, *env, string)
			}
			var pub func(topic string, payload []byte) byte
			switch proto {
			case "v3":
				c := connectV3(t, e.addr, "dev-a", secretA, autoReconnect)
				a = c
				pub = func(topic string, payload []byte) byte {
					if err := c.publish(t, topic, 1, payload); err != nil {
						t.Errorf("publish on %s: %v", topic, err)
					}
					return 0
				}
				if got := c.subscribe(t, "devices/dev-a/grants", 1); got != 0x80 {
					t.Errorf("subscribe to own grants: suback %#x, want 0x80", got)
				}
			case "v5":
				c := connectV5(t, e.addr, "dev-a", secretA)
				a = c
				pub = func(topic string, payload []byte) byte { return c.publish(t, topic, 1, payload) }
			}
			if rc := pub("devices/dev-b/grants", []byte(grant)); proto == "v5" && rc != 0x87 {
				t.Errorf("relay on dev-b's grants: reason %#x, want 0x87", rc)
			}
			if rc := pub("devices/dev-a/grants", []byte(grant)); rc != 0 {
				t.Errorf("relay on own grants: reason %#x, want 0", rc)
			}
			if rc := pub("devices/dev-a/grants", []byte(`"not an object"`)); proto == "v5" && rc != 0x99 {
				t.Errorf("relay of a non-object: reason %#x, want 0x99", rc)
			}
			got := e.rep.Calls("relay")
			if len(got) != 1 || got[0].Device != "dev-a" || got[0].Value != grant {
				t.Fatalf("relays reported = %+v, want the one on dev-a's own topic", got)
			}
			wantACL := uint64(1) // the publish on dev-b's grants
			if proto == "v3" {
				wantACL++ // and the subscription to its own grants
			}
			if s := e.b.Stats(); s.ACLDenials != wantACL || s.BadInput != 1 || s.RelayDropped != 0 {
				t.Errorf("stats = %+v, want %d ACL denials, 1 bad input, no relay dropped", s, wantACL)
			}
			a.alive(t, e, "dev-a")
		})
	}
}

// The sixth relay within a minute and those after it are dropped and
// counted; the device stays connected, and other devices keep their own
// allowance.
func TestRelayLimit(t *testing.T) {
	const sent = edged.MaxRelaysPerMinute + 3
	for _, proto := range []string{"v3", "v5"} {
		t.Run(proto, func(t *testing.T) {
			e := start(t, withRelay)
			var a interface {
				alive(testing.TB, *env, string)
			}
			var codes []byte
			switch proto {
			case "v3":
				c := connectV3(t, e.addr, "dev-a", secretA, autoReconnect)
				a = c
				for range sent {
					if err := c.publish(t, "devices/dev-a/grants", 1, []byte(grant)); err != nil {
						t.Fatalf("relay: %v", err)
					}
				}
			case "v5":
				c := connectV5(t, e.addr, "dev-a", secretA)
				a = c
				for range sent {
					codes = append(codes, c.publish(t, "devices/dev-a/grants", 1, []byte(grant)))
				}
			}
			if got := len(e.rep.Calls("relay")); got != edged.MaxRelaysPerMinute {
				t.Errorf("%d relays reached the station, want %d", got, edged.MaxRelaysPerMinute)
			}
			if got, want := e.b.Stats().RelayDropped, uint64(sent-edged.MaxRelaysPerMinute); got != want {
				t.Errorf("RelayDropped = %d, want %d", got, want)
			}
			for i, rc := range codes {
				want := byte(0)
				if i >= edged.MaxRelaysPerMinute {
					want = 0x97
				}
				if rc != want {
					t.Errorf("v5 relay %d: reason %#x, want %#x", i+1, rc, want)
				}
			}
			a.alive(t, e, "dev-a")

			b := connectV3(t, e.addr, "dev-b", secretB)
			if err := b.publish(t, "devices/dev-b/grants", 1, []byte(grant)); err != nil {
				t.Fatal(err)
			}
			if n := len(e.rep.Calls("relay")); n != edged.MaxRelaysPerMinute+1 {
				t.Errorf("dev-b's relay was not taken (%d relays in all)", n)
			}
			if !e.b.relays.allow("dev-a", time.Now().Add(relayWindow)) {
				t.Error("dev-a may not relay again a minute later")
			}
		})
	}
}

func TestRelayLimitWindow(t *testing.T) {
	var l relayLimit
	t0 := time.Now()
	for i := range edged.MaxRelaysPerMinute {
		if !l.allow("d", t0.Add(time.Duration(i)*time.Second)) {
			t.Fatalf("relay %d refused", i+1)
		}
	}
	if l.allow("d", t0.Add(59*time.Second)) {
		t.Fatal("sixth relay within the minute allowed")
	}
	// One slot frees when the first relay is a minute old, not more.
	if !l.allow("d", t0.Add(60*time.Second)) {
		t.Fatal("relay refused a minute after the first")
	}
	if l.allow("d", t0.Add(60*time.Second)) {
		t.Fatal("two relays allowed where one slot freed")
	}
	if !l.allow("other", t0.Add(59*time.Second)) {
		t.Fatal("another device shares the limit")
	}
}

// Without a reporter that takes relays, a relay is dropped and counted,
// and the device keeps its connection.
func TestRelayWithoutStation(t *testing.T) {
	e := start(t, nil)
	c := connectV3(t, e.addr, "dev-a", secretA, autoReconnect)
	if err := c.publish(t, "devices/dev-a/grants", 1, []byte(grant)); err != nil {
		t.Fatal(err)
	}
	if got := e.b.Stats().RelayDropped; got != 1 {
		t.Errorf("RelayDropped = %d, want 1", got)
	}
	c.alive(t, e, "dev-a")
}

// A will on the grants topic would relay past the limit: refused.
func TestRelayWillRefused(t *testing.T) {
	e := start(t, withRelay)
	_, err := dialV3(t, e.addr, "dev-a", "dev-a", secretA, func(o *pahov3.ClientOptions) {
		o.SetBinaryWill("devices/dev-a/grants", []byte(grant), 1, false)
	})
	if !errors.Is(err, pahopackets.ErrorRefusedNotAuthorised) {
		t.Errorf("v3 connect error = %v, want not authorized", err)
	}
	_, ca, err := dialV5(t, e.addr, "dev-a", "dev-a", secretA, &paho5.WillMessage{Topic: "devices/dev-a/grants", Payload: []byte(grant), QoS: 1})
	if err == nil || ca == nil || ca.ReasonCode != 0x87 {
		t.Errorf("v5 connack %+v, err %v; want 0x87", ca, err)
	}
}
