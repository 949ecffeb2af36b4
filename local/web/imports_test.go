package web_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImports keeps web on the domain's side of the house rule: it reads
// the store, the uplink, the buses and the broker through its own small
// interfaces and the funcs of Config, never by importing their packages.
func TestImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", "github.com/stationedge/edged/local/web").Output()
	if err != nil {
		t.Skipf("go list: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		switch p {
		case "github.com/stationedge/edged/store", "github.com/stationedge/edged/uplink",
			"github.com/stationedge/edged/serial", "github.com/stationedge/edged/local":
			t.Errorf("web depends on %s", p)
		}
		if strings.HasPrefix(p, "github.com/mochi-mqtt/") || strings.HasPrefix(p, "go.etcd.io/bbolt") ||
			strings.HasPrefix(p, "github.com/eclipse/paho") || strings.HasPrefix(p, "github.com/tarm/serial") {
			t.Errorf("web depends on %s", p)
		}
	}
}
