package web_test

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"

	"github.com/stationedge/edged"
)

// relayedStation has two rentals running: r-cloud on chair-1 from the
// cloud, r-relay on chair-2 relayed by the device (docs/relay.md).
func relayedStation(t *testing.T) *station {
	t.Helper()
	pub, priv, _ := ed25519.GenerateKey(nil)
	s := newStation(t, func(o *stationOptions) { o.verifyKey = pub })
	s.online("chair-1", edged.StatusIdle)
	s.online("chair-2", edged.StatusIdle)
	sign := func(m edged.RentalMessage) []byte {
		m.Sig = edged.SignRental(priv, "mall-1", m)
		b, _ := json.Marshal(m)
		return b
	}
	if err := s.st.Rental(ctx, sign(edged.RentalMessage{Op: "grant", RentalID: "r-cloud", DeviceID: "chair-1", RenterID: "ann", DurationS: 600})); err != nil {
		t.Fatal(err)
	}
	if err := s.st.RelayRental(ctx, "chair-2", sign(edged.RentalMessage{Op: "grant", RentalID: "r-relay", DeviceID: "chair-2", RenterID: "bob", DurationS: 600})); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"chair-1", "chair-2"} {
		c, ok := s.dev.last(id, edged.ActionStart)
		if !ok {
			t.Fatalf("no start sent to %s", id)
		}
		if err := s.st.DeviceAck(ctx, id, edged.CommandAck{CmdID: c.CmdID, OK: true}); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// The API says which rentals were relayed by their device.
func TestRelayedRentalInAPI(t *testing.T) {
	s := relayedStation(t)
	var devs []map[string]any
	if r := s.do(req{path: "/api/v1/devices"}); r.code != 200 || json.Unmarshal(r.body, &devs) != nil {
		t.Fatalf("devices: %d %s", r.code, r.body)
	}
	via := map[any]any{}
	for _, d := range devs {
		via[d["device_id"]] = d["rental_via"]
	}
	if via["chair-1"] != nil || via["chair-2"] != "device" {
		t.Errorf("rental_via by device = %v, want only chair-2 via device", via)
	}
	var rentals []map[string]any
	if r := s.do(req{path: "/api/v1/rentals?state=all"}); r.code != 200 || json.Unmarshal(r.body, &rentals) != nil {
		t.Fatalf("rentals: %d %s", r.code, r.body)
	}
	got := map[any]any{}
	for _, r := range rentals {
		got[r["rental_id"]] = r["via"]
	}
	if len(got) != 2 || got["r-cloud"] != nil || got["r-relay"] != "device" {
		t.Errorf("via by rental = %v, want r-relay via device only", got)
	}
}

// The page marks a relayed rental beside its renter, and only it.
func TestRelayedRentalMarkedOnPage(t *testing.T) {
	s := relayedStation(t)
	bctx := browser(t)
	within(t, bctx, 10*time.Second, "log in and open the page",
		chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			_, err := cdp.Call(ctx, tg, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{
				Headers: network.Headers{"Authorization": basic(techUser, techPassword)}})
			return err
		}),
		chromedp.Navigate(s.base+"/"),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-device="chair-2"]`)),
	)
	mark := func(id string) string {
		return `document.querySelector('tr[data-device="` + id + `"] td.renter .relayed')`
	}
	waitFor(t, bctx, 5*time.Second, "chair-2 marked relayed", `!`+mark("chair-2")+`.hidden && `+mark("chair-2")+`.textContent === 'relayed'`)
	if !eval[bool](t, bctx, mark("chair-1")+`.hidden`) {
		t.Error("chair-1's rental from the cloud is marked relayed")
	}
	if got := eval[string](t, bctx, `document.querySelector('tr[data-device="chair-1"] td.renter').textContent`); got != "ann" {
		t.Errorf("chair-1 renter = %q, want ann", got)
	}
	if !eval[bool](t, bctx, `[...document.querySelectorAll('#events tbody tr')].some(tr => tr.textContent.includes('r-relay') && tr.textContent.includes('via device'))`) {
		t.Error("no event of r-relay reads via device")
	}
}
