package web_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"

	"github.com/stationedge/edged"
)

const chromiumPath = "/usr/bin/chromium"

// simulatedStation is a realistic station for the browser test and the
// screenshot in docs: chairs and chargers, one faulted, two offline, two
// rentals running and a queue waiting for the cloud.
func simulatedStation(t *testing.T) *station {
	s := newStation(t, withDevices(
		edged.Device{ID: "chair-01", Kind: "massage-chair", Transport: edged.TransportMQTT, Location: &edged.Location{Lat: 52.52003, Lon: 13.40495}},
		edged.Device{ID: "chair-02", Kind: "massage-chair", Transport: edged.TransportMQTT, Location: &edged.Location{Lat: 52.52005, Lon: 13.40501}},
		edged.Device{ID: "chair-03", Kind: "massage-chair", Transport: edged.TransportMQTT, Location: &edged.Location{Lat: 52.52008, Lon: 13.40507}},
		edged.Device{ID: "chair-04", Kind: "massage-chair", Transport: edged.TransportMQTT, Location: &edged.Location{Lat: 52.52011, Lon: 13.40512}},
		edged.Device{ID: "charger-07", Kind: "e-bike-charger", Transport: edged.TransportSerial, Bus: "bus0", Unit: 7},
		edged.Device{ID: "charger-08", Kind: "e-bike-charger", Transport: edged.TransportSerial, Bus: "bus0", Unit: 8},
	))
	s.online("chair-01", edged.StatusIdle)
	s.online("chair-02", edged.StatusIdle)
	s.online("chair-03", edged.StatusIdle)
	s.online("chair-04", edged.StatusIdle)
	s.online("charger-07", edged.StatusIdle)
	s.online("charger-08", edged.StatusIdle)
	s.startRental("r-1042", "chair-01", "renter-5521", 25*60)
	s.startRental("r-1043", "charger-07", "renter-0088", 45*60)
	for _, id := range []string{"chair-01", "charger-07"} {
		if err := s.st.DeviceState(ctx, id, edged.StateReport{Status: edged.StatusInUse}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.st.DeviceTelemetry(ctx, "charger-07", map[string]any{"power_w": 412.0, "temp_c": 31.5}); err != nil {
		t.Fatal(err)
	}
	if err := s.st.DeviceState(ctx, "chair-02", edged.StateReport{Status: edged.StatusFault, Fault: "E12-motor-overheat"}); err != nil {
		t.Fatal(err)
	}
	if err := s.st.DeviceOnline(ctx, "chair-04", false); err != nil {
		t.Fatal(err)
	}
	if err := s.st.DeviceOnline(ctx, "charger-08", false); err != nil {
		t.Fatal(err)
	}
	s.grant("r-1044", "chair-02", "renter-7310", 600) // refused: device_fault
	s.src.set(func(f *fakeSources) {
		f.uplink = edged.UplinkStatus{State: "connecting", Reconnects: 3, LastAckedSeq: 1,
			LastError: "dial tcp 203.0.113.7:8883: i/o timeout",
			Outbox:    edged.OutboxStats{Events: 1377, Bytes: 412 << 10, OldestAgeS: 1512, LastSeq: 1400}}
		f.buses = []edged.BusHealth{{Name: "bus0", Port: "/dev/ttyUSB0", PortOpen: true, Opens: 1,
			BusCounters: edged.BusCounters{Requests: 18234, Timeouts: 41, CRCErrors: 3, FailedPolls: 14},
			LastError:   "charger-08: modbus: timeout", LastErrorAt: time.Now(),
			Devices: []edged.BusDeviceHealth{
				{DeviceID: "charger-07", Unit: 7, State: "online", BusCounters: edged.BusCounters{Requests: 9117}, PollPeriod: time.Second},
				{DeviceID: "charger-08", Unit: 8, State: "offline", BusCounters: edged.BusCounters{Requests: 9117, Timeouts: 41}, PollPeriod: 30 * time.Second},
			}}}
		f.broker = edged.BrokerStats{Connected: 3, MessagesIn: 5821, MessagesOut: 64, AuthFailures: 2}
	})
	return s
}

// browser starts headless Chromium for the test, or skips (fails on CI)
// when there is none.
func browser(t *testing.T) context.Context {
	t.Helper()
	if _, err := exec.LookPath(chromiumPath); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("chromium is required on CI: %v", err)
		}
		t.Skipf("no chromium: %v", err)
	}
	// One bound for the whole browser session, so a hung browser fails the
	// test instead of stalling it.
	parent, cancelAll := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancelAll)
	actx, cancelAlloc := chromedp.NewExecAllocator(parent,
		chromedp.ExecPath(chromiumPath),
		chromedp.Flag("headless", true),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true),
		chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("hide-scrollbars", true),
		chromedp.Flag("force-color-profile", "srgb"),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	bctx, cancelBrowser := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancelBrowser()
		cancelAlloc()
	})
	if err := chromedp.Do(bctx); err != nil { // starts the browser
		t.Fatalf("start chromium: %v", err)
	}
	return bctx
}

// within runs a browser step with its own bound.
func within(t *testing.T, bctx context.Context, d time.Duration, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	c, cancel := context.WithTimeout(bctx, d)
	defer cancel()
	if err := chromedp.Do(c, steps...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func eval[T any](t *testing.T, bctx context.Context, expr string) T {
	t.Helper()
	c, cancel := context.WithTimeout(bctx, 5*time.Second)
	defer cancel()
	v, err := chromedp.Run(c, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// waitFor polls the page until expr is true.
func waitFor(t *testing.T, bctx context.Context, d time.Duration, what, expr string) {
	t.Helper()
	within(t, bctx, d+time.Second, "wait for "+what,
		func(ctx context.Context, tg *chromedp.Target) (chromedp.Void, error) {
			_, err := chromedp.Poll[bool](expr, chromedp.WithPollingTimeout(d), chromedp.WithPollingInterval(100*time.Millisecond))(ctx, tg)
			return chromedp.Void{}, err
		})
}

// waitUntil polls a Go condition.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func screenshot(t *testing.T, bctx context.Context, name string, width, height int64, scale float64) {
	t.Helper()
	c, cancel := context.WithTimeout(bctx, 15*time.Second)
	defer cancel()
	if err := chromedp.Do(c, chromedp.EmulateViewport(width, height, chromedp.EmulateScale(scale))); err != nil {
		t.Fatalf("viewport: %v", err)
	}
	time.Sleep(300 * time.Millisecond) // let the layout settle
	png, err := chromedp.Run(c, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	paths := []string{filepath.Join(t.TempDir(), name+".png")}
	if p := os.Getenv("EDGED_SCREENSHOT"); p != "" {
		if name != "statuspage" {
			p = strings.TrimSuffix(p, ".png") + strings.TrimPrefix(name, "statuspage") + ".png"
		}
		paths = append(paths, p)
	}
	for _, p := range paths {
		if err := os.WriteFile(p, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot %s (%d bytes)", p, len(png))
	}
}

func TestBrowser(t *testing.T) {
	s := simulatedStation(t)
	bctx := browser(t)
	start := time.Now()

	within(t, bctx, 10*time.Second, "log in and open the page",
		chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			_, err := cdp.Call(ctx, tg, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{
				Headers: network.Headers{"Authorization": basic(techUser, techPassword)}})
			return err
		}),
		chromedp.Navigate(s.base+"/"),
		chromedp.WaitVisible(chromedp.CSS(`tr[data-device="chair-01"]`)),
	)
	// A marker that a reload would wipe: everything below happens live.
	eval[bool](t, bctx, `window.edgedTestMarker = true`)

	if n := eval[int](t, bctx, `document.querySelectorAll('#devices tbody tr').length`); n != 6 {
		t.Errorf("device rows = %d, want 6", n)
	}
	waitFor(t, bctx, 5*time.Second, "faults and offline devices flagged",
		`document.querySelector('tr[data-device="chair-02"]').classList.contains('fault') &&
		 document.querySelector('tr[data-device="chair-04"]').classList.contains('offline') &&
		 document.querySelector('#problems').textContent.includes('chair-02 is faulted (E12-motor-overheat)') &&
		 document.querySelector('#problems').textContent.includes('1377 events queued') &&
		 document.querySelector('#uplink-state').textContent === 'connecting' &&
		 document.querySelector('#uplink-card').classList.contains('bad')`)
	if got := eval[string](t, bctx, `document.querySelector('tr[data-device="chair-01"] td.renter').textContent`); got != "renter-5521" {
		t.Errorf("chair-01 renter = %q", got)
	}
	if got := eval[string](t, bctx, `document.querySelector('#buses tr[data-bus="bus0"]').textContent`); !strings.Contains(got, "/dev/ttyUSB0") || !strings.Contains(got, "41") {
		t.Errorf("bus row = %q", got)
	}

	screenshot(t, bctx, "statuspage", 1280, 900, 1)
	screenshot(t, bctx, "statuspage-phone", 390, 844, 2)
	within(t, bctx, 5*time.Second, "desktop viewport", chromedp.EmulateViewport(1280, 900))

	// Time left counts down without a reload.
	leftExpr := `Number(document.querySelector('tr[data-device="chair-01"] td.left').dataset.seconds)`
	left1 := eval[int](t, bctx, leftExpr)
	time.Sleep(2 * time.Second)
	left2 := eval[int](t, bctx, leftExpr)
	if left1 <= 0 || left2 >= left1 || left1-left2 > 4 {
		t.Errorf("time left went from %d to %d in 2 s", left1, left2)
	}
	shown := eval[string](t, bctx, `document.querySelector('tr[data-device="chair-01"] td.left').textContent`)
	if !strings.Contains(shown, ":") {
		t.Errorf("time left shows %q", shown)
	}

	// Maintenance on and off from the page.
	within(t, bctx, 5*time.Second, "click maintenance on", chromedp.Click(chromedp.CSS(`tr[data-device="chair-03"] button.maint`)))
	waitUntil(t, 5*time.Second, "chair-03 in maintenance", func() bool {
		d, _ := s.st.Device("chair-03")
		return d.Maintenance
	})
	waitFor(t, bctx, 5*time.Second, "the page shows maintenance",
		`document.querySelector('tr[data-device="chair-03"]').classList.contains('maintenance') &&
		 document.querySelector('tr[data-device="chair-03"] button.maint').textContent === 'End maintenance'`)
	s.grant("r-2001", "chair-03", "renter-1", 60)
	res := s.events(edged.EventRentalResult)
	if last := res[len(res)-1]; last["rental_id"] != "r-2001" || last["reason"] != "maintenance" {
		t.Errorf("grant during maintenance: %v", last)
	}
	within(t, bctx, 5*time.Second, "click maintenance off", chromedp.Click(chromedp.CSS(`tr[data-device="chair-03"] button.maint`)))
	waitUntil(t, 5*time.Second, "chair-03 out of maintenance", func() bool {
		d, _ := s.st.Device("chair-03")
		return !d.Maintenance
	})

	// The cloud link comes up: the page follows.
	s.src.set(func(f *fakeSources) {
		f.uplink = edged.UplinkStatus{State: "connected", ConnectedSince: time.Now(), Reconnects: 4,
			Outbox: edged.OutboxStats{Events: 0, LastSeq: 1400}}
	})
	waitFor(t, bctx, 5*time.Second, "uplink connected",
		`document.querySelector('#uplink-state').textContent === 'connected' &&
		 !document.querySelector('#uplink-card').classList.contains('bad') &&
		 !document.querySelector('#problems').textContent.includes('queued')`)

	// End a rental, confirming in the page's dialog.
	within(t, bctx, 5*time.Second, "click end rental", chromedp.Click(chromedp.CSS(`tr[data-device="chair-01"] button.end`)))
	within(t, bctx, 5*time.Second, "confirm dialog", chromedp.WaitVisible(chromedp.CSS(`#confirm-yes`)))
	if got := eval[string](t, bctx, `document.querySelector('#confirm-text').textContent`); !strings.Contains(got, "r-1042") {
		t.Errorf("confirm text = %q", got)
	}
	if len(s.st.ActiveRentals()) != 2 {
		t.Error("the rental ended before it was confirmed")
	}
	within(t, bctx, 5*time.Second, "confirm", chromedp.Click(chromedp.CSS(`#confirm-yes`)))
	waitUntil(t, 5*time.Second, "rental.ended operator", func() bool {
		for _, e := range s.events(edged.EventRentalEnded) {
			if e["rental_id"] == "r-1042" && e["reason"] == "operator" {
				return true
			}
		}
		return false
	})
	waitFor(t, bctx, 5*time.Second, "the page shows the rental gone",
		`document.querySelector('tr[data-device="chair-01"] button.end').hidden &&
		 document.querySelector('tr[data-device="chair-01"] td.renter').textContent === '–' &&
		 document.querySelector('#events').textContent.includes('rental.ended')`)

	if !eval[bool](t, bctx, `window.edgedTestMarker === true`) {
		t.Error("the page reloaded")
	}
	errs := eval[string](t, bctx, `document.querySelector('#contact').hidden ? '' : document.querySelector('#contact').textContent`)
	if errs != "" {
		t.Errorf("page shows %q", errs)
	}
	t.Logf("browser steps took %v", time.Since(start).Round(time.Millisecond))
}

// TestBrowserRefusesWithoutLogin: no credentials, no page.
func TestBrowserRefusesWithoutLogin(t *testing.T) {
	s := newStation(t)
	bctx := browser(t)
	c, cancel := context.WithTimeout(bctx, 10*time.Second)
	defer cancel()
	// Headless Chromium cannot prompt for a password: it gives up on the
	// 401 with ERR_INVALID_AUTH_CREDENTIALS; a browser that shows the
	// 401 instead is as good.
	resp, err := chromedp.RunResponse(c, chromedp.Navigate(s.base+"/"))
	switch {
	case err != nil && strings.Contains(err.Error(), "ERR_INVALID_AUTH_CREDENTIALS"):
	case err == nil && resp != nil && resp.Status == 401:
	default:
		t.Fatalf("page without login: %v, %v", err, fmt.Sprint(resp))
	}
}
