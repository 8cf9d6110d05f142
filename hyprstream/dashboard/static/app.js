"use strict";
// The fleet dashboard. Everything from the server is put into the page as text (textContent), never as markup.

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 5000;
let timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c === null || c === undefined ? "" : String(c)));
  return node;
}
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}
const fmt = {
  acc: (v) => (v === null || v === undefined ? "–" : v.toFixed(4)),
  num: (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US")),
  eps: (v) => (v === null || v === undefined ? "–" : v.toFixed(3)),
  time: (t) => (t === null || t === undefined ? "–" : new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC"),
  ago: (s) => (s === null || s === undefined ? "never" : s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${(s / 3600).toFixed(1)} h ago`),
  bytes: (b) => (b === null || b === undefined ? "–" : b < 1024 ? `${b} B` : b < 1048576 ? `${(b / 1024).toFixed(1)} KiB` : `${(b / 1048576).toFixed(2)} MiB`),
};
function cell(field, value, text, cls) {
  return el("td", {"data-field": field, "data-value": value === null || value === undefined ? "" : value, class: cls}, text);
}
function pill(text, kind, attrs) { return el("span", Object.assign({class: `pill ${kind}`}, attrs || {}), text); }
function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))), el("tbody", {}, ...rows));
}
function denied(what, reason) { return el("div", {class: "denied"}, `${what}: not shown to this token (${reason})`); }

// ------------------------------------------------------------------------------------------- charts

function chart(title, versions, series, opts) {
  // series: [{values, color, name}], one line (or bars) each over the versions
  const W = 460, H = 220, L = 58, R = 12, T = 12, B = 32;
  const box = el("div", {class: "chart"}, el("h3", {}, title));
  const s = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title});
  const lines = series.map((sr) => ({...sr, pts: versions.map((v, i) => [v, sr.values[i]]).filter((p) => p[1] !== null && p[1] !== undefined)}));
  const pts = lines.flatMap((l) => l.pts);
  if (!pts.length) { box.append(el("div", {class: "legend"}, "no data yet")); return box; }
  const x0 = Math.min(...versions), x1 = Math.max(...versions, x0 + 1);
  let y0 = opts.min !== undefined ? opts.min : Math.min(0, ...pts.map((p) => p[1]));
  let y1 = Math.max(...pts.map((p) => p[1]), opts.max !== undefined ? opts.max : y0 + 1e-9);
  if (y1 <= y0) y1 = y0 + 1;
  if (opts.integer) y1 = Math.max(4, Math.ceil(y1 / 4) * 4);  // four equal integer steps
  const X = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => H - B - ((v - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {  // y grid and labels
    const v = y0 + (i * (y1 - y0)) / 4;
    s.append(svg("line", {x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid"}));
    s.append(svg("text", {x: L - 6, y: Y(v) + 4, "text-anchor": "end"}, opts.label(v)));
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 10));  // integer version ticks
  for (let v = Math.ceil(x0); v <= x1; v += step) {
    s.append(svg("line", {x1: X(v), x2: X(v), y1: H - B, y2: H - B + 4, class: "axis"}));
    s.append(svg("text", {x: X(v), y: H - B + 16, "text-anchor": "middle"}, v));
  }
  s.append(svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  s.append(svg("text", {x: W - R, y: H - 2, "text-anchor": "end"}, "version"));
  for (const l of lines) {
    if (opts.bars) {
      const w = Math.max(2, Math.min(24, ((W - L - R) / Math.max(1, x1 - x0 + 1)) * 0.7));
      for (const [v, y] of l.pts) s.append(svg("rect", {x: X(v) - w / 2, y: Y(y), width: w, height: Math.max(0, Y(y0) - Y(y)), fill: l.color, "data-version": v}));
    } else {
      s.append(svg("polyline", {points: l.pts.map(([v, y]) => `${X(v)},${Y(y)}`).join(" "), class: "line", stroke: l.color}));
      for (const [v, y] of l.pts) s.append(svg("circle", {cx: X(v), cy: Y(y), r: 3, fill: l.color, "data-version": v}));
    }
  }
  box.append(s);
  if (lines.length > 1) {
    const legend = el("div", {class: "legend"});
    for (const l of lines) {
      const swatch = el("span");
      swatch.style.background = l.color;
      legend.append(swatch, l.name);
    }
    box.append(legend);
  }
  return box;
}

// --------------------------------------------------------------------------------------------- views

function summary(state) {
  const cards = [];
  const card = (label, value, note, attrs) => el("div", Object.assign({class: "card"}, attrs || {}),
    el("div", {class: "label"}, label), el("div", {class: "value"}, value), el("div", {class: "note"}, note || ""));
  if (Array.isArray(state.models)) {
    for (const m of state.models) {
      const last = m.versions[m.versions.length - 1] || {};
      cards.push(card(`${m.model}: version`, m.version, `committed ${fmt.time(last.created)}`, {"data-model": m.model, "data-field": "version", "data-value": m.version}));
      cards.push(card(`${m.model}: accuracy`, fmt.acc(last.accuracy), `best ${fmt.acc(m.best_accuracy)}`, {"data-model": m.model, "data-field": "accuracy", "data-value": last.accuracy ?? ""}));
    }
  }
  if (Array.isArray(state.fleets)) {
    const all = state.fleets.flatMap((f) => f.devices);
    const online = all.filter((d) => d.online).length;
    cards.push(card("devices online", `${online} / ${all.length}`, state.fleets.map((f) => f.fleet).join(", "), {"data-field": "online", "data-value": `${online}/${all.length}`}));
  }
  if (state.audit && !state.audit.denied) {
    const a = state.audit;
    cards.push(card("audit log", a.verified ? "verified" : "FAILS", `${a.last_seq} entries`, {"data-field": "audit", "data-value": a.verified}));
  }
  return cards;
}

function model(m) {
  const vs = m.versions.map((v) => v.version);
  const box = el("div", {"data-model": m.model});
  box.append(el("h2", {}, `Model ${m.model}`));
  box.append(el("div", {class: "charts"},
    chart("Accuracy per version", vs, [
      {values: m.versions.map((v) => v.accuracy), color: "#2f5fd0", name: "core's validation rows"},
      {values: m.versions.map((v) => v.federated), color: "#d0672f", name: "agents' held-out data (federated)"}],
      {label: (v) => v.toFixed(2)}),
    chart("Participants per version", vs, [{values: m.versions.map((v) => (v.fog === null ? null : v.participants)), color: "#8a4fd0"}], {bars: true, min: 0, integer: true, label: (v) => v.toFixed(0)}),
    chart("Update bytes per version", vs, [{values: m.versions.map((v) => v.bytes), color: "#0f8a8a"}], {bars: true, min: 0, label: (v) => fmt.bytes(Math.round(v))})));
  box.append(el("h3", {}, "Layers: vector clocks and staleness"));
  box.append(table(["layer", "clock (fog: updates)", "last changed in version", "versions since", "staleness of that push"],
    m.layers.map((l) => el("tr", {"data-layer": l.layer},
      cell("layer", l.layer, l.layer),
      cell("clock", JSON.stringify(l.clock), Object.entries(l.clock).map(([k, n]) => `${k}: ${n}`).join(", ") || "{}"),
      cell("last_changed", l.last_changed, l.last_changed, "num"),
      cell("behind", l.behind, l.behind, "num"),
      cell("staleness", l.staleness, l.staleness ?? "–", "num")))));
  box.append(el("h3", {}, "Versions (newest first)"));
  const recent = m.versions.slice(-15).reverse();
  box.append(table(["version", "committed", "fog", "participants", "accuracy", "loss", "federated accuracy", "update bytes", "epsilon", "layers"],
    recent.map((v) => el("tr", {"data-version": v.version},
      cell("version", v.version, v.version, "num"),
      cell("created", v.created, fmt.time(v.created)),
      cell("fog", v.fog, v.fog ?? "(registered)"),
      cell("participants", v.participants, v.participants, "num"),
      cell("accuracy", v.accuracy, fmt.acc(v.accuracy), "num"),
      cell("loss", v.loss, v.loss === null || v.loss === undefined ? "–" : v.loss.toFixed(4), "num"),
      cell("federated", v.federated, fmt.acc(v.federated), "num"),
      cell("bytes", v.bytes, fmt.bytes(v.bytes), "num"),
      cell("epsilon", v.epsilon, fmt.eps(v.epsilon), "num"),
      cell("layers", v.layers.join(","), v.layers.join(", "))))));
  return box;
}

function battery(d) {
  if (d.battery_percent === null || d.battery_percent === undefined) return d.on_ac_power === false ? "–" : "mains";
  const bar = el("span", {class: "bar"}, el("span", {style: null}));
  bar.firstChild.style.width = `${Math.max(0, Math.min(100, d.battery_percent))}%`;
  bar.firstChild.style.background = d.battery_percent < 20 ? "var(--bad)" : d.battery_percent < 50 ? "var(--warn)" : "var(--ok)";
  return el("span", {}, bar, `${d.battery_percent.toFixed(0)}%${d.on_ac_power ? " (charging)" : ""}`);
}

function fleets(list) {
  const out = [];
  for (const f of list) {
    out.push(el("h3", {}, `Fleet ${f.fleet} `, f.connected ? pill("telemetry live", "ok") : pill(`not connected${f.refusal ? ": " + f.refusal : ""}`, "bad")));
    const strategyKind = {full: "ok", hybrid: "warn", minimal: "bad"};
    out.push(el("div", {class: "scroll"}, table(["device", "class", "state", "strategy", "battery", "last seen", "model version", "privacy budget (sample-level)"],
      f.devices.map((d) => el("tr", {"data-device": d.device_id},
        cell("device_id", d.device_id, d.device_id),
        cell("device_class", d.device_class, d.device_class ?? "–"),
        el("td", {"data-field": "online", "data-value": d.online}, pill(d.online ? "online" : (d.state || "offline"), d.online ? "ok" : "mute")),
        el("td", {"data-field": "strategy", "data-value": d.strategy ?? "", title: d.strategy_reason ?? ""}, d.strategy ? pill(d.strategy, strategyKind[d.strategy] || "mute") : "–"),
        el("td", {"data-field": "battery", "data-value": d.battery_percent ?? ""}, battery(d)),
        cell("age_s", d.age_s, fmt.ago(d.age_s)),
        cell("model_version", d.model_version, d.model_version ?? "–", "num"),
        el("td", {"data-field": "budget_spent", "data-value": d.budget_spent ?? ""},
          d.epsilon_budget === undefined ? "–" : el("span", {}, d.budget_spent ? pill("spent", "bad") : pill("available", "ok"), ` ε ${d.epsilon_budget}, δ ${d.privacy_delta}`)))))));
    if (!f.devices.length) out.push(el("div", {class: "denied"}, "no device has reported yet"));
  }
  return out;
}

function audit(a) {
  const badge = a.verified ? pill(`verified: ${a.last_seq} entries, signed head at ${a.head_seq}`, "ok", {id: "audit-verified", "data-ok": "true"})
                           : pill(`does not verify: ${a.reason}`, "bad", {id: "audit-verified", "data-ok": "false"});
  const key = el("span", {class: "legend"}, ` key ${a.key || "?"} (${a.key_source === "given" ? "core's audit key, given to the dashboard" : "the key entry 1 names"})`);
  return [el("p", {}, badge, key), table(["seq", "time", "actor", "action", "subject", "outcome"],
    a.tail.map((e) => el("tr", {"data-seq": e.seq},
      cell("seq", e.seq, e.seq, "num"), cell("time", e.time, e.time), cell("actor", e.actor, e.actor),
      cell("action", e.action, e.action), cell("subject", e.subject, e.subject),
      el("td", {"data-field": "outcome", "data-value": e.outcome}, pill(e.outcome, e.outcome === "ok" ? "ok" : e.outcome === "refused" ? "warn" : "bad")))))];
}

function render(state) {
  document.getElementById("summary").replaceChildren(...summary(state));
  const models = document.getElementById("models");
  models.replaceChildren(...(Array.isArray(state.models) ? state.models.map(model) : [denied("Models and versions", state.models.denied)]));
  document.getElementById("fleets").replaceChildren(...(Array.isArray(state.fleets) ? fleets(state.fleets) : [denied("Devices", state.fleets.denied)]));
  document.getElementById("audit").replaceChildren(...(state.audit.denied ? [denied("The audit log", state.audit.denied)] : audit(state.audit)));
  const status = document.getElementById("status");
  status.className = "status";
  status.textContent = `core ${state.core} · updated ${fmt.time(state.generated)}`;
  document.body.setAttribute("data-loaded", "true");
}

// ------------------------------------------------------------------------------------------ loading

function token() { return sessionStorage.getItem("hyprstream-token"); }

function showLogin(message) {
  if (timer) clearTimeout(timer);
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("status").textContent = "not signed in";
  document.body.setAttribute("data-loaded", "login");
}

async function refresh() {
  const t = token();
  if (!t) { showLogin(""); return; }
  try {
    const r = await fetch("api/state", {headers: {Authorization: `Bearer ${t}`}, cache: "no-store"});
    const body = await r.json();
    if (r.status === 401) { sessionStorage.removeItem("hyprstream-token"); showLogin(body.error); return; }
    if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
    document.getElementById("login").hidden = true;
    document.getElementById("main").hidden = false;
    render(body);
  } catch (err) {
    const status = document.getElementById("status");
    status.className = "status bad";
    status.textContent = `cannot refresh: ${err.message}`;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) {  // a link with #token=...: kept in this tab only, and taken out of the address bar
    sessionStorage.setItem("hyprstream-token", hash.get("token"));
    history.replaceState(null, "", location.pathname);
  }
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("hyprstream-token", document.getElementById("token").value.trim());
    refresh();
  });
  refresh();
});
