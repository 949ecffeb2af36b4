package uplink

import (
	"strings"
	"testing"

	"github.com/stationedge/edged"
)

// FuzzRenterTopic: a renter topic filled with ids from a rental (validated
// by the station) never gains a wildcard or an extra topic level, so one
// renter cannot be made to receive onto another's topic (§3.2).
func FuzzRenterTopic(f *testing.F) {
	f.Add("renters/{renter_id}/devices/{device_id}", "alice", "chair-1")
	f.Add("r/{renter_id}{renter_id}", "bob", "chair-1")
	f.Add("x/{device_id}", "{device_id}", "{renter_id}")
	f.Add("renters/{renter_id}/devices/{device_id}", "a/b", "c")
	f.Add("renters/{renter_id}", "+", "chair")
	f.Fuzz(func(t *testing.T, tpl, renter, device string) {
		if !edged.ValidToken(renter) || !edged.ValidDeviceID(device) || strings.ContainsAny(tpl, "+#") {
			return
		}
		got := renterTopic(tpl, renter, device)
		if strings.ContainsAny(got, "+#") {
			t.Fatalf("renterTopic(%q, %q, %q) = %q has a wildcard", tpl, renter, device, got)
		}
		if want := strings.Count(tpl, "/"); strings.Count(got, "/") != want {
			t.Fatalf("renterTopic(%q, %q, %q) = %q: levels changed", tpl, renter, device, got)
		}
	})
}
