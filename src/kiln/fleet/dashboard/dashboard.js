// The fleet dashboard: reads /v1/status and /v1/hosts and draws them, every REFRESH_MS.
// Hosts write their own ids and failure texts: they reach the page as text nodes only.
"use strict";

const REFRESH_MS = 5000;
const PAGE = 100;
const STATES = ["idle", "waiting-for-window", "waiting-for-lock", "rebooting", "confirming", "failed", "manual"];
const COLORS = ["#4a78c2", "#5cb85c", "#f0ad4e", "#9b8ce0", "#d9534f", "#5bc0de", "#8d6e63", "#777"];

let status = null;
let plan = null;
let offset = 0;
let fetchedAt = Date.now();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 90) return `${seconds} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

function byVersion(a, b) {
  const pa = a.split(".").map(Number), pb = b.split(".").map(Number);
  for (let i = 0; i < 3; i++) if ((pa[i] || 0) !== (pb[i] || 0)) return (pa[i] || 0) - (pb[i] || 0);
  return a < b ? -1 : a > b ? 1 : 0;
}

function setError(text) {
  document.getElementById("error").textContent = text || "";
}

async function getJson(url) {
  const r = await fetch(url, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(`${url}: ${body.kind || r.status}: ${body.value || ""}`);
  return body;
}

// --- release and waves ---------------------------------------------------------------------

function drawRelease() {
  const box = document.getElementById("release");
  const rel = status.release;
  if (!rel) return;
  box.className = "";
  const now = Date.now();
  const rows = rel.waves.map((w, i) => {
    const opens = Date.parse(w.opens);
    const when = opens <= now ? el("span", { class: "wave-open" }, "open") : `opens in ${duration((opens - now) / 1000)}`;
    return el("tr", {}, el("td", {}, `wave ${i + 1}`), el("td", {}, `${(w.share * 100).toFixed(1)} % of hosts`),
      el("td", {}, new Date(opens).toISOString().replace(".000Z", "Z")), el("td", {}, when));
  });
  const table = el("table", { id: "waves" }, el("thead", {}, el("tr", {}, el("th", {}, "wave"), el("th", {}, "share"),
    el("th", {}, "opens at"), el("th", {}, ""))), el("tbody", {}, ...rows));
  const head = el("div", {}, "newest release ", el("strong", {}, rel.version), ` (${rel.variant})`);
  if (rel.error) head.append(el("span", { class: "error" }, ` — ${rel.error}`));
  box.replaceChildren(head, rel.waves.length ? table : el("div", { class: "muted" }, "no waves: every host may take it now"));
}

// --- versions over time ----------------------------------------------------------------------

function fractions(versions) {
  const total = Object.values(versions).reduce((a, b) => a + b, 0) || 1;
  const out = {};
  for (const [v, n] of Object.entries(versions)) out[v] = n / total;
  return out;
}

function drawVersions() {
  const hosts = status.hosts || { versions: {}, total: 0 };
  const now = el("div", {}, `${hosts.total} hosts reporting: `);
  for (const v of Object.keys(hosts.versions).sort(byVersion)) now.append(el("strong", {}, v), ` ${hosts.versions[v]}  `);
  document.getElementById("versions-now").replaceChildren(now);

  const chart = document.getElementById("versions-chart");
  const W = 800, H = 220, PAD = 4;
  const points = (status.history || []).map(p => ({ t: Date.parse(p.t), f: fractions(p.versions) }));
  if (hosts.total) points.push({ t: Date.now(), f: fractions(hosts.versions) });
  const planned = plan ? plan.points.map(p => ({ t: Date.parse(p.t), f: fractions(p.versions) })) : [];
  // The time axis covers what was seen and what is planned (at least the last hour); the
  // waves inside it are marked (the release table lists them all).
  const times = points.concat(planned).map(p => p.t);
  const t1 = Math.max(...times, Date.now());
  const t0 = Math.min(...times, t1 - 3600000);
  const waves = (status.release ? status.release.waves.map(w => Date.parse(w.opens)) : []).filter(w => w >= t0 && w <= t1);
  const x = t => PAD + (W - 2 * PAD) * (t - t0) / (t1 - t0);
  const y = f => H - PAD - (H - 2 * PAD) * f;
  const versions = [...new Set(points.flatMap(p => Object.keys(p.f)))].sort(byVersion);
  const nodes = [];
  // stacked areas, oldest version at the bottom
  let below = points.map(() => 0);
  versions.forEach((v, i) => {
    const above = points.map((p, j) => below[j] + (p.f[v] || 0));
    if (points.length) {
      const top = points.map((p, j) => `${x(p.t).toFixed(1)},${y(above[j]).toFixed(1)}`);
      const bottom = points.map((p, j) => `${x(p.t).toFixed(1)},${y(below[j]).toFixed(1)}`).reverse();
      nodes.push(svg("polygon", { points: top.concat(bottom).join(" "), fill: COLORS[i % COLORS.length], opacity: 0.8 }));
    }
    below = above;
  });
  for (const w of waves) {
    nodes.push(svg("line", { x1: x(w), x2: x(w), y1: 0, y2: H, stroke: "#2e7d32", "stroke-dasharray": "4 3" }));
  }
  if (plan) {
    const line = planned.map(p => `${x(p.t).toFixed(1)},${y(p.f[plan.release] || 0).toFixed(1)}`).join(" ");
    nodes.push(svg("polyline", { points: line, fill: "none", stroke: "#1d2430", "stroke-width": 2, "stroke-dasharray": "6 4" }));
  }
  const label = (text, attrs) => { const t = svg("text", { "font-size": 11, fill: "#555", ...attrs }); t.textContent = text; return t; };
  const when = t => new Date(t).toISOString().slice(0, 16).replace("T", " ");
  nodes.push(label("100 %", { x: PAD + 2, y: 14 }), label("0 %", { x: PAD + 2, y: H - PAD - 3 }),
    label(when(t0), { x: PAD + 40, y: H - PAD - 3 }), label(when(t1), { x: W - PAD - 4, y: H - PAD - 3, "text-anchor": "end" }));
  chart.replaceChildren(...nodes);
  const legend = versions.map((v, i) => el("span", {}, el("i", { style: `background:${COLORS[i % COLORS.length]}` }), v));
  if (waves.length) legend.push(el("span", {}, "dashed green: a wave opens"));
  if (plan) legend.push(el("span", {}, `dashed black: planned share on ${plan.release}`));
  document.getElementById("versions-legend").replaceChildren(...legend);
}

// --- states and groups ---------------------------------------------------------------------

function drawStates() {
  const states = (status.hosts && status.hosts.states) || {};
  const max = Math.max(1, ...Object.values(states));
  const names = STATES.filter(s => s in states).concat(Object.keys(states).filter(s => !STATES.includes(s)));
  const rows = names.map(s => el("div", { class: `bar state-${s}` }, el("span", { class: "name" }, s),
    el("span", { class: "fill", style: `width:${(60 * states[s] / max).toFixed(1)}%` }), el("span", {}, states[s])));
  document.getElementById("states").replaceChildren(...(rows.length ? rows : [el("div", { class: "muted" }, "no host has reported yet")]));
}

function drawGroups() {
  const since = (Date.now() - fetchedAt) / 1000;
  const hostGroups = (status.hosts && status.hosts.groups) || {};
  const halted = [];
  const rows = status.groups.map(g => {
    if (g.error) return el("tr", {}, el("td", {}, g.group), el("td", { colspan: 3, class: "error" }, g.error));
    const holders = el("td", {});
    for (const h of g.holders) {
      const item = el("div", {}, el("strong", {}, h.id), ` ${duration(h.held_for + since)}`,
        h.version ? ` on ${h.version}` : "");
      if (h.failure) item.append(el("div", { class: "failure" }, `failed: ${h.failure}`));
      holders.append(item);
    }
    if (!g.holders.length) holders.append(el("span", { class: "muted" }, "none"));
    const failed = g.holders.filter(h => h.failure);
    if (g.halted || failed.length) {
      halted.push(el("div", { class: "halted", "data-group": g.group }, el("strong", {}, `group ${g.group} `),
        g.halted ? "is halted: " : "has failed hosts: ",
        failed.map(h => `${h.id} (${h.failure})`).join("; ")));
    }
    const counts = hostGroups[g.group] ? Object.entries(hostGroups[g.group].versions).sort((a, b) => byVersion(a[0], b[0]))
      .map(([v, n]) => `${v}: ${n}`).join(", ") : "";
    return el("tr", { "data-group": g.group }, el("td", {}, g.group),
      el("td", {}, `${g.slots - g.free} of ${g.slots} held`), holders, el("td", {}, counts));
  });
  document.querySelector("#groups tbody").replaceChildren(...rows);
  document.getElementById("halted").replaceChildren(...halted);
}

// --- the host table ------------------------------------------------------------------------

function fillSelect(id, values) {
  const select = document.getElementById(id);
  const chosen = select.value;
  const keep = select.options[0];
  select.replaceChildren(keep, ...values.map(v => el("option", { value: v }, v)));
  select.value = values.includes(chosen) ? chosen : "";
}

function drawFilters() {
  const h = status.hosts || { groups: {}, states: {}, versions: {} };
  fillSelect("f-group", Object.keys(h.groups).sort());
  fillSelect("f-state", STATES.filter(s => s in h.states).concat(Object.keys(h.states).filter(s => !STATES.includes(s))));
  fillSelect("f-version", Object.keys(h.versions).sort(byVersion));
}

async function loadHosts() {
  if (!status || !status.hosts) {
    document.getElementById("hosts-count").textContent = "this server keeps no host reports";
    return;
  }
  const q = new URLSearchParams({ limit: PAGE, offset });
  for (const [key, id] of [["q", "f-text"], ["group", "f-group"], ["state", "f-state"], ["version", "f-version"]]) {
    const v = document.getElementById(id).value.trim();
    if (v) q.set(key, v);
  }
  const page = await getJson(`/v1/hosts?${q}`);
  const rows = page.hosts.map(h => el("tr", { "data-host": h.id }, el("td", {}, h.id), el("td", {}, h.group),
    el("td", {}, h.version || ""), el("td", {}, h.slot || ""), el("td", {}, h.state || ""), el("td", {}, h.target || ""),
    el("td", { class: "failure" }, h.failure || ""), el("td", {}, h.seen || "")));
  document.querySelector("#hosts tbody").replaceChildren(...rows);
  const last = Math.min(page.total, offset + page.hosts.length);
  document.getElementById("hosts-count").textContent =
    page.total ? `${offset + 1}–${last} of ${page.total} hosts` : "no host matches";
  document.getElementById("prev").disabled = offset === 0;
  document.getElementById("next").disabled = last >= page.total;
}

// --- refresh ---------------------------------------------------------------------------------

async function refresh() {
  try {
    status = await getJson("/v1/status");
    fetchedAt = Date.now();
    drawRelease();
    drawVersions();
    drawStates();
    drawGroups();
    drawFilters();
    await loadHosts();
    document.getElementById("refreshed").textContent = `as of ${status.time}`;
    setError("");
  } catch (e) {
    setError(`cannot refresh: ${e.message}`);
  }
}

function refilter() {
  offset = 0;
  loadHosts().catch(e => setError(e.message));
}

let typing = null;
document.getElementById("f-text").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(refilter, 250); });
for (const id of ["f-group", "f-state", "f-version"]) document.getElementById(id).addEventListener("change", refilter);
document.getElementById("filter").addEventListener("submit", e => { e.preventDefault(); refilter(); });
document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); loadHosts(); });
document.getElementById("next").addEventListener("click", () => { offset += PAGE; loadHosts(); });
document.getElementById("plan-file").addEventListener("change", async e => {
  const file = e.target.files[0];
  if (!file) return;
  try {
    const doc = JSON.parse(await file.text());
    if (doc.kind !== "kiln-fleet-plan" || !Array.isArray(doc.points)) throw new Error("not a kiln fleet simulate timeline.json");
    plan = doc;
    document.getElementById("plan-name").textContent = `${file.name}: ${doc.params && doc.params.hosts || "?"} hosts planned`;
    if (status) drawVersions();
  } catch (err) {
    setError(`${file.name}: ${err.message}`);
  }
});

refresh();
setInterval(refresh, REFRESH_MS);
