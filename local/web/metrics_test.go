package web_test

import (
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/stationedge/edged"
)

// /metrics shows the store's write transactions and fsyncs as the store
// counts them, so the fsyncs a station pays can be read beside the commits
// they carried.
func TestMetricsStoreWrites(t *testing.T) {
	s := newStation(t)
	s.online("chair-1", edged.StatusIdle)
	s.startRental("r-1", "chair-1", "alice", 600)
	before := s.db.Writes()
	r := s.do(req{path: "/metrics"})
	after := s.db.Writes()
	if r.code != http.StatusOK {
		t.Fatalf("metrics: %d", r.code)
	}
	values := map[string]float64{}
	for _, l := range strings.Split(string(r.body), "\n") {
		name, v, ok := strings.Cut(l, " ")
		if !ok || !strings.HasPrefix(name, "edged_store_") {
			continue
		}
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			t.Errorf("odd metric line %q", l)
			continue
		}
		values[name] = f
	}
	for _, c := range []struct {
		name      string
		low, high uint64
	}{
		{"edged_store_fsyncs_total", before.Fsyncs, after.Fsyncs},
		{"edged_store_file_grows_total", before.Grows, after.Grows},
		{`edged_store_write_txs_total{by="commit"}`, before.Txs["commit"], after.Txs["commit"]},
		{`edged_store_write_txs_total{by="ack"}`, before.Txs["ack"], after.Txs["ack"]},
		{`edged_store_ops_total{kind="commit"}`, before.Commits, after.Commits},
		{`edged_store_ops_total{kind="ack"}`, before.Acks, after.Acks},
		{`edged_store_ops_total{kind="device_state"}`, before.DeviceStates, after.DeviceStates},
		{"edged_store_write_seconds_count", before.WriteTime.Count(), after.WriteTime.Count()},
		{`edged_store_write_seconds_bucket{le="+Inf"}`, before.WriteTime.Count(), after.WriteTime.Count()},
	} {
		got, ok := values[c.name]
		if !ok {
			t.Errorf("metrics lack %s", c.name)
			continue
		}
		if got < float64(c.low) || got > float64(c.high) {
			t.Errorf("%s = %v, the store counted %d before the scrape and %d after", c.name, got, c.low, c.high)
		}
	}
	// The write times are a histogram in seconds: cumulative buckets, one
	// per bound, the last holding every transaction.
	prev := 0.0
	for _, b := range after.WriteTime.Bounds {
		name := `edged_store_write_seconds_bucket{le="` + strconv.FormatFloat(b.Seconds(), 'g', -1, 64) + `"}`
		v, ok := values[name]
		if !ok {
			t.Errorf("metrics lack %s", name)
			continue
		}
		if v < prev {
			t.Errorf("%s = %v, below the bucket before it (%v)", name, v, prev)
		}
		prev = v
	}
	if all := values["edged_store_write_seconds_count"]; prev > all || all < 2 {
		t.Errorf("write time buckets reach %v of %v transactions, want at least the grant's and the start's", prev, all)
	}
	if values["edged_store_write_seconds_sum"] <= 0 {
		t.Errorf("write time sum %v, want the time those transactions took", values["edged_store_write_seconds_sum"])
	}
	// The rental's grant and start were committed: fsyncs were paid.
	if values[`edged_store_write_txs_total{by="commit"}`] < 1 || values["edged_store_fsyncs_total"] < 2 {
		t.Errorf("metrics show %v commit transactions and %v fsyncs after a rental, want at least 1 and 2",
			values[`edged_store_write_txs_total{by="commit"}`], values["edged_store_fsyncs_total"])
	}
}
