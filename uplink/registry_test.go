package uplink

import (
	"context"
	"testing"
	"time"

	"github.com/stationedge/edged"
)

type fakeRegistry struct{}

func (fakeRegistry) Registry(context.Context, []byte) error { return nil }

// The registry topic is subscribed only with a handler, on the profile's
// down topic.
func TestRegistryTopics(t *testing.T) {
	s := newStation()
	base := s.config(t, "tls://iot.example.com:8883")
	base.KeepAlive = 60 * time.Second
	u, err := New(base)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := u.downTopics()[""]; ok || len(u.downTopics()) != 2 {
		t.Errorf("without a handler: %v", u.downTopics())
	}
	base.Registry = fakeRegistry{}
	if u, err = New(base); err != nil {
		t.Fatal(err)
	}
	if got := u.topics.downRegistry; got != "stations/"+base.StationID+"/down/registry" || u.downTopics()[got] != 1 {
		t.Errorf("generic registry topic %q in %v", got, u.downTopics())
	}
	base.Profile, base.Aliyun = edged.ProfileAliyun, aliyunID
	if u, err = New(base); err != nil {
		t.Fatal(err)
	}
	if got := u.topics.downRegistry; got != "/pk1/dn1/user/registry" || u.downTopics()[got] != 1 {
		t.Errorf("aliyun registry topic %q in %v", got, u.downTopics())
	}
}
