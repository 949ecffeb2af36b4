// edged status page: polls the JSON API and keeps the page current without
// a reload. Time left is counted down here every second from what the
// station said at the last poll, so a phone with a wrong clock still shows
// the right time.
'use strict';

(function () {
  const POLL_MS = 1500;
  const QUEUE_WARN_EVENTS = 500, QUEUE_BAD_EVENTS = 10000;
  const QUEUE_WARN_AGE = 300, QUEUE_BAD_AGE = 3600;

  const $ = (sel) => document.querySelector(sel);
  let clockOffset = 0;      // station time minus browser time, ms
  let lastStatus = null;
  const left = new Map();   // device id -> {s: seconds left at fetch, at: performance.now()}
  const rows = new Map();   // device id -> row elements
  let lastOK = 0;
  let timer = null;

  function url(path) { return new URL(path, window.location.origin).toString(); }

  async function api(path, opts) {
    const o = Object.assign({ headers: {}, credentials: 'same-origin', cache: 'no-store' }, opts || {});
    o.headers['Accept'] = 'application/json';
    const r = await fetch(url(path), o);
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) {
      const msg = body && body.error ? body.error : ('HTTP ' + r.status);
      const err = new Error(msg);
      err.status = r.status;
      throw err;
    }
    return body;
  }

  function text(el, s) { if (el && el.textContent !== String(s)) el.textContent = String(s); }
  function cls(el, name, on) { if (el) el.classList.toggle(name, !!on); }

  function fmtDur(s) {
    s = Math.max(0, Math.floor(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), x = s % 60;
    const mm = String(m).padStart(h ? 2 : 1, '0'), ss = String(x).padStart(2, '0');
    return h ? h + ':' + mm + ':' + ss : mm + ':' + ss;
  }
  function fmtAgo(s) {
    if (s < 0) s = 0;
    if (s < 60) return Math.floor(s) + ' s ago';
    if (s < 3600) return Math.floor(s / 60) + ' min ago';
    if (s < 86400) return Math.floor(s / 3600) + ' h ago';
    return Math.floor(s / 86400) + ' d ago';
  }
  function fmtBytes(n) {
    if (n < 1024) return n + ' B';
    if (n < 1048576) return (n / 1024).toFixed(1) + ' KiB';
    return (n / 1048576).toFixed(1) + ' MiB';
  }
  function stationNow() { return Date.now() + clockOffset; }
  function fmtTime(iso) {
    const d = new Date(iso);
    if (isNaN(d)) return '';
    return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }

  function toast(msg, bad) {
    const t = $('#toast');
    text(t, msg);
    cls(t, 'bad', bad);
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
  }

  function renderStatus(st) {
    lastStatus = st;
    clockOffset = new Date(st.now).getTime() - Date.now();
    text($('#uptime'), fmtDur(st.uptime_s));
    text($('#version'), st.version);
    const sync = $('#clock-sync');
    text(sync, st.clock_synced ? 'clock synced' : 'clock NOT synced');
    cls(sync, 'ok', st.clock_synced);
    cls(sync, 'warn', !st.clock_synced);

    const u = st.uplink;
    const us = $('#uplink-state');
    text(us, u.state);
    us.dataset.state = u.state;
    cls(us, 'ok', u.state === 'connected');
    cls(us, 'bad', u.state === 'connecting');
    cls(us, 'muted', u.state === 'disabled');
    text($('#uplink-since'), u.connected_since ? fmtTime(u.connected_since) : '–');
    const ob = u.outbox;
    text($('#outbox-events'), ob.events);
    text($('#outbox-bytes'), fmtBytes(ob.bytes));
    text($('#outbox-oldest'), ob.events ? fmtDur(ob.oldest_age_s) : '–');
    text($('#outbox-dropped'), ob.dropped);
    text($('#uplink-profile'), u.profile ? u.profile + (u.identity ? ' · ' + u.identity : '') : '–');
    text($('#uplink-sent'), (u.events_sent || 0) + ' events in ' + (u.messages_sent || 0) + ' messages' +
      (u.batches ? ', ' + u.batches + ' batches' : '') + (u.pacing_waits ? ', ' + u.pacing_waits + ' paced' : ''));
    $('#uplink-refused-row').hidden = !u.refused;
    text($('#uplink-refused'), u.refused || 0);
    const qBad = ob.events >= QUEUE_BAD_EVENTS || ob.oldest_age_s >= QUEUE_BAD_AGE;
    const qWarn = ob.events >= QUEUE_WARN_EVENTS || ob.oldest_age_s >= QUEUE_WARN_AGE || ob.dropped > 0;
    const card = $('#uplink-card');
    cls(card, 'bad', u.state === 'connecting' || qBad);
    cls(card, 'warn', !qBad && qWarn);
    $('#uplink-error-row').hidden = !u.last_error;
    text($('#uplink-error'), u.last_error || '');

    const d = st.devices;
    text($('#dev-online'), d.online);
    text($('#dev-total'), d.total);
    text($('#dev-inuse'), d.in_use);
    text($('#dev-fault'), d.fault);
    text($('#dev-maint'), d.maintenance);
    text($('#rentals-active'), st.rentals.active);
    const dl = st.device_list;
    if (dl) {
      text($('#dev-source'), dl.from === 'registry'
        ? 'registry v' + dl.version + ', ' + new Date(dl.applied_at).toLocaleString()
        : 'config, ' + new Date(dl.applied_at).toLocaleString());
      const r = dl.last_refusal;
      $('#dev-refusal-row').hidden = !r;
      text($('#dev-refusal'), r ? r.what + (r.version ? ' v' + r.version : '') + ': ' + r.reason +
        (r.errors && r.errors.length ? ' — ' + r.errors.join('; ') : '') : '');
    }
    cls($('#devices-card'), 'bad', d.fault > 0);
    cls($('#devices-card'), 'warn', d.fault === 0 && d.online < d.total);

    const b = st.broker;
    $('#broker-card').hidden = !b;
    if (b) {
      text($('#broker-connected'), b.connected);
      text($('#broker-msgs'), b.messages_in + ' / ' + b.messages_out);
      text($('#broker-auth'), b.auth_failures);
      text($('#broker-acl'), b.acl_denials);
      text($('#broker-bad'), b.bad_input);
    }
    renderBuses(st.buses || []);
  }

  function renderBuses(buses) {
    $('#buses-section').hidden = buses.length === 0;
    const tb = $('#buses tbody');
    tb.replaceChildren(...buses.map((b) => {
      const tr = document.createElement('tr');
      const online = b.devices.filter((x) => x.state === 'online').length;
      const cells = [b.name, b.port + (b.port_open ? '' : ' (closed)'), online + ' / ' + b.devices.length,
        b.requests, b.timeouts, b.crc_errors, b.failed_polls, b.last_error || ''];
      const labels = ['Bus', 'Port', 'Devices online', 'Requests', 'Timeouts', 'CRC errors', 'Failed polls', 'Last error'];
      cells.forEach((c, i) => {
        const td = document.createElement('td');
        td.dataset.label = labels[i];
        td.textContent = c;
        tr.appendChild(td);
      });
      tr.dataset.bus = b.name;
      cls(tr, 'bad', !b.port_open);
      cls(tr, 'warn', b.port_open && online < b.devices.length);
      return tr;
    }));
  }

  const COLS = ['Device', 'Status', 'Online', 'Renter', 'Time left', 'Last seen', 'Location', 'Actions'];

  function deviceRow(id) {
    let r = rows.get(id);
    if (r) return r;
    const tr = document.createElement('tr');
    tr.dataset.device = id;
    const td = COLS.map((label) => {
      const c = document.createElement('td');
      c.dataset.label = label;
      tr.appendChild(c);
      return c;
    });
    const name = document.createElement('b');
    const kind = document.createElement('span');
    kind.className = 'kind';
    td[0].append(name, kind);
    td[0].className = 'id';
    const status = document.createElement('span');
    status.className = 'badge status';
    const fault = document.createElement('span');
    fault.className = 'fault-code';
    td[1].append(status, fault);
    td[2].className = 'online';
    td[3].className = 'renter';
    // A rental relayed by the device from the renter's phone (docs/relay.md),
    // typically during an uplink outage, carries a mark.
    const renter = document.createElement('span');
    const relayed = document.createElement('span');
    relayed.className = 'badge muted relayed';
    relayed.title = 'granted through the device, from the renter\'s phone';
    relayed.hidden = true;
    td[3].append(renter, relayed);
    td[4].className = 'left';
    td[5].className = 'seen';
    td[6].className = 'loc';
    const maint = document.createElement('button');
    maint.type = 'button';
    maint.className = 'maint';
    maint.addEventListener('click', () => setMaintenance(id, maint.dataset.on !== 'true'));
    const end = document.createElement('button');
    end.type = 'button';
    end.className = 'end danger';
    end.textContent = 'End rental';
    end.addEventListener('click', () => confirmEnd(id, end.dataset.rental, end.dataset.renter));
    td[7].className = 'actions';
    td[7].append(maint, end);
    r = { tr, td, name, kind, status, fault, renter, relayed, maint, end, seen: null };
    rows.set(id, r);
    return r;
  }

  function renderDevices(devs) {
    const tb = $('#devices tbody');
    const now = performance.now();
    const seenIDs = new Set();
    devs.forEach((d, i) => {
      seenIDs.add(d.device_id);
      const r = deviceRow(d.device_id);
      if (tb.children[i] !== r.tr) tb.insertBefore(r.tr, tb.children[i] || null);
      text(r.name, d.device_id);
      text(r.kind, d.kind ? ' ' + d.kind + ' · ' + d.transport : '');
      text(r.status, d.status.replace('_', ' '));
      r.status.dataset.status = d.status;
      text(r.fault, d.fault ? ' ' + d.fault : '');
      text(r.td[2], d.online ? 'online' : 'OFFLINE');
      cls(r.td[2], 'bad', !d.online);
      const rent = d.rental;
      text(r.renter, rent ? rent.renter_id + (d.rental_state === 'starting' ? ' (starting)' : '') : '–');
      const via = !!rent && d.rental_via === 'device';
      text(r.relayed, via ? 'relayed' : ''); // empty when hidden: td.renter reads as the renter alone
      r.relayed.hidden = !via;
      if (rent && typeof d.time_left_s === 'number') {
        left.set(d.device_id, { s: d.time_left_s, at: now });
      } else {
        left.delete(d.device_id);
      }
      r.seen = d.last_seen ? new Date(d.last_seen).getTime() : null;
      const loc = d.location;
      text(r.td[6], loc ? loc.lat.toFixed(5) + ', ' + loc.lon.toFixed(5) : '–');
      r.maint.dataset.on = String(d.maintenance);
      text(r.maint, d.maintenance ? 'End maintenance' : 'Start maintenance');
      r.end.hidden = !rent;
      r.end.dataset.rental = rent ? rent.rental_id : '';
      r.end.dataset.renter = rent ? rent.renter_id : '';
      cls(r.tr, 'fault', d.status === 'fault');
      cls(r.tr, 'offline', !d.online);
      cls(r.tr, 'maintenance', d.maintenance);
      cls(r.tr, 'rented', !!rent);
    });
    for (const [id, r] of rows) {
      if (!seenIDs.has(id)) { r.tr.remove(); rows.delete(id); left.delete(id); }
    }
    tick();
  }

  // tick redraws what changes with time alone: time left and last seen.
  function tick() {
    const now = performance.now();
    for (const [id, r] of rows) {
      const l = left.get(id);
      if (l) {
        const s = Math.max(0, l.s - Math.floor((now - l.at) / 1000));
        text(r.td[4], fmtDur(s));
        r.td[4].dataset.seconds = String(s);
        cls(r.td[4], 'low', s < 60);
      } else {
        text(r.td[4], '–');
        delete r.td[4].dataset.seconds;
      }
      text(r.td[5], r.seen ? fmtAgo((stationNow() - r.seen) / 1000) : 'never');
    }
    if (lastStatus) text($('#station-clock'), fmtTime(new Date(stationNow()).toISOString()));
    if (lastOK) text($('#updated'), 'updated ' + fmtAgo((Date.now() - lastOK) / 1000));
  }

  function summary(e) {
    const d = e.data || {};
    const parts = [];
    if (d.device_id) parts.push(d.device_id);
    if (d.rental_id) parts.push('rental ' + d.rental_id);
    if (d.renter_id) parts.push('renter ' + d.renter_id);
    if (d.cmd_id) parts.push('cmd ' + d.cmd_id);
    if (d.op) parts.push(d.op);
    if (d.via) parts.push('via ' + d.via);
    if (typeof d.ok === 'boolean') parts.push(d.ok ? 'ok' : 'refused');
    if (d.reason) parts.push(d.reason);
    if (typeof d.duration_s === 'number') parts.push(fmtDur(d.duration_s));
    if (typeof d.used_s === 'number') parts.push('used ' + fmtDur(d.used_s));
    if (d.event && d.event.type) parts.push(d.event.type);
    if (typeof d.count === 'number') parts.push(d.count + ' dropped');
    return parts.join(' · ');
  }

  function renderEvents(evs) {
    const tb = $('#events tbody');
    const list = evs.slice().reverse();
    tb.replaceChildren(...list.map((e) => {
      const tr = document.createElement('tr');
      const d = e.data || {};
      const bad = (d.ok === false) || e.type === 'device.offline' || e.type === 'outbox.dropped' ||
        e.type === 'device.unrented_use' || d.reason === 'device_fault';
      cls(tr, 'bad', bad);
      [['#', e.seq], ['Time', fmtTime(e.ts) + (e.clock_synced ? '' : ' (clock not synced)')], ['Event', e.type], ['Details', summary(e)]]
        .forEach(([label, v]) => {
          const td = document.createElement('td');
          td.dataset.label = label;
          td.textContent = v;
          tr.appendChild(td);
        });
      return tr;
    }));
  }

  function renderProblems(st, devs) {
    const items = [];
    devs.forEach((d) => {
      if (d.status === 'fault') items.push(['bad', d.device_id + ' is faulted' + (d.fault ? ' (' + d.fault + ')' : '')]);
      if (!d.online) items.push(['warn', d.device_id + ' is offline']);
    });
    if (st.uplink.state === 'connecting') items.push(['bad', 'cloud link is down']);
    const ob = st.uplink.outbox;
    if (ob.events >= QUEUE_WARN_EVENTS || ob.oldest_age_s >= QUEUE_WARN_AGE) {
      items.push([ob.events >= QUEUE_BAD_EVENTS || ob.oldest_age_s >= QUEUE_BAD_AGE ? 'bad' : 'warn',
        ob.events + ' events queued for the cloud, oldest ' + fmtDur(ob.oldest_age_s) + ' old']);
    }
    if (ob.dropped > 0) items.push(['warn', ob.dropped + ' events dropped under the queue quota']);
    if (!st.clock_synced) items.push(['warn', 'station clock is not synchronized']);
    (st.buses || []).forEach((b) => { if (!b.port_open) items.push(['bad', 'bus ' + b.name + ': port ' + b.port + ' is not open']); });
    const ul = $('#problems');
    ul.replaceChildren(...items.map(([k, t]) => {
      const li = document.createElement('li');
      li.className = k;
      li.textContent = t;
      return li;
    }));
    if (items.length === 0) {
      const li = document.createElement('li');
      li.className = 'ok';
      li.textContent = 'All devices online, no faults.';
      ul.appendChild(li);
    }
  }

  async function poll() {
    clearTimeout(timer);
    try {
      const [st, devs, evs] = await Promise.all([
        api('/api/v1/status'), api('/api/v1/devices'), api('/api/v1/events?limit=20')]);
      lastOK = Date.now();
      renderStatus(st);
      renderDevices(devs);
      renderEvents(evs);
      renderProblems(st, devs);
      $('#contact').hidden = true;
    } catch (e) {
      const c = $('#contact');
      text(c, e.status === 401 ? 'Not logged in: reload the page and log in.' : 'Lost contact with edged (' + e.message + ') — retrying…');
      c.hidden = false;
    }
    timer = setTimeout(poll, POLL_MS);
  }

  async function setMaintenance(id, on) {
    try {
      await api('/api/v1/devices/' + encodeURIComponent(id) + '/maintenance', {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ on: on }) });
      toast(id + ': maintenance ' + (on ? 'on' : 'off'));
    } catch (e) {
      toast(id + ': ' + e.message, true);
    }
    poll();
  }

  let pendingEnd = null;
  function confirmEnd(id, rental, renter) {
    pendingEnd = rental;
    text($('#confirm-text'), 'End rental ' + rental + ' of ' + renter + ' on ' + id + ' now? The device is stopped.');
    $('#confirm').showModal();
  }

  async function endRental() {
    const rental = pendingEnd;
    pendingEnd = null;
    $('#confirm').close();
    if (!rental) return;
    try {
      await api('/api/v1/rentals/' + encodeURIComponent(rental) + '/end', { method: 'POST' });
      toast('rental ' + rental + ' ended');
    } catch (e) {
      toast('rental ' + rental + ': ' + e.message, true);
    }
    poll();
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('#confirm-yes').addEventListener('click', endRental);
    $('#confirm-no').addEventListener('click', () => { pendingEnd = null; $('#confirm').close(); });
    setInterval(tick, 1000);
    poll();
  });
})();
