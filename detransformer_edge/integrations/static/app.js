// DeTransformer Edge dashboard: renders /api/state and live updates from /api/events (SSE).
// Vanilla JS, no build step, no third-party code. Every value from the snapshot is inserted as
// text (textContent / SVG text nodes), never as HTML: request texts come from voice input.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#3b6fd8", "#27a387", "#e07a2f", "#9b5de5", "#d1453b", "#c9a20f", "#2a9fd6", "#d15b9a"];
const KIND_COLOR = { intent: "#3b6fd8", embed: "#27a387", generate: "#9b5de5", answer: "#d17a22" };
const CHART_N = 50;
// span kinds of a traced request's timeline (parallel/trace.py SPAN_KINDS), in legend order
const SPAN_COLOR = { plan: "#6a7283", compute: "#3b6fd8", encode: "#27a387", decode: "#9b5de5",
  publish: "#e07a2f", wait: "#c9a20f", reply: "#d15b9a" };
let colors = new Map();
let lastState = null;
// the id of the request whose timeline is open; ?request=<id> opens one (a link to a request)
let selectedRequest = new URLSearchParams(location.search).get("request");
let shownTimeline = ""; // what the timeline panel draws now: periodic pushes redraw only on a change

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

function fmtBytes(n) {
  return n >= 1048576 ? `${fmt(n / 1048576, 1)} MiB` : n >= 1024 ? `${fmt(n / 1024, 1)} KiB` : `${n} B`;
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
    const traced = Array.isArray(r.trace);
    const classes = [r.error ? "error" : "", r.id === selectedRequest ? "selected" : ""].filter(Boolean).join(" ");
    return el("li", { class: classes, "data-request": r.id, "data-traced": traced ? "1" : "0", tabindex: 0,
      role: "button", "aria-pressed": r.id === selectedRequest ? "true" : "false",
      title: traced ? "traced: click for its timeline" : "click for its timeline (not traced)" },
      el("span", { class: "time" }, clock(r.started)),
      el("span", { class: `kind ${kind}` }, r.kind),
      el("span", { class: "text", title: r.text }, r.text),
      el("span", { class: "ms" }, pending ? "…" : `${fmt(r.latency_ms, 1)} ms`),
      el("span", { class: "detail" },
        el("span", { class: "plan" }, r.plan || "no plan"), " → ",
        el("span", { class: "result" }, r.error ? `error: ${r.error}` : (pending ? "running" : (r.result || "–"))),
        traced ? el("span", { class: "traced" }, "timeline") : null));
  }));
}

function selectRequest(id) {
  selectedRequest = selectedRequest === id ? null : id;
  shownTimeline = "";
  if (!lastState) return;
  renderRequests(lastState);
  renderTimeline(lastState);
  if (selectedRequest) document.getElementById("timeline-panel").scrollIntoView({ block: "nearest" });
}

// --- a traced request's timeline ---------------------------------------------------------------------

function renderTimeline(s) {
  const panel = document.getElementById("timeline-panel");
  if (!selectedRequest) { panel.hidden = true; shownTimeline = ""; return; }
  const r = (s.requests || []).find((q) => q.id === selectedRequest);
  const key = r ? [r.id, r.latency_ms, r.error, Array.isArray(r.trace) ? r.trace.length : -1].join("|") : "gone";
  if (key === shownTimeline) return;
  shownTimeline = key;
  panel.hidden = false;
  const box = document.getElementById("timeline");
  const title = document.getElementById("timeline-title");
  if (!r) {
    title.textContent = "";
    box.replaceChildren(el("p", { class: "empty" }, "This request is no longer in the leader's log."));
    return;
  }
  box.dataset.request = r.id;
  title.textContent = `${r.kind} · ${clock(r.started)} · ${r.text}`;
  if (!Array.isArray(r.trace)) {
    box.replaceChildren(el("p", { class: "empty untraced" }, "This request was not traced. To trace one, send ",
      el("code", {}, "params.trace = true"), " with a request, or run ", el("code", {}, "detransformer-edge ask --trace \"…\""),
      " or ", el("code", {}, "detransformer-edge bench --trace"), "."));
    return;
  }
  if (r.latency_ms === null && !r.error) {
    box.replaceChildren(el("p", { class: "empty" }, "Still running: its timeline comes when it finishes."));
    return;
  }
  if (!r.trace.length) {
    box.replaceChildren(el("p", { class: "empty" }, `Traced, but no device ran it${r.error ? `: ${r.error}` : "."}`));
    return;
  }
  const spans = r.trace.map(([device, kind, name, start, end, bytes, copies]) => ({ device, kind, name, start, end, bytes, copies }));
  const kinds = Object.keys(SPAN_COLOR).filter((k) => spans.some((x) => x.kind === k));
  box.replaceChildren(
    el("div", { class: "plan-label", title: "the plan the runtime planner chose" },
      `${r.plan || "no plan"} · request ${r.id} · ${spans.length} spans`),
    timelineSvg(spans, laneOrder(spans, r.breakdown, s.me), s.me, box.clientWidth),
    el("div", { class: "legend" }, kinds.map((k) => el("span", { "data-kind": k, style: { "--dev": SPAN_COLOR[k] || "#6a7283" } }, el("i"), k))),
    r.breakdown ? breakdownTable(r.breakdown, kinds) : null,
    r.breakdown ? residualLine(r.breakdown) : null);
}

function laneOrder(spans, breakdown, me) {
  // the server's order (the coordinator first, then by first span); the same here without one
  const first = new Map();
  for (const x of spans) first.set(x.device, Math.min(x.start, first.has(x.device) ? first.get(x.device) : Infinity));
  const order = breakdown ? breakdown.devices.map((d) => d.device) : [];
  const rest = [...first.keys()].filter((d) => !order.includes(d))
    .sort((a, b) => (a !== me) - (b !== me) || first.get(a) - first.get(b));
  return order.concat(rest);
}

function timelineSvg(spans, lanes, me, boxWidth) {
  let t0 = Infinity, t1 = -Infinity;
  for (const x of spans) { t0 = Math.min(t0, x.start); t1 = Math.max(t1, x.end); }
  const totalMs = Math.max((t1 - t0) * 1e3, 1e-3);
  const W = Math.max(640, Math.round(boxWidth || 1000));
  const labelW = Math.max(80, 30 + 7.2 * Math.max(...lanes.map((d) => d.length + (d === me ? 2 : 0))));
  const right = 16, top = 26, rowH = 22, gap = 6;
  const plotW = W - labelW - right;
  const H = top + lanes.length * (rowH + gap) + 4;
  const x = (t) => labelW + ((t - t0) * 1e3 / totalMs) * plotW;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", class: "timeline-chart",
    "aria-label": `timeline: ${lanes.length} devices over ${fmt(totalMs, 1)} ms` });
  const step = niceStep(totalMs / 2);
  for (let v = 0; v <= totalMs + 1e-9; v += step) {
    const tx = labelW + (v / totalMs) * plotW;
    root.append(svg("line", { x1: tx, x2: tx, y1: top - 6, y2: H, class: "tick" }));
    root.append(svg("text", { x: tx, y: top - 10, "text-anchor": v === 0 ? "start" : "middle", "font-size": 10, class: "muted" },
      v + step > totalMs + 1e-9 ? `${fmt(v, 2)} ms` : fmt(v, 2)));
  }
  lanes.forEach((dev, i) => {
    const y = top + i * (rowH + gap);
    const lane = svg("g", { "data-lane": dev });
    lane.append(svg("rect", { x: labelW, y, width: plotW, height: rowH, rx: 3, class: "lane" }));
    lane.append(svg("rect", { x: 0, y: y + 6, width: 4, height: rowH - 12, rx: 1, fill: deviceColor(dev) }));
    lane.append(tip(svg("text", { x: 10, y: y + rowH / 2 + 4, "font-size": 12, "font-weight": dev === me ? 650 : 500 },
      dev === me ? `${dev} ★` : dev), dev === me ? `${dev}: the leader, which coordinated this request` : dev));
    // waits first, so work drawn over them stays visible
    const mine = spans.filter((sp) => sp.device === dev).sort((a, b) => (a.kind !== "wait") - (b.kind !== "wait"));
    for (const sp of mine) {
      const bx = x(sp.start), bw = Math.max(1, x(sp.end) - bx);
      const ms = (sp.end - sp.start) * 1e3;
      const bytes = sp.bytes ? ` · ${fmtBytes(sp.bytes)}${sp.copies ? ` to ${sp.copies} device${sp.copies === 1 ? "" : "s"}` : ""}` : "";
      lane.append(tip(svg("rect", { x: bx, y: y + 2, width: bw, height: rowH - 4, rx: 1.5, fill: SPAN_COLOR[sp.kind] || "#6a7283",
        class: `span ${sp.kind}`, "data-kind": sp.kind }),
        `${dev} · ${sp.kind}${sp.name ? " " + sp.name : ""} · ${fmt(ms, 2)} ms at +${fmt((sp.start - t0) * 1e3, 2)} ms${bytes}`));
    }
    root.append(lane);
  });
  return root;
}

function breakdownTable(b, kinds) {
  return el("table", { class: "breakdown" },
    el("thead", {}, el("tr", {}, el("th", {}, "ms per device"), kinds.map((k) => el("th", { "data-kind": k }, k)))),
    el("tbody", {}, b.devices.map((d) => el("tr", { "data-device": d.device },
      el("th", {}, d.device), kinds.map((k) => el("td", {}, fmt(d[k], 2)))))));
}

function residualLine(b) {
  const wire = b.link_mbit > 0 ? `wire ${fmt(b.wire_ms, 2)} ms (its bytes at ${fmt(b.link_mbit, 0)} Mbit/s, the slowest link)`
    : "wire – (no device's link rate known)";
  return el("div", { class: "residual" },
    el("p", {}, `latency ${fmt(b.latency_ms, 2)} ms = compute ${fmt(b.compute_ms, 2)} ms (the slowest device) + ${wire} + `,
      el("strong", { class: "residual-ms", title: "what the request spent beyond its slowest device's compute and its bytes on the wire: waiting on other devices, the broker, planning, Python" },
        `residual ${fmt(b.residual_ms, 2)} ms`)),
    el("p", { class: "muted" }, `on the busiest device: codec ${fmt(b.codec_ms, 2)} ms · publish ${fmt(b.publish_ms, 2)} ms · planning ${fmt(b.plan_ms, 2)} ms`));
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
  renderTimeline(s);
  lastState = s;
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

function wireClicks() {
  const list = document.getElementById("requests");
  list.addEventListener("click", (ev) => {
    const li = ev.target.closest("[data-request]");
    if (li) selectRequest(li.dataset.request);
  });
  list.addEventListener("keydown", (ev) => {
    const li = ev.target.closest("[data-request]");
    if (li && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); selectRequest(li.dataset.request); }
  });
  document.getElementById("timeline-close").addEventListener("click", () => selectRequest(selectedRequest));
}

wireClicks();
fetchState().then(() => {
  if (selectedRequest) document.getElementById("timeline-panel").scrollIntoView({ block: "start" });
  connect();
});
