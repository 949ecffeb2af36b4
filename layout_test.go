package edged_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLayout enforces the house layout: the root package imports only the
// standard library, and each package that wraps an outside world imports
// the root, never another of them.
func TestLayout(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	const mod = "github.com/stationedge/edged"
	worlds := []string{"store", "local", "local/web", "uplink", "serial"}
	deps := func(pkg string) []string {
		out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", pkg).Output()
		if err != nil {
			t.Fatalf("go list %s: %v", pkg, err)
		}
		return strings.Fields(string(out))
	}
	for _, d := range deps(mod) {
		if d != mod {
			t.Errorf("the root package depends on %s; it must use only the standard library", d)
		}
	}
	// owner is the world a package belongs to: the longest matching prefix.
	owner := func(p string) string {
		best := ""
		for _, w := range worlds {
			if (p == mod+"/"+w || strings.HasPrefix(p, mod+"/"+w+"/")) && len(w) > len(best) {
				best = w
			}
		}
		return best
	}
	for _, w := range worlds {
		pkg := mod + "/" + w
		if err := exec.Command("go", "list", pkg).Run(); err != nil {
			continue // not built yet
		}
		for _, d := range deps(pkg) {
			if o := owner(d); o != "" && o != w {
				t.Errorf("%s imports %s", w, d)
			}
		}
	}
}
