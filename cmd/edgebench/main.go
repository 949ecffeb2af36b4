// Command edgebench measures edged beside the setup an operator would
// otherwise choose, mosquitto with a bridge (plus scripts), on the same
// machine in the same run, and prints one markdown table.
//
//	go run ./cmd/edgebench            # full run, about 14 minutes
//	go run ./cmd/edgebench -quick     # about 4 minutes
//	go run ./cmd/edgebench -only ingest,drain
//
// It builds the real edged binary into a temp dir, runs it and Debian's
// mosquitto (/usr/sbin/mosquitto) as child processes on loopback, drives
// them with simulated devices and a stand-in cloud in this process, reads
// CPU, memory and disk writes from /proc, and removes everything it started
// and wrote when it ends. Scenarios: ingest (as fast as devices can, then
// 1,000 device events a second counting edged's fsyncs), rental, drain, footprint,
// wear, restart, storm (logins after a SIGKILL), profiles (the drain through the cloud emulators of
// internal/cloudemu). Targets are reported, never asserted; CI does not run it.
// BENCHMARKS.md holds the method and the last results.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

func main() {
	quick := flag.Bool("quick", false, "smaller loads and shorter runs (about 4 minutes instead of 12)")
	only := flag.String("only", "", "comma-separated scenarios to run: "+strings.Join(scenarioNames, ","))
	keep := flag.Bool("keep", false, "keep the temp dir (configs, logs, data) for inspection")
	verbose := flag.Bool("v", false, "print progress")
	cases := flag.String("cases", "", "drain cases only, e.g. edged:offline,mosquitto-safe:mid (gateways edged, mosquitto-default, mosquitto-safe; kills none, offline, mid)")
	prebuilt := flag.String("edged", "", "use this edged binary instead of building one (e.g. an unstripped build for perf)")
	flag.Parse()
	benchBin.edged = *prebuilt
	os.Exit(run(*quick, *only, *keep, *verbose, *cases))
}

var scenarioNames = []string{"ingest", "rental", "drain", "footprint", "wear", "restart", "storm", "profiles"}

func run(quick bool, only string, keep, verbose bool, cases string) int {
	want := map[string]bool{}
	for _, s := range strings.Split(only, ",") {
		if s = strings.TrimSpace(s); s != "" {
			if !contains(scenarioNames, s) {
				fmt.Fprintf(os.Stderr, "edgebench: unknown scenario %q (have %s)\n", s, strings.Join(scenarioNames, ", "))
				return 2
			}
			want[s] = true
		}
	}
	if _, err := os.Stat(benchBinMosquitto); err != nil {
		fmt.Fprintln(os.Stderr, "edgebench: needs mosquitto at", benchBinMosquitto, "(apt-get install mosquitto)")
		return 2
	}
	nofile, err := raiseNoFile()
	if err != nil || nofile < 12000 {
		fmt.Fprintf(os.Stderr, "edgebench: open files limit %d (%v): 5,000 devices need about 12,000\n", nofile, err)
	}
	dir, err := os.MkdirTemp("", "edgebench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "edgebench:", err)
		return 1
	}
	b := &bench{dir: dir, quick: quick, verbose: verbose, cases: cases}
	cleanup := func() {
		killAll()
		if keep {
			fmt.Fprintln(os.Stderr, "edgebench: kept", dir)
		} else {
			os.RemoveAll(dir)
		}
	}
	defer cleanup()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "edgebench: interrupted, cleaning up")
		cleanup()
		os.Exit(130)
	}()

	root, err := moduleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "edgebench:", err)
		return 1
	}
	moduleDir = root
	start := time.Now()
	load0 := loadavg()
	if benchBin.edged == "" {
		b.logf("building edged")
		bin, err := buildEdged(dir, "", "", "")
		if err != nil {
			fmt.Fprintln(os.Stderr, "edgebench:", err)
			return 1
		}
		benchBin.edged = bin
	}

	t := &table{}
	failed := 0
	scenarios := map[string]func(*table) error{
		"ingest": b.scenarioIngest, "rental": b.scenarioRental, "drain": b.scenarioDrain,
		"footprint": b.scenarioFootprint, "wear": b.scenarioWear, "restart": b.scenarioRestart, "storm": b.scenarioStorm,
		"profiles": b.scenarioProfiles,
	}
	for _, name := range scenarioNames {
		if len(want) > 0 && !want[name] {
			continue
		}
		b.logf("scenario %s", name)
		s0 := time.Now()
		if err := scenarios[name](t); err != nil {
			failed++
			fmt.Fprintf(os.Stderr, "edgebench: %s: %v\n", name, err)
			t.add(name, "error", err.Error(), "", "", "NOT MEASURED")
		}
		killAll() // nothing outlives its scenario
		b.logf("scenario %s took %v", name, time.Since(s0).Round(time.Second))
	}
	mode := "full"
	if quick {
		mode = "quick"
	}
	fmt.Printf("edgebench (%s run, %v, edged at %s, %s, %d CPUs, %s; load average %s at start, %s at end)\n\n",
		mode, time.Since(start).Round(time.Second), gitHead(), runtime.Version(), runtime.NumCPU(), cpuModel(), load0, loadavg())
	t.print(os.Stdout)
	if failed > 0 {
		return 1
	}
	return 0
}

var moduleDir string

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	p := strings.TrimSpace(string(out))
	if p == "" || p == os.DevNull {
		return "", fmt.Errorf("run edgebench inside the edged module (go run ./cmd/edgebench)")
	}
	return filepath.Dir(p), nil
}

// gitHead names the commit measured; "+dirty" when the tree has changes
// (others may be editing the checkout while the bench runs).
func gitHead() string {
	cmd := exec.Command("git", "describe", "--always", "--dirty=+dirty")
	cmd.Dir = moduleDir
	out, err := cmd.Output()
	if err != nil {
		return "unknown commit"
	}
	return strings.TrimSpace(string(out))
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func contains(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}

func (b *bench) logf(format string, args ...any) {
	if b.verbose {
		fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}
}

// table is the one table printed at the end.
type table struct {
	rows [][6]string
}

func (t *table) add(scenario, metric, edged, peer, target, verdict string) {
	t.rows = append(t.rows, [6]string{scenario, metric, edged, peer, target, verdict})
}

func (t *table) print(w *os.File) {
	fmt.Fprintln(w, "| scenario | measure | edged | peer (mosquitto) | target | verdict |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	for _, r := range t.rows {
		for i := range r {
			r[i] = strings.ReplaceAll(r[i], "|", "/")
			r[i] = strings.ReplaceAll(r[i], "\n", " ")
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(r[:], " | "))
	}
}
