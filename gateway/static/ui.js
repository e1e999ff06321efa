// zkv live page: polls /ui/data every POLL_MS and redraws; no library, no network
// beyond this gateway. The chart is inline SVG: requests/s on the left axis, latency
// (p50, p99) on the right.
"use strict";
const POLL_MS = 500;
const COLORS = ["#1565c0", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#ad1457", "#4e342e", "#37474f"];
const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

const fmt = (v) => (v === null || v === undefined ? "-" : String(v));

function renderShards(cluster) {
  const box = $("shards");
  box.replaceChildren();
  for (const [sid, s] of Object.entries(cluster.shards)) {
    const card = el("div", {class: "shard" + (s.leader ? "" : " noleader"), "data-shard": sid,
                            "data-leader": s.leader || ""});
    card.appendChild(el("h2", {}, `shard ${sid} · leader ${s.leader || "NONE"} · term ${fmt(s.term)} · keys ${fmt(s.keys)} · share ${(s.share * 100).toFixed(1)}%`));
    const t = el("table");
    const head = el("tr");
    for (const h of ["node", "role", "term", "last", "commit", "lag", "keys", "heartbeat"]) head.appendChild(el("th", {}, h));
    t.appendChild(head);
    for (const r of s.replicas) {
      const tr = el("tr", {class: r.role, "data-node": r.node_id});
      const cells = [r.node_id, r.role, r.term, r.last_index, r.commit_index, r.lag, r.keys,
                     r.age_ms === null || r.age_ms === undefined ? "-" : r.age_ms + " ms"];
      cells.forEach((c, i) => tr.appendChild(el("td", i === 1 ? {class: "role"} : {}, fmt(c))));
      t.appendChild(tr);
    }
    card.appendChild(t);
    box.appendChild(card);
  }
}

function renderRing(cluster) {
  const ring = $("ring");
  ring.replaceChildren();
  Object.entries(cluster.shards).forEach(([sid, s], i) => {
    const d = el("div", {title: `shard ${sid}: ${(s.share * 100).toFixed(1)}%`},
                 `shard ${sid} ${(s.share * 100).toFixed(1)}%`);
    d.style.width = (s.share * 100) + "%";
    d.style.background = COLORS[i % COLORS.length];
    ring.appendChild(d);
  });
}

function line(points, x, y, color) {
  const pts = points.filter((p) => p[1] !== null).map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
  return svg("polyline", {points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2});
}

function renderChart(series) {
  const c = $("chart");
  c.replaceChildren();
  const W = 800, H = 240, L = 50, R = 750, T = 10, B = 210;
  c.appendChild(svg("rect", {x: L, y: T, width: R - L, height: B - T, fill: "#fff", stroke: "#ddd"}));
  c.setAttribute("data-points", String(series.length));
  if (series.length < 2) {
    const t = svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#999"});
    t.textContent = "waiting for traffic samples…";
    c.appendChild(t);
    return;
  }
  const t0 = series[0].t, t1 = series[series.length - 1].t;
  const rpsMax = Math.max(1, ...series.map((p) => p.rps));
  const latMax = Math.max(1, ...series.map((p) => p.p99_ms || 0));
  const x = (t) => L + (R - L) * (t - t0) / Math.max(1, t1 - t0);
  const yl = (v) => B - (B - T) * v / rpsMax;
  const yr = (v) => B - (B - T) * v / latMax;
  for (const [v, y, anchor, xx] of [[rpsMax, yl, "end", L - 4], [latMax, yr, "start", R + 4]]) {
    for (const f of [0, 0.5, 1]) {
      const lab = svg("text", {x: xx, y: y(v * f) + 4, "text-anchor": anchor, "font-size": 11, fill: "#666"});
      lab.textContent = (v * f).toFixed(v * f < 10 ? 1 : 0);
      c.appendChild(lab);
    }
  }
  const ago = svg("text", {x: L, y: B + 20, "font-size": 11, fill: "#666"});
  ago.textContent = `${Math.round(t1 - t0)} s ago`;
  c.appendChild(ago);
  const nowLab = svg("text", {x: R, y: B + 20, "font-size": 11, fill: "#666", "text-anchor": "end"});
  nowLab.textContent = "now";
  c.appendChild(nowLab);
  const rpsLine = line(series.map((p) => [p.t, p.rps]), x, yl, "#1565c0");
  rpsLine.setAttribute("id", "rps-line");
  c.appendChild(rpsLine);
  c.appendChild(line(series.map((p) => [p.t, p.p50_ms]), x, yr, "#ef8f00"));
  c.appendChild(line(series.map((p) => [p.t, p.p99_ms]), x, yr, "#c62828"));
  const last = series[series.length - 1];
  $("rps-now").textContent = fmt(last.rps);
  $("p99-now").textContent = fmt(last.p99_ms);
  $("p50-now").textContent = fmt(last.p50_ms);
}

// With --tokens the data needs an admin bearer token: asked for on a 401/403, kept in
// sessionStorage (this tab only, gone when it closes), sent as Authorization: Bearer.
const TOKEN_KEY = "zkv-gateway-token";

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("auth").classList.add("hidden");
});

async function poll() {
  try {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = token ? {Authorization: "Bearer " + token} : {};
    const r = await fetch("/ui/data", {cache: "no-store", headers});
    const d = await r.json();
    const err = $("error");
    if (r.status === 401 || r.status === 403) {
      err.textContent = d.detail || "not allowed";
      err.classList.remove("hidden");
      $("auth").classList.remove("hidden");
      return;
    }
    err.textContent = d.error || "";
    err.classList.toggle("hidden", !d.error);
    if (d.cluster) {
      const ring = d.cluster.ring || {};
      $("meta").textContent = `broker ${d.cluster.broker_id} · ring epoch ${fmt(ring.epoch)} · ` +
        `${Object.keys(d.cluster.shards).length} shards · updated ${new Date(d.time * 1000).toLocaleTimeString()}`;
      renderShards(d.cluster);
      renderRing(d.cluster);
    }
    renderChart(d.series || []);
    document.body.setAttribute("data-updated", String(d.time));
  } catch (e) {
    const err = $("error");
    err.textContent = "gateway unreachable: " + e;
    err.classList.remove("hidden");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
