package main

import (
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// storeCounters are edged's write counters from /metrics: the station
// committer's commits and the changes they carried, and the store's write
// transactions (by what ran them), fsyncs, file growths and the
// operations the transactions made durable.
type storeCounters struct {
	ok               bool
	commits, changes float64
	fsyncs, grows    float64
	txs              map[string]float64 // by operation: commit, ack, device_flush...
	ops              map[string]float64 // commit, ack, device_state
	// writeLE is the store's write transactions by time to the disk:
	// how many took at most each bound, in seconds (the last, +Inf, is
	// all of them).
	writeLE map[float64]float64
}

// readCounters reads edged's /metrics on httpAddr (the page has no users,
// so it serves loopback without a login); ok is false when it cannot.
func readCounters(httpAddr string) storeCounters {
	s := storeCounters{txs: map[string]float64{}, ops: map[string]float64{}, writeLE: map[float64]float64{}}
	if httpAddr == "" {
		return s
	}
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		return s
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	for _, line := range strings.Split(string(body), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		v, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			continue
		}
		name, label, _ := strings.Cut(f[0], "{")
		if _, val, ok := strings.Cut(label, `="`); ok {
			label = strings.TrimSuffix(val, `"}`)
		}
		switch name {
		case "edged_station_commits_total":
			s.commits = v
		case "edged_station_commit_changes_total":
			s.changes = v
		case "edged_store_fsyncs_total":
			s.fsyncs, s.ok = v, true
		case "edged_store_file_grows_total":
			s.grows = v
		case "edged_store_write_txs_total":
			s.txs[label] = v
		case "edged_store_ops_total":
			s.ops[label] = v
		case "edged_store_write_seconds_bucket":
			if le, err := strconv.ParseFloat(label, 64); err == nil { // "+Inf" parses too
				s.writeLE[le] = v
			}
		}
	}
	return s
}

// since is what happened between b and s.
func (s storeCounters) since(b storeCounters) storeCounters {
	d := storeCounters{ok: s.ok && b.ok, commits: s.commits - b.commits, changes: s.changes - b.changes,
		fsyncs: s.fsyncs - b.fsyncs, grows: s.grows - b.grows, txs: map[string]float64{}, ops: map[string]float64{},
		writeLE: map[float64]float64{}}
	for k, v := range s.txs {
		d.txs[k] = v - b.txs[k]
	}
	for k, v := range s.ops {
		d.ops[k] = v - b.ops[k]
	}
	for k, v := range s.writeLE {
		d.writeLE[k] = v - b.writeLE[k]
	}
	return d
}

func (s storeCounters) tx() float64 {
	var n float64
	for _, v := range s.txs {
		n += v
	}
	return n
}

// fsyncCell says, for counters d over secs seconds: fsyncs per second,
// the write transactions that paid them by what ran them, and what each
// transaction carried.
func fsyncCell(d storeCounters, secs float64) string {
	if !d.ok || secs <= 0 {
		return "not counted (edged without edged_store_fsyncs_total)"
	}
	tx := d.tx()
	other := tx - d.txs["commit"] - d.txs["ack"]
	return fmt.Sprintf("%.0f fsyncs/s = 2 × %.1f write tx/s (commit %.1f, ack alone %.1f, other %.1f) + %.1f file growths/s; "+
		"each tx carried %.2f commits, %.2f acks, %.2f device states",
		d.fsyncs/secs, tx/secs, d.txs["commit"]/secs, d.txs["ack"]/secs, other/secs, d.grows/secs,
		per(d.ops["commit"], tx), per(d.ops["ack"], tx), per(d.ops["device_state"], tx))
}

// per is x/y, 0 when y is.
func per(x, y float64) float64 {
	if y == 0 {
		return 0
	}
	return x / y
}

// writeTimeCell says how long d's write transactions took to reach the
// disk: the buckets their p50 and p99 fall in, and how many took longer
// than slow (a bucket bound). A grant that meets one waits for it.
func writeTimeCell(d storeCounters, slow time.Duration) string {
	all := d.writeLE[math.Inf(1)]
	if all <= 0 {
		return "not counted (edged without edged_store_write_seconds)"
	}
	bounds := slices.Sorted(maps.Keys(d.writeLE))
	// bucket names the i-th bucket: (bounds[i-1], bounds[i]].
	bucket := func(i int) string {
		switch {
		case math.IsInf(bounds[i], 1):
			return "> " + msOf(bounds[i-1]) + " ms"
		case i == 0:
			return "≤ " + msOf(bounds[0]) + " ms"
		}
		return msOf(bounds[i-1]) + "–" + msOf(bounds[i]) + " ms"
	}
	at := func(pct float64) string {
		for i, b := range bounds {
			if d.writeLE[b] >= math.Ceil(pct/100*all) {
				return bucket(i)
			}
		}
		return "?"
	}
	over := all - d.writeLE[slow.Seconds()]
	slowest := 0
	for i := len(bounds) - 1; i > 0; i-- {
		if d.writeLE[bounds[i]] > d.writeLE[bounds[i-1]] {
			slowest = i
			break
		}
	}
	return fmt.Sprintf("%.0f write tx: p50 %s, p99 %s; %.0f over %s ms (%.1f %%), the slowest %s",
		all, at(50), at(99), over, msOf(slow.Seconds()), 100*over/all, bucket(slowest))
}

// msOf formats seconds as milliseconds.
func msOf(s float64) string { return strconv.FormatFloat(s*1000, 'g', -1, 64) }
