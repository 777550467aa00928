// Forestall's console: the HTTP API and SQL of the server that serves it, nothing else
// (no CDN, no framework). Each tab loads when shown.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, text) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};
const SVG = "http://www.w3.org/2000/svg";
const svg = (tag, attrs = {}) => {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
};
// A SQL string literal, and one nested in a string argument (forecast's predicate).
const lit = (s) => "'" + String(s).replaceAll("'", "''") + "'";
const ident = (s) => '"' + String(s).replaceAll('"', '""') + '"';

// With the server's auth on, every call carries the token the user entered (kept for this
// tab only, in sessionStorage); a 401 asks for one.
async function call(path, init = {}) {
  const token = sessionStorage.getItem("forestall-token");
  const headers = { ...(init.headers || {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(path, { ...init, headers });
  if (r.status === 401) {
    $("#login").hidden = false;
    sessionStorage.removeItem("forestall-token");
    throw new Error(token ? "the token was refused: enter another above" : "this server needs a token: enter one above");
  }
  return r;
}

async function api(path) {
  const r = await call(path, { headers: { Accept: "application/json" } });
  const body = await r.text();
  let json = null;
  try { json = JSON.parse(body); } catch (_) { /* not JSON */ }
  if (!r.ok) throw new Error((json && json.error) || `${path}: HTTP ${r.status}`);
  return json;
}

async function sql(q) {
  const r = await call("/api/v3/query_sql", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ q, format: "json" }),
  });
  const body = await r.text();
  let json = null;
  try { json = JSON.parse(body); } catch (_) { /* not JSON */ }
  if (!r.ok) throw new Error((json && json.error) || `HTTP ${r.status}`);
  return json || [];
}

function showError(id, e) {
  const p = $(id);
  if (e) { p.textContent = String(e.message || e); p.hidden = false; } else { p.hidden = true; }
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const c of cells) {
      const td = el("td", c && c.cls ? { class: c.cls } : {});
      td.textContent = c && typeof c === "object" && "text" in c ? c.text : (c ?? "");
      tr.append(td);
    }
    return tr;
  }));
}

const fmt = (x) => x === null || x === undefined ? "" : (typeof x === "number" ? (Math.abs(x) >= 1000 || Number.isInteger(x) ? x.toLocaleString("en") : x.toPrecision(4)) : String(x));

// ---- Explore: measurements, a series, its forecast band and anomaly scores ----

const NUMERIC = /^(Float|Int|UInt|Decimal)/;
// For each range drawn, how far back the anomaly detector reads.
const WARM = { "15 minutes": "1 hour", "1 hour": "4 hours", "6 hours": "1 day", "1 day": "4 days", "7 days": "14 days" };
let columns = {}; // measurement -> [{name, type}]

async function loadMeasurements() {
  const rows = await sql("SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, ordinal_position");
  columns = {};
  for (const r of rows) (columns[r.table_name] ||= []).push({ name: r.column_name, type: r.data_type });
  const m = $("#measurement");
  const keep = m.value;
  m.replaceChildren(...Object.keys(columns).map((t) => el("option", { value: t }, t)));
  if (keep && columns[keep]) m.value = keep;
  await pickMeasurement();
}

function tagsOf(m) {
  return (columns[m] || []).filter((c) => c.name !== "time" && !NUMERIC.test(c.type) && !/^Boolean/.test(c.type) && /Utf8|Dictionary/.test(c.type)).map((c) => c.name);
}

async function pickMeasurement() {
  const m = $("#measurement").value;
  const fields = (columns[m] || []).filter((c) => NUMERIC.test(c.type)).map((c) => c.name);
  $("#field").replaceChildren(...fields.map((f) => el("option", { value: f }, f)));
  const tags = tagsOf(m);
  let series = [{}];
  if (m && tags.length) {
    const list = tags.map(ident).join(", ");
    series = await sql(`SELECT DISTINCT ${list} FROM ${ident(m)} WHERE time > now() - INTERVAL '7 days' ORDER BY ${list} LIMIT 2000`);
  }
  $("#series").replaceChildren(...series.map((s, i) => {
    const label = tags.map((t) => `${t}=${s[t] ?? "∅"}`).join(", ") || "(one series)";
    const o = el("option", { value: String(i) }, label);
    o.dataset.series = JSON.stringify(s);
    return o;
  }));
  await draw();
}

function predicate() {
  const m = $("#measurement").value;
  const opt = $("#series").selectedOptions[0];
  const s = opt ? JSON.parse(opt.dataset.series) : {};
  return tagsOf(m).map((t) => (s[t] === null || s[t] === undefined) ? `${ident(t)} IS NULL` : `${ident(t)} = ${lit(s[t])}`);
}

async function draw() {
  const m = $("#measurement").value, f = $("#field").value;
  const chart = $("#chart");
  showError("#explore-error", null);
  if (!m || !f) { chart.replaceChildren(el("p", { class: "muted" }, "No measurements yet: write some data, or turn the host collector on.")); return; }
  const range = $("#range").value, horizon = Number($("#horizon").value);
  const where = [...predicate(), `time > now() - INTERVAL '${range}'`].join(" AND ");
  // The detector learns a series before it scores it: it reads a longer stretch than is
  // drawn, so that the points drawn are scored by a detector that has seen what came before.
  const learned = [...predicate(), `time > now() - INTERVAL '${WARM[range]}'`, `${ident(f)} IS NOT NULL`].join(" AND ");
  try {
    const history = (await sql(`SELECT t, v, score FROM (SELECT time, CAST(time AS BIGINT) / 1000000 AS t, CAST(${ident(f)} AS DOUBLE) AS v, anomaly_score(CAST(${ident(f)} AS DOUBLE)) OVER (ORDER BY time) AS score FROM ${ident(m)} WHERE ${learned}) WHERE time > now() - INTERVAL '${range}' ORDER BY time DESC LIMIT 5000`)).reverse();
    let forecast = [];
    let forecastError = null;
    if (horizon > 0 && history.length >= 8) {
      try {
        forecast = await sql(`SELECT CAST(time AS BIGINT) / 1000000 AS t, mean, lower, upper, model FROM forecast(${lit(m)}, ${lit(f)}, ${horizon}, ${lit(where)}) ORDER BY time`);
      } catch (e) { forecastError = e; }
    }
    render(chart, history, forecast);
    const anomalies = history.filter((r) => r.score >= 0.5).length;
    $("#legend").textContent = `${history.length} points, ${anomalies} with an anomaly score ≥ 0.5 (red)` +
      (forecast.length ? `; forecast ${forecast.length} steps by ${forecast[0].model}, 95 % band in blue` : "") +
      (forecastError ? `; no forecast: ${forecastError.message}` : "");
  } catch (e) {
    showError("#explore-error", e);
    chart.replaceChildren();
  }
  window.__consoleRendered = performance.now();
}

function render(chart, history, forecast) {
  const W = chart.clientWidth || 900, H = 360, L = 60, R = 16, T = 12, B = 28;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const ts = [...history.map((r) => r.t), ...forecast.map((r) => r.t)];
  const vs = [...history.map((r) => r.v), ...forecast.flatMap((r) => [r.lower, r.upper])].filter(Number.isFinite);
  if (!ts.length || !vs.length) { chart.replaceChildren(el("p", { class: "muted" }, "No points in this range.")); return; }
  let [t0, t1] = [Math.min(...ts), Math.max(...ts)];
  let [v0, v1] = [Math.min(...vs), Math.max(...vs)];
  if (t1 === t0) t1 = t0 + 1;
  if (v1 === v0) { v0 -= 1; v1 += 1; }
  const pad = (v1 - v0) * 0.05; v0 -= pad; v1 += pad;
  const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = (v) => T + (1 - (v - v0) / (v1 - v0)) * (H - T - B);
  const axis = svg("g", { class: "axis" });
  for (let i = 0; i <= 4; i++) {
    const v = v0 + (v1 - v0) * i / 4;
    axis.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    const label = svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = fmt(v);
    axis.append(label);
  }
  for (let i = 0; i <= 4; i++) {
    const t = t0 + (t1 - t0) * i / 4;
    const label = svg("text", { x: x(t), y: H - 8, "text-anchor": "middle" });
    label.textContent = new Date(t).toISOString().slice(5, 16).replace("T", " ");
    axis.append(label);
  }
  s.append(axis);
  if (forecast.length) {
    const up = forecast.map((r) => `${x(r.t)},${y(r.upper)}`);
    const down = forecast.map((r) => `${x(r.t)},${y(r.lower)}`).reverse();
    s.append(svg("path", { class: "band", d: `M${up.join("L")}L${down.join("L")}Z` }));
    const last = history[history.length - 1];
    const mean = (last ? [`${x(last.t)},${y(last.v)}`] : []).concat(forecast.map((r) => `${x(r.t)},${y(r.mean)}`));
    s.append(svg("path", { class: "mean", d: `M${mean.join("L")}` }));
  }
  if (history.length) {
    const now = history[history.length - 1].t;
    s.append(svg("line", { class: "now", x1: x(now), x2: x(now), y1: T, y2: H - B }));
    s.append(svg("path", { class: "line", d: "M" + history.map((r) => `${x(r.t)},${y(r.v)}`).join("L") }));
    const g = svg("g");
    for (const r of history) {
      const anomalous = r.score >= 0.5;
      const c = svg("circle", { class: anomalous ? "point anomaly" : "point", cx: x(r.t), cy: y(r.v), r: anomalous ? 3.5 : 1.6 });
      const title = svg("title");
      title.textContent = `${new Date(r.t).toISOString()}  ${fmt(r.v)}  score ${fmt(r.score)}`;
      c.append(title);
      g.append(c);
    }
    s.append(g);
  }
  chart.replaceChildren(s);
}

// ---- Risks, allocations, health, continuous queries ----

async function loadRisks() {
  showError("#risks-error", null);
  try {
    const r = await api("/api/v1/risks");
    $("#risks-summary").textContent = `threshold ${r.threshold}, horizon ${r.horizon}`;
    const rows = [];
    for (const c of r.components) {
      const res = Object.entries(c.resources || {});
      if (!res.length) rows.push([c.component, "", { text: "not scored yet", cls: "muted" }, ""]);
      for (const [resource, v] of res) {
        rows.push([c.component, resource, { text: fmt(v.score), cls: v.score >= 0.5 ? "num risk-high" : "num" }, (v.reasons || []).join("; ")]);
      }
    }
    fill($("#risks tbody"), rows);
  } catch (e) { showError("#risks-error", e); fill($("#risks tbody"), []); }
}

async function loadAllocations() {
  showError("#allocations-error", null);
  try {
    const a = await api("/api/v1/allocations");
    $("#allocations-summary").textContent = `${a.mode}, actuator ${a.actuator}, round ${a.round}, every ${a.interval}`;
    const rows = [];
    for (const c of a.components) {
      for (const r of Object.keys(c.allocation || {})) {
        const asked = (c.requested_by_queries || []).filter((q) => q.resource === r);
        rows.push([c.component, r, { text: fmt(c.allocation[r]), cls: "num" }, { text: fmt(c.usage[r]), cls: "num" },
          asked.map((q) => fmt(q.demand)).join(", "), asked.map((q) => fmt(q.forecast)).join(", ")]);
      }
    }
    fill($("#allocation-state tbody"), rows);
    const audit = await sql("SELECT time, component, resource, action, before, after, applied, reason FROM forestall_allocations ORDER BY time DESC LIMIT 50").catch(() => []);
    fill($("#audit tbody"), audit.map((r) => [r.time, r.component, r.resource, r.action, { text: fmt(r.before), cls: "num" }, { text: fmt(r.after), cls: "num" }, String(r.applied), r.reason]));
  } catch (e) { showError("#allocations-error", e); }
}

async function loadHealth() {
  showError("#health-error", null);
  try {
    const h = await api("/api/v1/health");
    fill($("#health tbody"), Object.entries(h.components).map(([c, v]) => [c, v.status, v.checks.map((k) => `${k.check}: ${k.status}${k.reason ? " (" + k.reason + ")" : ""}`).join("; ")]));
  } catch (e) { showError("#health-error", e); }
}

async function loadQueries() {
  showError("#queries-error", null);
  try {
    const rows = await sql("SELECT name, schedule, sink, lag_seconds, runs, failures, last_error FROM system.continuous_queries ORDER BY name");
    fill($("#queries tbody"), rows.map((r) => [r.name, r.schedule, r.sink, { text: fmt(r.lag_seconds), cls: "num" }, { text: fmt(r.runs), cls: "num" }, { text: fmt(r.failures), cls: "num" }, r.last_error || ""]));
  } catch (e) { showError("#queries-error", e); }
}

// ---- SQL ----

async function runSql(ev) {
  ev.preventDefault();
  showError("#sql-error", null);
  const out = $("#sql-result");
  const started = performance.now();
  $("#sql-status").textContent = "running…";
  try {
    const rows = await sql($("#sql-text").value);
    const cols = rows.length ? Object.keys(rows[0]) : [];
    const table = el("table");
    const head = el("tr");
    for (const c of cols) head.append(el("th", {}, c));
    table.append(el("thead"), el("tbody"));
    table.tHead.append(head);
    fill(table.tBodies[0], rows.map((r) => cols.map((c) => typeof r[c] === "object" && r[c] !== null ? JSON.stringify(r[c]) : r[c])));
    out.replaceChildren(table);
    $("#sql-status").textContent = `${rows.length} rows in ${Math.round(performance.now() - started)} ms`;
  } catch (e) {
    out.replaceChildren();
    showError("#sql-error", e);
    $("#sql-status").textContent = "";
  }
}

// ---- wiring ----

const loaders = { explore: loadMeasurements, risks: loadRisks, allocations: loadAllocations, health: loadHealth, queries: loadQueries, sql: async () => {} };

function show(tab) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === tab);
  if (location.hash !== "#" + tab) history.replaceState(null, "", "#" + tab);
  loaders[tab]().catch((e) => showError(`#${tab}-error`, e));
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.tab));
  $("#measurement").addEventListener("change", () => pickMeasurement().catch((e) => showError("#explore-error", e)));
  for (const id of ["#field", "#series", "#range", "#horizon"]) $(id).addEventListener("change", () => draw());
  $("#sql-form").addEventListener("submit", runSql);
  $("#login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("forestall-token", $("#token").value.trim());
    $("#token").value = "";
    $("#login").hidden = true;
    const active = document.querySelector("#tabs button.active");
    show(active ? active.dataset.tab : "explore");
  });
  $("#server").textContent = location.host;
  const tab = location.hash.slice(1);
  show(loaders[tab] ? tab : "explore");
});
