// The fleet page of fogline-cloud: plain DOM, no framework, no build step.
//
// Rules this file keeps:
// - Every value from the API is put on the page with `textContent` or as
//   an attribute value, never through `innerHTML`: node ids and stream
//   names come from the field.
// - The token lives in `sessionStorage` only (this tab), and goes with
//   every request as `Authorization: Bearer`. A 401 or 403 clears the
//   page: no data is left on screen for a refused token.
// - A field the aggregator does not send (older versions, nodes that never
//   reported status) shows as "—"; nothing is guessed.
// - u64s (cursor, incarnation) arrive as strings and stay strings.
"use strict";

(function () {
  const TOKEN_KEY = "fogline.token";
  const DASH = "\u2014";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  // `?refresh=<seconds>`: how often the page asks again (5 s by default).
  const refreshSeconds = (() => {
    const v = Number(new URLSearchParams(location.search).get("refresh"));
    return Number.isFinite(v) && v >= 0.2 ? v : 5;
  })();

  // Columns whose first click sorts biggest (or newest) first.
  const DESCENDING_FIRST = new Set(["last_seen", "lag", "rate", "backlog", "losses"]);

  let timer = null;
  let generation = 0; // bumped by a new or forgotten token: late answers are dropped
  let rows = []; // the nodes as shown, see `toRow`
  let sort = { key: "node", dir: 1 };
  let selected = null; // node id whose detail is open
  let detailGeneration = 0;
  let refreshes = 0;

  class Refused extends Error {}

  // --- talking to the aggregator -------------------------------------------

  async function api(path) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) throw new Refused("no token");
    let r;
    try {
      r = await fetch(path, {
        headers: { Authorization: "Bearer " + token, Accept: "application/json" },
        cache: "no-store",
      });
    } catch (e) {
      // A token with characters a header cannot carry is a refused token.
      if (e instanceof TypeError && /header/i.test(String(e.message))) throw new Refused(e.message);
      throw new Error("the aggregator did not answer (" + e.message + ")");
    }
    if (r.status === 401 || r.status === 403) throw new Refused(path + ": HTTP " + r.status);
    if (r.status === 404) return null;
    if (!r.ok) {
      let why = "";
      try {
        const body = await r.json();
        if (body && typeof body.error === "string") why = ": " + body.error;
      } catch (_) {
        /* not JSON */
      }
      throw new Error(path + ": HTTP " + r.status + why);
    }
    return r.json();
  }

  // --- values -----------------------------------------------------------------

  function num(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }

  function str(v) {
    return typeof v === "string" && v !== "" ? v : null;
  }

  function obj(v) {
    return v !== null && typeof v === "object" && !Array.isArray(v) ? v : null;
  }

  function list(v) {
    return Array.isArray(v) ? v : [];
  }

  /** One node of `/api/v1/nodes` as the table needs it. */
  function toRow(n, live) {
    const status = obj(n.status);
    const health = status ? str(status.health) : null;
    const connected = typeof n.connected === "boolean" ? n.connected : live.has(n.node);
    const state = health === "unhealthy" ? "unhealthy" : connected ? "connected" : "disconnected";
    let losses = num(n.lost_records);
    for (const l of list(n.losses)) {
      const r = num(obj(l) && l.records);
      if (r !== null) losses = (losses || 0) + r;
    }
    return {
      node: String(n.node),
      state,
      health,
      problems: status ? list(status.problems).filter((p) => typeof p === "string") : [],
      // The newest sign of life: the session's, else the last record applied.
      last_seen: num(n.last_seen_ms) ?? num(n.last_update_ms),
      lag: num(n.lag_ms),
      rate: num(n.records_per_s),
      backlog: status ? num(status.backlog_records) : null,
      losses,
      raw: n,
    };
  }

  function fmtCount(v) {
    if (v === null) return DASH;
    return Math.round(v).toLocaleString("en-US");
  }

  function fmtRate(v) {
    if (v === null) return DASH;
    return v < 10 ? v.toFixed(1) : Math.round(v).toLocaleString("en-US");
  }

  function fmtDuration(ms) {
    if (ms === null) return DASH;
    if (ms < 1000) return Math.round(ms) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    if (ms < 3600000) return Math.round(ms / 60000) + " min";
    if (ms < 86400000) return (ms / 3600000).toFixed(1) + " h";
    return (ms / 86400000).toFixed(1) + " d";
  }

  function fmtAgo(ms) {
    if (ms === null) return DASH;
    const d = Date.now() - ms;
    if (d < 2000) return "just now";
    return fmtDuration(d) + " ago";
  }

  function fmtTime(ms) {
    if (ms === null) return DASH;
    const d = new Date(ms);
    return Number.isNaN(d.getTime()) ? DASH : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function fmtBytes(v) {
    if (v === null) return DASH;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return (i === 0 ? String(v) : v.toFixed(1)) + " " + units[i];
  }

  // --- DOM helpers (text only) ---------------------------------------------

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function setStatus(text, kind) {
    const s = $("status");
    s.textContent = text;
    s.className = kind || "";
  }

  function showLogin(refused) {
    document.body.dataset.state = refused ? "refused" : "need-token";
    $("login").hidden = false;
    $("refused").hidden = !refused;
    $("fleet").hidden = true;
    $("forget").hidden = true;
    clearData();
    $("token").focus();
  }

  function clearData() {
    rows = [];
    $("nodes").tBodies[0].replaceChildren();
    $("streams").tBodies[0].replaceChildren();
    $("detail-facts").replaceChildren();
    $("sparkline").replaceChildren();
    $("sparkline-caption").textContent = "";
    $("detail").hidden = true;
    $("count").textContent = "";
    selected = null;
  }

  // --- the node table -------------------------------------------------------

  function compare(a, b) {
    const x = a[sort.key];
    const y = b[sort.key];
    // Missing values go last whichever the direction.
    if (x === null && y === null) return 0;
    if (x === null) return 1;
    if (y === null) return -1;
    const c =
      typeof x === "string" ? x.localeCompare(y, "en", { numeric: true }) : x < y ? -1 : x > y ? 1 : 0;
    return c * sort.dir || a.node.localeCompare(b.node, "en", { numeric: true });
  }

  function renderTable() {
    const filter = $("state-filter").value;
    const shown = rows.filter((r) => !filter || r.state === filter).sort(compare);
    const body = document.createElement("tbody");
    for (const r of shown) {
      const tr = document.createElement("tr");
      tr.dataset.node = r.node;
      tr.tabIndex = 0;
      if (r.node === selected) tr.className = "selected";
      tr.append(el("td", r.node, "node"));
      const state = el("td");
      const badge = el("span", r.state, "badge " + r.state);
      const why = [r.health ? "health: " + r.health : null].concat(r.problems).filter(Boolean);
      if (why.length) badge.title = why.join("\n");
      state.append(badge);
      if (r.health === "degraded") state.append(el("span", " degraded", "degraded"));
      tr.append(state);
      const seen = el("td", fmtAgo(r.last_seen));
      if (r.last_seen !== null) seen.title = fmtTime(r.last_seen);
      tr.append(seen);
      tr.append(el("td", fmtDuration(r.lag), "num"));
      tr.append(el("td", fmtRate(r.rate), "num"));
      tr.append(el("td", fmtCount(r.backlog), "num"));
      tr.append(el("td", fmtCount(r.losses), r.losses ? "num lossy" : "num"));
      body.append(tr);
    }
    $("nodes").replaceChild(body, $("nodes").tBodies[0]);
    $("empty").hidden = rows.length !== 0;
    $("count").textContent =
      shown.length === rows.length
        ? rows.length + (rows.length === 1 ? " node" : " nodes")
        : shown.length + " of " + rows.length + " nodes";
    for (const th of $("nodes").tHead.rows[0].cells) {
      if (th.dataset.key === sort.key) th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }

  // --- a node's detail ------------------------------------------------------

  /** The detail of `id`: `/api/v1/nodes/{id}`, or while an aggregator does
   *  not serve that, the stream names from `/api/v1/latest`. */
  async function loadDetail(id) {
    const d = await api("/api/v1/nodes/" + encodeURIComponent(id));
    if (obj(d)) {
      return { node: d, streams: list(d.streams), throughput: list(d.throughput), partial: false };
    }
    const latest = await api("/api/v1/latest?node=" + encodeURIComponent(id));
    const streams = list(obj(latest) && latest.records).map((r) => ({
      stream: r && r.stream,
      records: null,
      last_ms: num(r && r.received_ms) ?? num(r && r.timestamp_ms),
    }));
    return { node: null, streams, throughput: [], partial: true };
  }

  function fact(dl, name, value) {
    dl.append(el("dt", name), el("dd", value === null || value === undefined || value === "" ? DASH : value));
  }

  function renderDetail(id, detail) {
    $("detail").hidden = false;
    $("detail-node").textContent = id;
    const row = rows.find((r) => r.node === id);
    const n = (detail && detail.node) || (row && row.raw) || {};
    const r = row || toRow(Object.assign({ node: id }, n), new Set());
    const status = obj(n.status);
    const dl = document.createElement("dl");
    dl.id = "detail-facts";
    fact(dl, "state", r.state + (r.health && r.health !== "unhealthy" ? " (" + r.health + ")" : ""));
    fact(dl, "last seen", r.last_seen === null ? null : fmtAgo(r.last_seen) + " \u00b7 " + fmtTime(r.last_seen));
    fact(dl, "aggregator", str(n.aggregator));
    fact(dl, "records stored", num(n.records) === null ? null : fmtCount(n.records));
    fact(dl, "cursor", str(n.cursor));
    fact(dl, "incarnation", str(n.incarnation));
    fact(dl, "replication lag", r.lag === null ? null : fmtDuration(r.lag));
    fact(dl, "records/s", r.rate === null ? null : fmtRate(r.rate));
    if (status) {
      fact(
        dl,
        "backlog",
        num(status.backlog_records) === null
          ? null
          : fmtCount(status.backlog_records) + " records, " + fmtBytes(num(status.backlog_bytes)),
      );
      fact(dl, "oldest buffered", num(status.oldest_ms) === null ? null : fmtTime(status.oldest_ms));
      fact(dl, "dead letters", num(status.dead_letters) === null ? null : fmtCount(status.dead_letters));
      const drops = list(status.drops)
        .filter(obj)
        .map((d) => String(d.reason) + ": " + fmtCount(num(d.records)));
      fact(dl, "drops", drops.join(", "));
      fact(dl, "problems", r.problems.join("; "));
      fact(dl, "version", str(status.version));
      const mods = list(status.modules)
        .filter(obj)
        .map((m) => String(m.name) + " " + String(m.version));
      fact(dl, "modules", mods.join(", "));
      fact(dl, "certificate until", num(status.cert_not_after_ms) === null ? null : fmtTime(status.cert_not_after_ms));
    }
    const losses = list(n.losses)
      .filter(obj)
      .map((l) => String(l.stream) + " " + String(l.reason) + ": " + fmtCount(num(l.records)));
    if (num(n.lost_records)) losses.push("lost by the store: " + fmtCount(n.lost_records));
    fact(dl, "losses", losses.join("; "));
    $("detail").replaceChild(dl, $("detail-facts"));

    const body = document.createElement("tbody");
    const streams = detail ? detail.streams.filter(obj) : [];
    streams.sort((a, b) => String(a.stream).localeCompare(String(b.stream)));
    for (const s of streams) {
      const tr = document.createElement("tr");
      tr.dataset.stream = String(s.stream);
      tr.append(el("td", String(s.stream), "stream"));
      tr.append(el("td", fmtCount(num(s.records)), "num"));
      const last = el("td", fmtAgo(num(s.last_ms)));
      if (num(s.last_ms) !== null) last.title = fmtTime(s.last_ms);
      tr.append(last);
      body.append(tr);
    }
    $("streams").replaceChild(body, $("streams").tBodies[0]);
    const note = $("streams-note");
    note.hidden = !(detail && (detail.partial || streams.length === 0));
    note.textContent = !detail
      ? "Loading\u2026"
      : streams.length === 0
        ? "No streams stored for this node."
        : "Stream names from the newest record of each (this aggregator has no per-node detail yet).";
    sparkline(detail ? detail.throughput : []);
  }

  /** An inline SVG line of records per minute. */
  function sparkline(points) {
    const svg = $("sparkline");
    svg.replaceChildren();
    const pts = points
      .filter(obj)
      .map((p) => ({ t: num(p.t_ms), v: num(p.records) }))
      .filter((p) => p.t !== null && p.v !== null)
      .sort((a, b) => a.t - b.t);
    svg.classList.toggle("empty", pts.length === 0);
    if (pts.length === 0) {
      $("sparkline-caption").textContent = "No throughput figures from this aggregator yet.";
      return;
    }
    const W = 600;
    const H = 60;
    const pad = 3;
    const t0 = pts[0].t;
    const span = pts[pts.length - 1].t - t0;
    const max = Math.max(1, ...pts.map((p) => p.v));
    const xy = pts.map((p) => [
      span > 0 ? ((p.t - t0) / span) * W : W / 2,
      H - pad - (p.v / max) * (H - 2 * pad),
    ]);
    const line = xy.map(([x, y]) => x.toFixed(1) + "," + y.toFixed(1)).join(" ");
    const area = document.createElementNS(SVG, "polygon");
    area.setAttribute("points", xy[0][0].toFixed(1) + "," + H + " " + line + " " + xy[xy.length - 1][0].toFixed(1) + "," + H);
    area.setAttribute("class", "area");
    const poly = document.createElementNS(SVG, "polyline");
    poly.setAttribute("points", line);
    poly.setAttribute("class", "line");
    const title = document.createElementNS(SVG, "title");
    const last = pts[pts.length - 1];
    title.textContent =
      "peak " + fmtCount(max) + "/min, last " + fmtCount(last.v) + "/min at " + fmtTime(last.t);
    svg.append(title, area, poly);
    $("sparkline-caption").textContent =
      "last minute " + fmtCount(last.v) + " \u00b7 peak " + fmtCount(max) + " \u00b7 " + pts.length + " minutes shown";
  }

  async function openDetail(id) {
    selected = id;
    const mine = ++detailGeneration;
    const gen = generation;
    renderTable();
    renderDetail(id, null);
    try {
      const d = await loadDetail(id);
      if (mine === detailGeneration && gen === generation && selected === id) renderDetail(id, d);
    } catch (e) {
      if (gen !== generation) return;
      if (e instanceof Refused) return refused();
      setStatus("could not load " + id + ": " + e.message, "error");
    }
  }

  // --- the refresh loop ------------------------------------------------------

  async function refresh() {
    const gen = generation;
    clearTimeout(timer);
    try {
      const answer = await api("/api/v1/nodes");
      if (!Array.isArray(answer)) throw new Error("/api/v1/nodes did not answer a list");
      const nodes = answer.filter((n) => obj(n) && typeof n.node === "string");
      // Until the aggregator says `connected` itself, the live sessions tell.
      const live = new Set();
      if (nodes.length === 0 || nodes.some((n) => typeof n.connected !== "boolean")) {
        for (const c of list(await api("/api/v1/connections"))) {
          if (obj(c) && typeof c.node === "string") live.add(c.node);
        }
        // A node connected with nothing stored yet still gets a row.
        for (const id of live) {
          if (!nodes.some((n) => n.node === id)) nodes.push({ node: id, connected: true });
        }
      }
      const id = selected;
      const detail = id === null ? null : await loadDetail(id);
      if (gen !== generation) return;
      rows = nodes.map((n) => toRow(n, live));
      document.body.dataset.state = "ok";
      $("login").hidden = true;
      $("fleet").hidden = false;
      $("forget").hidden = false;
      renderTable();
      if (id !== null && id === selected) renderDetail(id, detail);
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes);
      setStatus("updated " + new Date().toLocaleTimeString("en-GB") + " \u00b7 every " + refreshSeconds + " s");
    } catch (e) {
      if (gen !== generation) return;
      if (e instanceof Refused) return refused();
      setStatus("refresh failed: " + e.message + " \u00b7 trying again in " + refreshSeconds + " s", "error");
    }
    if (gen === generation) timer = setTimeout(refresh, refreshSeconds * 1000);
  }

  function refused() {
    generation += 1;
    clearTimeout(timer);
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(true);
    setStatus("token refused", "error");
  }

  // --- wiring ----------------------------------------------------------------

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    $("token").value = "";
    sessionStorage.setItem(TOKEN_KEY, token);
    generation += 1;
    setStatus("checking the token\u2026");
    refresh();
  });

  $("forget").addEventListener("click", (ev) => {
    ev.preventDefault();
    sessionStorage.removeItem(TOKEN_KEY);
    generation += 1;
    clearTimeout(timer);
    showLogin(false);
    setStatus("token forgotten");
  });

  $("state-filter").addEventListener("change", renderTable);

  for (const th of $("nodes").tHead.rows[0].cells) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.key;
      sort =
        sort.key === key ? { key, dir: -sort.dir } : { key, dir: DESCENDING_FIRST.has(key) ? -1 : 1 };
      renderTable();
    });
  }

  const rowOf = (ev) => {
    const tr = ev.target.closest("tr[data-node]");
    return tr && $("nodes").tBodies[0].contains(tr) ? tr.dataset.node : null;
  };
  $("nodes").addEventListener("click", (ev) => {
    const id = rowOf(ev);
    if (id !== null) openDetail(id);
  });
  $("nodes").addEventListener("keydown", (ev) => {
    const id = rowOf(ev);
    if (id !== null && (ev.key === "Enter" || ev.key === " ")) {
      ev.preventDefault();
      openDetail(id);
    }
  });

  $("detail-close").addEventListener("click", (ev) => {
    ev.preventDefault();
    selected = null;
    detailGeneration += 1;
    $("detail").hidden = true;
    renderTable();
  });

  if (sessionStorage.getItem(TOKEN_KEY)) {
    setStatus("loading\u2026");
    refresh();
  } else {
    showLogin(false);
    setStatus("an API token is needed");
  }
})();
