// DeTransformer Edge dashboard: renders /api/state and live updates from /api/events (SSE).
// Vanilla JS, no build step, no third-party code. Every value from the snapshot is inserted as
// text (textContent / SVG text nodes), never as HTML: request texts come from voice input.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#3b6fd8", "#27a387", "#e07a2f", "#9b5de5", "#d1453b", "#c9a20f", "#2a9fd6", "#d15b9a"];
const KIND_COLOR = { intent: "#3b6fd8", embed: "#27a387", generate: "#9b5de5", answer: "#d17a22" };
const CHART_N = 50;
let colors = new Map();

// --- small DOM helpers -----------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "style") for (const [p, val] of Object.entries(v)) node.style.setProperty(p, val);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) node.setAttribute(k, v);
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function tip(node, text) { node.append(svg("title", {}, text)); return node; }

function fmt(n, digits = 1) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

function fmtMem(mb) {
  if (mb === null || mb === undefined) return "–";
  return mb >= 1024 ? `${fmt(mb / 1024, 1)} GB` : `${fmt(mb, 0)} MB`;
}

function clock(ts) {
  if (!ts) return "";
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

function deviceColor(id) {
  if (!colors.has(id)) colors.set(id, PALETTE[colors.size % PALETTE.length]);
  return colors.get(id);
}

// --- header ------------------------------------------------------------------------------------------

function renderHeader(s) {
  document.getElementById("subtitle").textContent = `home cluster “${s.cluster}” · this page is served by ${s.me} (${s.role})`;
  const facts = document.getElementById("facts");
  const online = s.devices.filter((d) => d.online).length;
  const items = [
    ["leader", s.leader ? s.leader.id : "electing…"],
    ["devices online", `${online} / ${s.devices.length}`],
    ["placement", s.placement ? `v${s.placement.version}` : (s.devices.find((d) => d.id === s.me)?.status?.placement_version ? `v${s.devices.find((d) => d.id === s.me).status.placement_version}` : "–")],
    ["version", s.version],
  ];
  facts.replaceChildren(...items.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
  document.title = `${s.cluster} · DeTransformer Edge`;
}

// --- devices -----------------------------------------------------------------------------------------

function renderDevices(s) {
  const box = document.getElementById("devices");
  document.getElementById("device-count").textContent = `${s.devices.length}`;
  if (!s.devices.length) {
    box.replaceChildren(el("p", { class: "empty" }, "No device has announced itself yet."));
    return;
  }
  const ready = new Set(s.placement ? s.placement.ready : []);
  box.replaceChildren(...s.devices.map((d) => {
    const p = d.profile || {};
    const st = d.status || {};
    const isLeader = d.role === "leader";
    const badges = el("div", { class: "badges" },
      isLeader ? el("span", { class: "badge leader", "data-role": "leader" }, "★ leader") : null,
      !isLeader && d.online ? el("span", { class: "badge", "data-role": "follower" }, "follower") : null,
      !d.online ? el("span", { class: "badge offline" }, "offline") : null,
      d.online && st.ready ? el("span", { class: "badge ready" }, "ready") : null,
      d.online && d.status && !st.ready ? el("span", { class: "badge loading" }, "loading weights") : null,
      d.id === s.me ? el("span", { class: "badge me" }, "this device") : null,
    );
    const subBlocks = (st.sub_blocks || []).length;
    const profileLine = [p.device_class, p.gflops !== undefined ? `${fmt(p.gflops, 0)} GFLOPS` : null,
      p.mem_mb !== undefined ? fmtMem(p.mem_mb) : null, p.link_mbit !== undefined ? `${fmt(p.link_mbit, 0)} Mbit/s` : null]
      .filter(Boolean).join(" · ");
    const rows = [
      ["load", st.load !== undefined ? fmt(st.load, 2) : "–"],
      ["memory", st.rss_mb !== undefined ? fmtMem(st.rss_mb) : "–"],
      ["placement", st.placement_version ? `v${st.placement_version}` : "–"],
      ["sub-blocks", `${subBlocks}`],
      ["last run", st.last_latency_ms !== null && st.last_latency_ms !== undefined ? `${fmt(st.last_latency_ms, 1)} ms` : "–"],
      ["score", fmt(p.score, 1)],
    ];
    const memUse = p.mem_mb && st.rss_mb ? Math.min(100, (100 * st.rss_mb) / p.mem_mb) : 0;
    return el("article", {
      class: `card${d.online ? "" : " offline"}`, "data-device": d.id, "data-role": d.role,
      style: { "--dev": deviceColor(d.id) },
    },
      el("div", { class: "head" }, el("span", { class: "id", title: p.name || d.id }, d.id)),
      el("p", { class: "profile", title: "capability profile" }, profileLine || "no profile yet"),
      badges,
      el("dl", { class: "stats" }, rows.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v)))),
      el("div", { class: "bar", title: `memory in use: ${fmt(memUse, 1)} % of ${fmtMem(p.mem_mb)} (last status ${clock(st.ts)})` },
        el("span", { style: { width: `${memUse.toFixed(1)}%` } })),
    );
  }));
}

// --- placement picture -------------------------------------------------------------------------------

function layoutFor(name, model, layouts) {
  const known = layouts && layouts[name];
  if (known && Array.isArray(known.layers)) return { layers: known.layers, nd: known.nd || 1, task: known.task };
  // No layout from the server: infer the layer count from the holdings, all shown as coupled.
  let n = 0;
  for (const w of Object.values(model.holdings || {})) for (const i of w.whole_layers || []) n = Math.max(n, i + 1);
  return { layers: Array(Math.max(n, 1)).fill("coupled"), nd: 1, task: "" };
}

function placementSvg(name, model, layout, deviceIds) {
  const L = layout.layers.length;
  const nd = Math.max(1, layout.nd);
  const labelW = Math.max(60, 12 + 6.8 * Math.max(...deviceIds.map((d) => d.length))), cellW = Math.max(28, nd * 7 + 6), gap = 4, rowH = 24, headH = 34, pad = 2;
  const width = labelW + (L + 1) * (cellW + gap) + pad;
  const height = headH + deviceIds.length * (rowH + gap) + pad;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": `placement of ${name}`, class: "placement-grid", "data-model": name });
  const colX = (c) => labelW + c * (cellW + gap);
  // header: embeddings column, then layer numbers with their kind
  root.append(svg("text", { x: colX(0) + cellW / 2, y: 14, "text-anchor": "middle", "font-size": 11, class: "muted" }, "emb"));
  layout.layers.forEach((kind, i) => {
    const x = colX(i + 1);
    root.append(tip(svg("text", { x: x + cellW / 2, y: 14, "text-anchor": "middle", "font-size": 11 }, `L${i}`), `layer ${i}: ${kind}`));
    root.append(svg("text", { x: x + cellW / 2, y: 27, "text-anchor": "middle", "font-size": 9, class: "muted" },
      kind === "decoupled" ? `${nd}×sub` : "full"));
    if (kind === "coupled" && i < L - 1) {
      const lx = x + cellW + gap / 2;
      root.append(svg("line", { x1: lx, x2: lx, y1: headH - 4, y2: height, class: "blockline" }));
    }
  });
  deviceIds.forEach((dev, r) => {
    const y = headH + r * (rowH + gap);
    const w = (model.holdings || {})[dev] || {};
    const color = deviceColor(dev);
    const subs = new Set(w.sub_blocks || []);
    const whole = new Set(w.whole_layers || []);
    const shards = w.tp_shards || [];
    const holds = w.embeddings || subs.size || whole.size || shards.length;
    root.append(svg("text", { x: 0, y: y + rowH / 2 + 4, "font-size": 12, "font-weight": holds ? 600 : 400,
      class: holds ? "" : "muted" }, dev));
    // embeddings
    const emb = svg("rect", { x: colX(0), y, width: cellW, height: rowH, rx: 4 });
    if (w.embeddings) emb.setAttribute("fill", color); else emb.setAttribute("class", "empty-cell");
    root.append(tip(emb, `${dev}: ${w.embeddings ? "holds" : "no"} embeddings / output head`));
    layout.layers.forEach((kind, i) => {
      const x = colX(i + 1);
      if (kind === "decoupled") {
        const sw = (cellW - (nd - 1) * 2) / nd;
        const held = [];
        for (let j = 0; j < nd; j++) {
          const on = whole.has(i) || subs.has(j);
          if (on) held.push(j);
          const sq = svg("rect", { x: x + j * (sw + 2), y, width: sw, height: rowH, rx: 2, "data-held": on ? "1" : "0" });
          if (on) sq.setAttribute("fill", color); else sq.setAttribute("class", "empty-cell");
          root.append(tip(sq, `${dev} · layer ${i} sub-block ${j}: ${on ? "held" : "not held"}`));
        }
      } else if (whole.has(i)) {
        root.append(tip(svg("rect", { x, y, width: cellW, height: rowH, rx: 4, fill: color, "data-held": "1" }),
          `${dev} · layer ${i}: whole layer`));
      } else if (shards.length) {
        root.append(svg("rect", { x, y, width: cellW, height: rowH, rx: 4, class: "empty-cell" }));
        for (const [rank, k] of shards) {
          const sx = x + (rank * cellW) / k;
          root.append(tip(svg("rect", { x: sx + 0.5, y: y + 3, width: cellW / k - 1, height: rowH - 6, rx: 2, fill: color, "data-held": "1" }),
            `${dev} · layer ${i}: tensor-parallel shard ${rank + 1} of ${k}`));
        }
      } else {
        root.append(tip(svg("rect", { x, y, width: cellW, height: rowH, rx: 4, class: "empty-cell" }), `${dev} · layer ${i}: not held`));
      }
    });
  });
  return root;
}

function renderPlacement(s) {
  const box = document.getElementById("placement");
  const version = document.getElementById("placement-version");
  document.querySelector("#placement-h + .hint").hidden = !s.placement;
  if (!s.placement) {
    version.textContent = "";
    const leader = s.leader ? s.leader.id : null;
    box.replaceChildren(el("p", { class: "empty" }, leader && leader !== s.me
      ? `The placement and the request log are kept by the leader: open the dashboard of ${leader}.`
      : "No placement yet: the leader is planning."));
    return;
  }
  const p = s.placement;
  version.textContent = `v${p.version} · ready: ${p.ready.length ? p.ready.join(", ") : "none yet"}`;
  const deviceIds = s.devices.map((d) => d.id);
  for (const m of Object.values(p.models)) for (const d of Object.keys(m.holdings || {})) if (!deviceIds.includes(d)) deviceIds.push(d);
  const models = Object.entries(p.models);
  if (!models.length) { box.replaceChildren(el("p", { class: "empty" }, "The placement holds no model.")); return; }
  let widest = 0;
  box.replaceChildren(...models.map(([name, m]) => {
    const layout = layoutFor(name, m, s.layouts);
    const picture = placementSvg(name, m, layout, deviceIds);
    widest = Math.max(widest, Number(picture.getAttribute("width")));
    // a deep model gets a whole row, so its cells stay readable
    return el("div", { class: Number(picture.getAttribute("width")) > 420 ? "model span" : "model", "data-model": name },
      el("div", { class: "title" },
        el("span", { class: "name" }, name),
        layout.task ? el("span", { class: "meta" }, layout.task) : null,
        el("span", { class: "meta" }, `· expected ${fmt(m.expected_ms, 2)} ms`)),
      el("div", { class: "plan-label", title: "the static plan's summary" }, m.label),
      picture);
  }), el("div", { class: "legend" }, deviceIds.map((d) => el("span", { style: { "--dev": deviceColor(d) } }, el("i"), d))));
  // very deep models: the placement takes the page's full width and the log moves below it
  document.querySelector(".split").classList.toggle("wide", widest > 760);
}

// --- requests ----------------------------------------------------------------------------------------

function renderRequests(s) {
  const list = document.getElementById("requests");
  const reqs = (s.requests || []).slice().reverse().slice(0, 100);
  document.getElementById("request-count").textContent = s.requests && s.requests.length ? `${s.requests.length}` : "";
  const empty = document.getElementById("requests-empty");
  empty.hidden = reqs.length > 0;
  empty.textContent = s.placement ? "No requests yet." : "Kept by the leader: see its dashboard.";
  list.replaceChildren(...reqs.map((r) => {
    const kind = KIND_COLOR[r.kind] ? r.kind : "other";
    const pending = r.latency_ms === null && !r.error;
    return el("li", { class: r.error ? "error" : "", "data-request": r.id },
      el("span", { class: "time" }, clock(r.started)),
      el("span", { class: `kind ${kind}` }, r.kind),
      el("span", { class: "text", title: r.text }, r.text),
      el("span", { class: "ms" }, pending ? "…" : `${fmt(r.latency_ms, 1)} ms`),
      el("span", { class: "detail" },
        el("span", { class: "plan" }, r.plan || "no plan"), " → ",
        el("span", { class: "result" }, r.error ? `error: ${r.error}` : (pending ? "running" : (r.result || "–")))));
  }));
}

function niceStep(max) {
  const raw = max / 4;
  const mag = 10 ** Math.floor(Math.log10(raw || 1));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

function renderLatency(s) {
  const box = document.getElementById("latency");
  const done = (s.requests || []).filter((r) => r.latency_ms !== null && r.latency_ms !== undefined).slice(-CHART_N);
  const summary = document.getElementById("latency-summary");
  if (!done.length) {
    summary.textContent = "";
    box.replaceChildren(el("p", { class: "empty" }, s.placement ? "No requests yet." : "Shown on the leader's dashboard."));
    return;
  }
  const sorted = done.map((r) => r.latency_ms).sort((a, b) => a - b);
  const pct = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  summary.textContent = `last ${done.length} · median ${fmt(pct(0.5), 1)} ms · p90 ${fmt(pct(0.9), 1)} ms`;
  const W = 520, H = 210, left = 50, right = 8, top = 10, bottom = 26;
  const max = Math.max(...sorted) * 1.1 || 1;
  const step = niceStep(max);
  const top_ = Math.ceil(max / step) * step;
  const y = (v) => top + (H - top - bottom) * (1 - v / top_);
  const slot = (W - left - right) / Math.max(done.length, 20);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "latency of the last requests", class: "latency-chart" });
  for (let v = 0; v <= top_ + 1e-9; v += step) {
    root.append(svg("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: "axis" }));
    root.append(svg("text", { x: left - 6, y: y(v) + 3.5, "text-anchor": "end", "font-size": 10, class: "muted" },
      v + step > top_ + 1e-9 ? `${fmt(v, 1)} ms` : fmt(v, 1)));
  }
  done.forEach((r, i) => {
    const x = left + i * slot + 1;
    const color = r.error ? "#d1453b" : (KIND_COLOR[r.kind] || "#6a7283");
    const h = Math.max(1, y(0) - y(r.latency_ms));
    root.append(tip(svg("rect", { x, y: y(0) - h, width: Math.max(2, slot - 2), height: h, rx: 1.5, fill: color }),
      `${clock(r.started)} ${r.kind} · ${fmt(r.latency_ms, 1)} ms · ${r.plan || ""}${r.error ? " · error: " + r.error : ""}`));
  });
  const legend = Object.entries(KIND_COLOR).concat([["error", "#d1453b"]]);
  legend.forEach(([k, c], i) => {
    const x = left + i * 80;
    root.append(svg("rect", { x, y: H - 12, width: 9, height: 9, rx: 2, fill: c }));
    root.append(svg("text", { x: x + 13, y: H - 4, "font-size": 10, class: "muted" }, k));
  });
  box.replaceChildren(root);
}

// --- wiring ------------------------------------------------------------------------------------------

function render(s) {
  if (!s || !Array.isArray(s.devices)) return;
  s.devices.forEach((d) => deviceColor(d.id));
  renderHeader(s);
  renderDevices(s);
  renderPlacement(s);
  renderLatency(s);
  renderRequests(s);
  document.getElementById("footer").textContent =
    `read-only view · updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
  document.body.dataset.loaded = "1";
}

function setLive(state, text) {
  const live = document.getElementById("live");
  live.dataset.state = state;
  live.textContent = text;
}

async function fetchState() {
  try {
    const resp = await fetch("/api/state", { cache: "no-store" });
    if (resp.ok) render(await resp.json());
  } catch (e) {
    setLive("offline", "agent unreachable");
  }
}

function connect() {
  // ?poll=1: plain polling, for proxies that buffer event streams and for headless screenshots
  // (an open event stream keeps a virtual-time browser waiting forever).
  if (!("EventSource" in window) || new URLSearchParams(location.search).get("poll") === "1") {
    setLive("live", "polling");
    setInterval(fetchState, 2000);
    return;
  }
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => setLive("live", "live"));
  source.addEventListener("state", (ev) => {
    setLive("live", "live");
    try { render(JSON.parse(ev.data)); } catch (e) { console.error("bad state event", e); }
  });
  source.addEventListener("error", () => setLive("offline", "reconnecting…"));
}

fetchState().then(connect);
