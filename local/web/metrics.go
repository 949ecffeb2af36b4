package web

import (
	"log/slog"
	"sort"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/stationedge/edged"
)

// newRegistry is the server's own registry (never the global one): Go and
// process figures, and the station's, read from their sources at each
// scrape so no other package needs instrumenting.
func (s *Server) newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		newStationCollector(s),
	)
	return reg
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("edged_"+name, help, labels, nil)
}

// Every metric edged exports at /metrics.
var (
	mInfo        = desc("build_info", "Always 1; the version and station as labels.", "version", "station")
	mUptime      = desc("uptime_seconds", "Seconds since edged started.")
	mClockSynced = desc("clock_synced", "1 while the wall clock is synchronized (§4).")

	mDevices        = desc("devices", "Devices configured.")
	mDevicesOnline  = desc("devices_online", "Devices online (connected or answering polls).")
	mDevicesStatus  = desc("devices_status", "Devices by the status they last reported.", "status")
	mDevicesMaint   = desc("devices_maintenance", "Devices in maintenance.")
	mBrokerClients  = desc("local_devices_connected", "Devices connected to the local broker now.")
	mMessagesIn     = desc("local_messages_in_total", "Device messages received on the local broker.")
	mMessagesOut    = desc("local_messages_out_total", "Commands published to devices on the local broker.")
	mBrokerAuthFail = desc("local_auth_failures_total", "Device CONNECTs refused on the local broker.")
	mACLDenials     = desc("local_acl_denials_total", "Device publishes and subscriptions refused by the ACL.")
	mBadInput       = desc("local_bad_input_total", "Device payloads dropped as too large or malformed.")
	mThrottled      = desc("local_throttled_total", "Device publishes held back by local.max_publish_rate.")
	mRelayDropped   = desc("local_relay_dropped_total", "Relayed rental messages dropped: over 5 a minute per device, or no relay.")
	mHTTPAuthFail   = desc("http_auth_failures_total", "HTTP requests refused for wrong credentials.")

	mOutboxEvents  = desc("outbox_events", "Events queued for the cloud.")
	mOutboxBytes   = desc("outbox_bytes", "Bytes of events queued for the cloud.")
	mOutboxOldest  = desc("outbox_oldest_age_seconds", "Age of the oldest queued event, 0 when the queue is empty.")
	mOutboxDropped = desc("outbox_dropped_total", "Events dropped under the outbox quota.")
	mEventsLastSeq = desc("events_last_seq", "Seq of the newest event in the log.")

	mUplinkState      = desc("uplink_state", "1 for the uplink's current state.", "state")
	mUplinkReconnects = desc("uplink_reconnects_total", "Uplink connections made after the first.")
	mUplinkConnects   = desc("uplink_connects_total", "Uplink connections made, the first included.")
	mUplinkAcked      = desc("uplink_last_acked_seq", "Highest event seq acknowledged by the cloud.")
	mUplinkProfile    = desc("uplink_profile", "Always 1; the cloud profile as a label.", "profile")
	mUplinkMessages   = desc("uplink_messages_sent_total", "PUBLISH packets sent to the cloud, resends included.")
	mUplinkEvents     = desc("uplink_events_sent_total", "Events sent to the cloud, resends included.")
	mUplinkBatches    = desc("uplink_batches_total", "Event messages sent as batches (batch_events > 1).")
	mUplinkWaits      = desc("uplink_pacing_waits_total", "Publishes held back by uplink.max_publish_rate.")
	mUplinkRefused    = desc("uplink_refused_total", "Events the cloud could not take: over max_message_kb, or refused; released unsent.")
	mUplinkLive       = desc("uplink_live_events_total", "Rental and command results also sent ahead of a draining backlog (the drain sends them again).")
	mUplinkDownHeld   = desc("uplink_down_held_total", "Retries of cloud messages the station could not store, held on the connection.")

	mRentalsActive  = desc("rentals_active", "Rentals starting or running.")
	mRentalsStarted = desc("rentals_started_total", "Rentals started since edged started.")
	mRentalsEnded   = desc("rentals_ended_total", "Rentals ended since edged started, by reason.", "reason")
	mRentalResults  = desc("rental_results_total", "rental.result events since edged started, by reason (ok for success).", "reason")
	mCommandResults = desc("command_results_total", "command.result events since edged started, by reason (ok for success).", "reason")
	mUnrentedUse    = desc("unrented_use_total", "Devices stopped for use without a rental.")
	mCommits        = desc("station_commits_total", "Store commits made by the station's committer, one fsync each.")
	mCommitChanges  = desc("station_commit_changes_total", "Decisions' changes those commits carried.")

	mStoreTxs    = desc("store_write_txs_total", "Write transactions the store committed, by the operation that ran them.", "by")
	mStoreFsyncs = desc("store_fsyncs_total", "fsync and fdatasync calls of the store: two per write transaction, one per file growth.")
	mStoreGrows  = desc("store_file_grows_total", "Growths of the store's file, one fsync each.")
	mStoreOps    = desc("store_ops_total", "Operations the store's write transactions made durable: commits, acks, device states.", "kind")
	mStoreWrite  = desc("store_write_seconds", "Time each write transaction took to write and sync its pages, then its meta page.")

	mBusPortOpen    = desc("bus_port_open", "1 while the bus's serial port is open.", "bus")
	mBusOpens       = desc("bus_port_opens_total", "Successful opens of the bus's port; more than 1 means it was reopened.", "bus")
	mBusPortErrors  = desc("bus_port_errors_total", "I/O failures of the bus's port.", "bus")
	mBusRequests    = desc("bus_requests_total", "Modbus requests sent, retries included.", "bus")
	mBusTimeouts    = desc("bus_timeouts_total", "Modbus requests with no reply.", "bus")
	mBusCRCErrors   = desc("bus_crc_errors_total", "Modbus replies with a bad CRC.", "bus")
	mBusFrameErrors = desc("bus_frame_errors_total", "Modbus replies garbled, truncated or mismatched.", "bus")
	mBusExceptions  = desc("bus_exceptions_total", "Modbus exception replies.", "bus")
	mBusFailedPolls = desc("bus_failed_polls_total", "Device polls that failed.", "bus")
	mBusDevOnline   = desc("bus_devices_online", "Serial devices answering polls.", "bus")
)

// stationCollector reads the station, uplink, buses and broker at scrape
// time.
type stationCollector struct{ s *Server }

func newStationCollector(s *Server) prometheus.Collector { return stationCollector{s} }

func (c stationCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{mInfo, mUptime, mClockSynced,
		mDevices, mDevicesOnline, mDevicesStatus, mDevicesMaint, mBrokerClients, mMessagesIn, mMessagesOut,
		mBrokerAuthFail, mACLDenials, mBadInput, mThrottled, mRelayDropped, mHTTPAuthFail,
		mOutboxEvents, mOutboxBytes, mOutboxOldest, mOutboxDropped, mEventsLastSeq,
		mUplinkState, mUplinkReconnects, mUplinkConnects, mUplinkAcked,
		mUplinkProfile, mUplinkMessages, mUplinkEvents, mUplinkBatches, mUplinkWaits, mUplinkRefused, mUplinkLive, mUplinkDownHeld,
		mRentalsActive, mRentalsStarted, mRentalsEnded, mRentalResults, mCommandResults, mUnrentedUse,
		mCommits, mCommitChanges, mStoreTxs, mStoreFsyncs, mStoreGrows, mStoreOps, mStoreWrite,
		mBusPortOpen, mBusOpens, mBusPortErrors, mBusRequests, mBusTimeouts, mBusCRCErrors,
		mBusFrameErrors, mBusExceptions, mBusFailedPolls, mBusDevOnline} {
		ch <- d
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c stationCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	now := s.cfg.Clock.Now()
	gauge(mInfo, 1, s.cfg.Version, s.cfg.StationID)
	gauge(mUptime, now.Sub(s.cfg.StartedAt).Seconds())
	gauge(mClockSynced, b2f(s.cfg.Clock.Synced()))

	states := s.cfg.Station.DeviceStates()
	n := countDevices(states)
	gauge(mDevices, float64(n.Total))
	gauge(mDevicesOnline, float64(n.Online))
	gauge(mDevicesMaint, float64(n.Maintenance))
	byStatus := map[edged.Status]int{edged.StatusIdle: 0, edged.StatusInUse: 0, edged.StatusFault: 0, edged.StatusUnknown: 0}
	for _, d := range states {
		byStatus[d.Status]++
	}
	for st, v := range byStatus {
		gauge(mDevicesStatus, float64(v), string(st))
	}

	if s.cfg.Broker != nil {
		b := s.cfg.Broker()
		gauge(mBrokerClients, float64(b.Connected))
		counter(mMessagesIn, float64(b.MessagesIn))
		counter(mMessagesOut, float64(b.MessagesOut))
		counter(mBrokerAuthFail, float64(b.AuthFailures))
		counter(mACLDenials, float64(b.ACLDenials))
		counter(mBadInput, float64(b.BadInput))
		counter(mThrottled, float64(b.Throttled))
		counter(mRelayDropped, float64(b.RelayDropped))
	}
	counter(mHTTPAuthFail, float64(s.auth.Load().Failures()))

	u := s.uplinkStatus()
	gauge(mOutboxEvents, float64(u.Outbox.Events))
	gauge(mOutboxBytes, float64(u.Outbox.Bytes))
	gauge(mOutboxOldest, float64(u.Outbox.OldestAgeS))
	counter(mOutboxDropped, float64(u.Outbox.Dropped))
	gauge(mEventsLastSeq, float64(u.Outbox.LastSeq))
	for _, st := range []string{"connected", "connecting", "disabled"} {
		gauge(mUplinkState, b2f(u.State == st), st)
	}
	counter(mUplinkReconnects, float64(u.Reconnects))
	counter(mUplinkConnects, float64(u.Connects))
	gauge(mUplinkAcked, float64(u.LastAckedSeq))
	if u.Profile != "" {
		gauge(mUplinkProfile, 1, u.Profile)
	}
	counter(mUplinkMessages, float64(u.MessagesSent))
	counter(mUplinkEvents, float64(u.EventsSent))
	counter(mUplinkBatches, float64(u.Batches))
	counter(mUplinkWaits, float64(u.PacingWaits))
	counter(mUplinkRefused, float64(u.Refused))
	counter(mUplinkLive, float64(u.LiveEvents))
	counter(mUplinkDownHeld, float64(u.DownHeld))

	gauge(mRentalsActive, float64(len(s.cfg.Station.ActiveRentals())))
	st := s.cfg.Station.Stats()
	counter(mRentalsStarted, float64(st.Started))
	// Every end reason shows, even before it happens. A fresh map: the
	// station's may be nil, or its own.
	ended := map[edged.Reason]uint64{edged.ReasonExpired: 0, edged.ReasonCancelled: 0, edged.ReasonRenterEnded: 0,
		edged.ReasonOperator: 0, edged.ReasonDeviceFault: 0}
	for r, v := range st.Ended {
		ended[r] = v
	}
	for r, v := range ended {
		counter(mRentalsEnded, float64(v), string(r))
	}
	for r, v := range st.Results {
		counter(mRentalResults, float64(v), r)
	}
	for r, v := range st.Commands {
		counter(mCommandResults, float64(v), r)
	}
	counter(mUnrentedUse, float64(st.UnrentedUse))
	counter(mCommits, float64(st.Commits))
	counter(mCommitChanges, float64(st.CommitChanges))

	if ws, ok := s.cfg.Store.(storeWriter); ok {
		w := ws.Writes()
		for by, v := range w.Txs {
			counter(mStoreTxs, float64(v), by)
		}
		counter(mStoreFsyncs, float64(w.Fsyncs))
		counter(mStoreGrows, float64(w.Grows))
		counter(mStoreOps, float64(w.Commits), "commit")
		counter(mStoreOps, float64(w.Acks), "ack")
		counter(mStoreOps, float64(w.DeviceStates), "device_state")
		ch <- histogram(mStoreWrite, w.WriteTime)
	}

	buses := s.buses()
	sort.Slice(buses, func(i, j int) bool { return buses[i].Name < buses[j].Name })
	for i, b := range buses {
		if i > 0 && buses[i-1].Name == b.Name {
			continue // a duplicate label set would fail the scrape
		}
		gauge(mBusPortOpen, b2f(b.PortOpen), b.Name)
		counter(mBusOpens, float64(b.Opens), b.Name)
		counter(mBusPortErrors, float64(b.PortErrors), b.Name)
		counter(mBusRequests, float64(b.Requests), b.Name)
		counter(mBusTimeouts, float64(b.Timeouts), b.Name)
		counter(mBusCRCErrors, float64(b.CRCErrors), b.Name)
		counter(mBusFrameErrors, float64(b.FrameErrors), b.Name)
		counter(mBusExceptions, float64(b.Exceptions), b.Name)
		counter(mBusFailedPolls, float64(b.FailedPolls), b.Name)
		online := 0
		for _, d := range b.Devices {
			if d.State == "online" {
				online++
			}
		}
		gauge(mBusDevOnline, float64(online), b.Name)
	}
}

// histogram exports h in seconds, its buckets cumulative as Prometheus
// has them.
func histogram(d *prometheus.Desc, h edged.DurationHistogram) prometheus.Metric {
	buckets := make(map[float64]uint64, len(h.Bounds))
	var n uint64
	for i, b := range h.Bounds {
		n += h.Counts[i]
		buckets[b.Seconds()] = n
	}
	return prometheus.MustNewConstHistogram(d, h.Count(), h.Sum.Seconds(), buckets)
}

// storeWriter is what a Store that counts its writes offers.
type storeWriter interface {
	Writes() edged.StoreWrites
}

// promLogger sends promhttp's errors to the server's log.
type promLogger struct{ log *slog.Logger }

func (l promLogger) Println(v ...any) { l.log.Error("metrics", "err", v) }
