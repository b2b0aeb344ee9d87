// The planners' dashboard: every report of GET api/reports drawn as inline SVG, with
// axes, units and a legend, the exact numbers in a table under it, and CSV / Parquet
// downloads of the same filters. Plain JavaScript, no library, nothing from the network
// but this app's own API.
//
// The filters are the page's query string (start, end, model, category, region,
// firmware, and report options such as by=tier), so a view can be bookmarked and shared.
// Applying the form pushes a new query string and redraws without reloading.
//
// Every api/ request carries `Authorization: Bearer <token>`, a planner's token from the
// maker's sign-in (locally, the dev signer's: `usagepipe insights serve` and
// `usagepipe auth token --dashboard` print the address). The page takes it from its
// address's fragment, `#token=...`: a fragment is never sent to a server, so it stays out
// of access logs and of the Referer header. The token is kept in this tab's
// sessionStorage (so new filters and a reload keep it) and taken out of the address bar at
// once, so it is not bookmarked or shared with a view. A refused token (401) or one
// without the planner scope (403) replaces the page with a message saying what to do,
// and <body> carries data-state="error" and data-auth (the API's reason).
//
// For tests and scripts, once a load has finished <body> carries data-state="ready" and
// data-query (the filters drawn); each report's <section> carries data-state
// ("drawn", "empty", "suppressed" or "error"), data-rendered (how many of the report's
// rows the chart drew: each is one element of class "point"), data-rows,
// data-suppressed, data-generalised, data-start and data-end (the range the API
// answered for) and data-options (its options, as a query string: by=tier).
"use strict";

const NS = "http://www.w3.org/2000/svg";
const DIMENSIONS = ["model", "category", "region", "firmware"];
const RANGE_KEYS = ["start", "end"];
const ORDER = ["heatmap", "cycles", "programs", "regions", "cohorts", "errors", "adoption", "completeness"];
const WIDE = new Set(["programs", "regions", "cohorts", "errors"]);
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                 "#9c755f", "#bab0ac"];
// For a legend of more than ten (a washer's programs): ten hues, dark and light.
const PALETTE20 = ["#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d", "#b6992d", "#f1ce63",
                   "#499894", "#86bcb6", "#e15759", "#ff9d9a", "#79706e", "#bab0ac", "#d37295", "#fabfd2",
                   "#b07aa1", "#d4a6c8", "#9d7660", "#d7b5a6"];
function colors(n) { return n > PALETTE.length ? PALETTE20 : PALETTE; }
// Sequential scale (light to dark) for the heat map and the region tiles.
const RAMP = ["#fff7d6", "#fed976", "#fd8d3c", "#e6461f", "#a50f26", "#5c0420"];
const DAY_NAMES = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const DAY_MS = 86400000;

// Korea's 17 first-level divisions (ISO 3166-2:KR) as a tile grid: col and row roughly
// where each lies. Gangwon and Jeonbuk became special self-governing provinces with new
// codes (KR-51, KR-52); either code lands on the same tile.
const KOREA = [
  {code: "KR-28", name: "Incheon", col: 0, row: 0},
  {code: "KR-11", name: "Seoul", col: 1, row: 0},
  {code: "KR-42", also: ["KR-51"], name: "Gangwon", col: 2, row: 0},
  {code: "KR-41", name: "Gyeonggi", col: 1, row: 1},
  {code: "KR-43", name: "Chungbuk", col: 2, row: 1},
  {code: "KR-47", name: "Gyeongbuk", col: 3, row: 1},
  {code: "KR-44", name: "Chungnam", col: 0, row: 2},
  {code: "KR-50", name: "Sejong", col: 1, row: 2},
  {code: "KR-30", name: "Daejeon", col: 2, row: 2},
  {code: "KR-27", name: "Daegu", col: 3, row: 2},
  {code: "KR-31", name: "Ulsan", col: 4, row: 2},
  {code: "KR-45", also: ["KR-52"], name: "Jeonbuk", col: 1, row: 3},
  {code: "KR-48", name: "Gyeongnam", col: 2, row: 3},
  {code: "KR-26", name: "Busan", col: 3, row: 3},
  {code: "KR-29", name: "Gwangju", col: 0, row: 4},
  {code: "KR-46", name: "Jeonnam", col: 1, row: 4},
  {code: "KR-49", name: "Jeju", col: 0, row: 5},
];
const TILE_OF = new Map();
for (const t of KOREA) for (const c of [t.code, ...(t.also || [])]) TILE_OF.set(c, t);

// What each measure is, for axis titles, legends and tables; `pct`: a share (0..1)
// shown as a percentage.
const MEASURES = {
  events: {label: "events"},
  devices: {label: "devices"},
  cycles: {label: "cycles"},
  device_weeks: {label: "device-weeks"},
  device_days: {label: "device-days"},
  errors: {label: "errors raised"},
  per_1000_device_days: {label: "errors per 1,000 device-days", short: "per 1,000 device-days"},
  events_per_device: {label: "events per device"},
  active_devices: {label: "devices used"},
  remote_start_devices: {label: "started from the app"},
  schedule_devices: {label: "started by a schedule"},
  remote_start_share: {label: "remote start (app)", short: "remote start share", pct: true},
  schedule_share: {label: "schedule", short: "schedule share", pct: true},
  cycles_per_device_week: {label: "cycles per device-week", short: "cycles / device-week"},
  app_share: {label: "uses started from the app or a schedule", short: "app or schedule share", pct: true},
  received: {label: "messages received", short: "received"},
  missing: {label: "messages missing", short: "missing"},
  complete_device_days: {label: "device-days without a gap", short: "complete device-days"},
  completeness: {label: "received share", pct: true},
};
const DIMENSION_LABELS = {
  day_of_week: "day", hour: "hour", feature: "program / mode", code: "error code", cycles: "cycles in the week",
  week: "week from", day: "day (UTC)", cohort: "cohort",
};

// -- small helpers ---------------------------------------------------------------------

function el(name, attrs, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function html(name, attrs, ...children) {
  const node = document.createElement(name);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "className") node.className = v; else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== undefined && c !== null) node.append(c);
  return node;
}

function title(node, text) { node.appendChild(el("title", {}, text)); return node; }

const INT = new Intl.NumberFormat("en-US");
function fmtInt(v) { return INT.format(v); }
function fmtNum(v) {
  if (v === null || v === undefined) return "";
  if (Number.isInteger(v)) return fmtInt(v);
  return String(+v.toPrecision(4));
}
function fmtPct(v, digits) {
  if (v === null || v === undefined) return "";
  const p = v * 100;
  return (digits === undefined ? +p.toFixed(p >= 10 ? 1 : 2) : p.toFixed(digits)) + "%";
}
function fmtMeasure(name, v) { return MEASURES[name] && MEASURES[name].pct ? fmtPct(v) : fmtNum(v); }
// Table cells: the exact value as the API gave it (a share as a percentage, all digits).
function exactMeasure(name, v) {
  if (v === null || v === undefined) return "";
  if (MEASURES[name] && MEASURES[name].pct) return +(v * 100).toFixed(6) + "%";
  return Number.isInteger(v) ? fmtInt(v) : String(v);
}
function measureLabel(name) { return (MEASURES[name] || {label: name.replaceAll("_", " ")}).label; }
function pretty(v) { return v === null || v === undefined ? "(none)" : String(v).replaceAll("_", " "); }
function regionName(code) {
  if (code === null || code === undefined) return "region not recorded";
  const t = TILE_OF.get(code);
  return t ? `${code} ${t.name}` : String(code);
}
function dimValue(dim, v) {
  if (v === null || v === undefined) return dim === "region" ? "region not recorded" : "(not recorded)";
  if (dim === "region") return regionName(v);
  if (dim === "day_of_week" && Number.isInteger(v)) return DAY_NAMES[v - 1] || String(v);
  if (dim === "hour" && Number.isInteger(v)) return `${String(v).padStart(2, "0")}:00`;
  if (dim === "category" || dim === "cohort" || dim === "feature") return pretty(v);
  return String(v);
}

function ordered(values) {
  // Distinct values: numbers numerically first, then text (a generalised label such as
  // "8+" or "other" after the fine values).
  const distinct = [...new Set(values.map(String))];
  const num = v => v !== "" && !isNaN(Number(v));
  return distinct.sort((a, b) => {
    if (num(a) && num(b)) return Number(a) - Number(b);
    if (num(a) !== num(b)) return num(a) ? -1 : 1;
    return a < b ? -1 : a > b ? 1 : 0;
  });
}

function axisScale(lo, hi, n, integer) {
  // A round axis covering [lo, hi] in about n steps of 1, 2, 2.5 or 5 x 10^k (at least
  // 1 for counts): {lo, hi, ticks}.
  if (!(hi > lo)) hi = lo + (integer ? 1 : 0.01);
  const raw = (hi - lo) / n, p = Math.pow(10, Math.floor(Math.log10(raw)));
  const multiples = integer && p < 10 ? [1, 2, 5, 10] : [1, 2, 2.5, 5, 10];
  let step = multiples.map(m => m * p).find(s => s >= raw * 0.999);
  if (integer) step = Math.max(1, step);
  const a = Math.floor(lo / step + 1e-9) * step, b = Math.ceil(hi / step - 1e-9) * step;
  const out = [];
  for (let t = a; t <= b + step * 1e-6; t += step) out.push(+t.toPrecision(12));
  return {lo: a, hi: b, ticks: out};
}
function niceMax(max, integer) { return axisScale(0, max, 4, integer).hi; }
function ticks(lo, hi, n, integer) { return axisScale(lo, hi, n, integer).ticks; }

function mix(a, b, t) {
  const pa = [1, 3, 5].map(i => parseInt(a.slice(i, i + 2), 16));
  const pb = [1, 3, 5].map(i => parseInt(b.slice(i, i + 2), 16));
  return "#" + pa.map((x, i) => Math.round(x + (pb[i] - x) * t).toString(16).padStart(2, "0")).join("");
}
function ramp(t) {
  t = Math.max(0, Math.min(1, t));
  const x = t * (RAMP.length - 1), i = Math.min(Math.floor(x), RAMP.length - 2);
  return mix(RAMP[i], RAMP[i + 1], x - i);
}
function inkOn(t) { return t > 0.55 ? "#fff" : "#222"; }

let svgCount = 0;
function frame(width, height) {
  // An SVG with the hatch patterns every chart uses: grey for a suppressed segment,
  // dark stripes over a generalised one.
  const id = ++svgCount;
  const svg = el("svg", {viewBox: `0 0 ${width} ${height}`, width, height, role: "img"});
  const defs = el("defs");
  const sup = el("pattern", {id: `sup${id}`, width: 6, height: 6, patternUnits: "userSpaceOnUse",
                             patternTransform: "rotate(45)"});
  sup.appendChild(el("rect", {width: 6, height: 6, fill: "#eef0f2"}));
  sup.appendChild(el("line", {x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#c3c9cf", "stroke-width": 2}));
  const gen = el("pattern", {id: `gen${id}`, width: 7, height: 7, patternUnits: "userSpaceOnUse",
                             patternTransform: "rotate(-45)"});
  gen.appendChild(el("line", {x1: 0, y1: 0, x2: 0, y2: 7, stroke: "rgba(0,0,0,.28)", "stroke-width": 1.5}));
  defs.append(sup, gen);
  svg.appendChild(defs);
  svg.sup = `url(#sup${id})`;
  svg.gen = `url(#gen${id})`;
  return svg;
}

function legendPlaces(items, maxWidth) {
  // Where each legend item goes: rows of swatches with names, wrapping at maxWidth.
  let cx = 0, cy = 0;
  return items.map(item => {
    const w = 16 + 6.2 * item.name.length + 14;
    if (cx + w > maxWidth && cx > 0) { cx = 0; cy += 16; }
    const at = [cx, cy];
    cx += w;
    return at;
  });
}
function legendHeight(items, maxWidth) {
  return items.length ? Math.max(...legendPlaces(items, maxWidth).map(p => p[1])) + 16 : 0;
}

function legend(svg, x, y, items, maxWidth) {
  // A row of coloured swatches with names, wrapping at maxWidth; the height used.
  const places = legendPlaces(items, maxWidth);
  items.forEach((item, i) => {
    const cx = x + places[i][0], cy = y + places[i][1];
    const swatch = el("rect", {x: cx, y: cy, width: 11, height: 11, rx: 2, fill: item.color, "class": "swatch"});
    svg.appendChild(swatch);
    const hatch = item.hatch === "sup" ? svg.sup : item.hatch === "gen" ? svg.gen : item.hatch;
    if (hatch) svg.appendChild(el("rect", {x: cx, y: cy, width: 11, height: 11, rx: 2, fill: hatch}));
    svg.appendChild(el("text", {x: cx + 15, y: cy + 9.5}, item.name));
  });
  return legendHeight(items, maxWidth);
}

function colorScale(svg, x, y, width, max, label, fmt, integer, lo) {
  // A horizontal gradient bar from `lo` (0) to `max` with ticks: the heat map's and the
  // tiles' key.
  lo = lo || 0;
  const id = `ramp${++svgCount}`;
  const grad = el("linearGradient", {id, x1: 0, x2: 1, y1: 0, y2: 0});
  RAMP.forEach((c, i) => grad.appendChild(el("stop", {offset: i / (RAMP.length - 1), "stop-color": c})));
  svg.querySelector("defs").appendChild(grad);
  svg.appendChild(el("text", {x, y: y - 4, "class": "axis-title"}, label));
  svg.appendChild(el("rect", {x, y, width, height: 10, fill: `url(#${id})`, stroke: "#ccc", "class": "color-scale"}));
  for (const t of ticks(lo, max, 4, integer).filter(t => t <= max + 1e-9)) {
    const tx = x + width * (t - lo) / (max - lo);
    svg.appendChild(el("line", {x1: tx, x2: tx, y1: y + 10, y2: y + 13, "class": "axis"}));
    svg.appendChild(el("text", {x: tx, y: y + 23, "text-anchor": "middle"}, fmt(t)));
  }
}

function mark(node, row, text) {
  // One drawn report row: class "point", the exact numbers in a tooltip, generalised
  // rows marked.
  node.classList.add("point");
  if (row.generalised) node.classList.add("generalised");
  title(node, row.generalised ? `${text}\n(generalised: ${row.generalised})` : text);
  return node;
}

function rowLabel(report, row) {
  return report.dimensions.map(d => dimValue(d, row[d])).join(" · ");
}
function rowText(report, row, measures) {
  return `${rowLabel(report, row)}: ` +
    (measures || report.measures).map(m => `${fmtMeasure(m, row[m])} ${measureLabel(m)}`).join(", ");
}

// -- generic charts: grouped bars and lines --------------------------------------------

function groupedBars(report, rows, opts) {
  // Vertical bars: one group per x value, one bar per series; `value` in the y axis's
  // unit (opts.pct: a share). opts: x(row), series(row), value(row), yTitle, xTitle.
  const W = opts.width, H = opts.height || 300;
  const M = {l: 58, r: 12, t: 10, b: 58};
  let xs = ordered(rows.map(opts.x));
  if (opts.continuous) {
    // Whole numbers (cycles in a week): every value from the least to the greatest,
    // so a gap reads as a gap; generalised labels ("8+") after them.
    const nums = xs.filter(v => /^\d+$/.test(v)).map(Number), rest = xs.filter(v => !/^\d+$/.test(v));
    if (nums.length) xs = [...Array.from({length: Math.max(...nums) - Math.min(...nums) + 1},
                                         (_, i) => String(Math.min(...nums) + i)), ...rest];
  }
  const series = ordered(rows.map(opts.series));
  const keyItems = series.map((name, i) => ({name: opts.seriesLabel(name), color: PALETTE[i % PALETTE.length]}));
  if (rows.some(r => r.suppressed)) keyItems.push({name: "suppressed (fewer than k owners)", color: "#eef0f2", hatch: "sup"});
  const svg = frame(W, H + 6 + legendHeight(keyItems, W - M.l - M.r));
  const scale = axisScale(0, Math.max(...rows.filter(r => !r.suppressed).map(opts.value), 0), 4, opts.integer);
  const max = scale.hi;
  const py = v => H - M.b - (H - M.t - M.b) * v / max;
  const fmt = opts.pct ? v => fmtPct(v, max < 0.05 ? 1 : 0) : v => fmtNum(+v.toPrecision(3));
  for (const t of scale.ticks) {
    svg.appendChild(el("line", {x1: M.l, x2: W - M.r, y1: py(t), y2: py(t), "class": "grid"}));
    svg.appendChild(el("text", {x: M.l - 5, y: py(t) + 4, "text-anchor": "end"}, fmt(t)));
  }
  svg.appendChild(el("line", {x1: M.l, x2: W - M.r, y1: py(0), y2: py(0), "class": "axis"}));
  svg.appendChild(el("text", {x: 12, y: (H - M.b + M.t) / 2, "text-anchor": "middle", "class": "axis-title",
                              transform: `rotate(-90 12 ${(H - M.b + M.t) / 2})`}, opts.yTitle));
  const step = (W - M.l - M.r) / Math.max(xs.length, 1);
  const bw = Math.max(1, step * 0.8 / Math.max(series.length, 1));
  let drawn = 0;
  for (const r of rows) {
    const i = xs.indexOf(String(opts.x(r))), s = series.indexOf(String(opts.series(r)));
    const x = M.l + i * step + step * 0.1 + s * bw;
    if (r.suppressed) {
      // Where a suppressed segment would stand: a hatched stub, so a gap is not read as 0.
      const stub = el("rect", {x, y: py(0) - 8, width: bw, height: 8, fill: svg.sup, "class": "suppressed"});
      svg.appendChild(title(stub, `${rowLabel(report, r)}: suppressed (${r.suppressed_reason})`));
      continue;
    }
    const v = opts.value(r);
    const g = el("g");
    g.appendChild(el("rect", {x, y: py(v), width: bw, height: py(0) - py(v), fill: PALETTE[s % PALETTE.length]}));
    if (r.generalised) g.appendChild(el("rect", {x, y: py(v), width: bw, height: py(0) - py(v), fill: svg.gen}));
    svg.appendChild(mark(g, r, opts.tip(r)));
    drawn++;
  }
  const every = Math.ceil(xs.length / Math.max(1, Math.floor((W - M.l - M.r) / 34)));
  const rotate = xs.some(t => String(opts.xLabel(t)).length > 4) && xs.length > 5;
  xs.forEach((t, i) => {
    if (i % every) return;
    const x = M.l + i * step + step / 2, y = H - M.b + 14;
    const label = String(opts.xLabel(t));
    svg.appendChild(title(el("text", {x, y, "text-anchor": rotate ? "end" : "middle",
                                      transform: rotate ? `rotate(-30 ${x} ${y - 4})` : undefined},
                             label.length > 18 ? label.slice(0, 17) + "\u2026" : label), label));
  });
  svg.appendChild(el("text", {x: (M.l + W - M.r) / 2, y: H - 8, "text-anchor": "middle", "class": "axis-title"},
                     opts.xTitle));
  legend(svg, M.l, H + 2, keyItems, W - M.l - M.r);
  return {svg, drawn};
}

function lineChart(report, rows, opts) {
  // Lines over an ordered x (weeks, days): one line per series and value measure.
  // opts: x(row), lines: [{name, series(row) or null, value(row)}], pct, yMin, titles.
  const W = opts.width, H = opts.height || 290;
  const M = {l: 58, r: 30, t: 12, b: 52};
  const xs = ordered(rows.map(opts.x));
  const lines = [];
  for (const spec of opts.lines) {
    const bySeries = new Map();
    for (const r of rows) {
      const v = spec.value(r);
      if (v === null || v === undefined) continue;
      const key = spec.series ? String(spec.series(r)) : spec.name;
      if (!bySeries.has(key)) bySeries.set(key, []);
      bySeries.get(key).push(r);
    }
    for (const [key, rs] of [...bySeries].sort((a, b) => (a[0] < b[0] ? -1 : 1)))
      lines.push({name: spec.series ? opts.seriesLabel(key) : spec.name, rows: rs, value: spec.value});
  }
  const keyItems = lines.map((l, i) => ({name: l.name, color: PALETTE[i % PALETTE.length]}));
  const svg = frame(W, H + 4 + legendHeight(keyItems, W - M.l - M.r));
  const values = lines.flatMap(l => l.rows.map(l.value));
  const scale = axisScale(opts.yMin !== undefined ? opts.yMin(values) : 0,
                          Math.max(...values, opts.pct ? 0.01 : 1), 4, !opts.pct && opts.integer);
  const lo = Math.max(scale.lo, 0), hi = opts.pct ? Math.min(scale.hi, 1) : scale.hi;
  const px = i => M.l + (W - M.l - M.r) * (xs.length > 1 ? i / (xs.length - 1) : 0.5);
  const py = v => H - M.b - (H - M.t - M.b) * (v - lo) / (hi - lo);
  const fmt = opts.pct ? v => fmtPct(v, hi - lo < 0.05 ? 1 : 0) : v => fmtNum(+v.toPrecision(3));
  for (const t of scale.ticks.filter(t => t >= lo - 1e-9 && t <= hi + 1e-9)) {
    svg.appendChild(el("line", {x1: M.l, x2: W - M.r, y1: py(t), y2: py(t), "class": "grid"}));
    svg.appendChild(el("text", {x: M.l - 5, y: py(t) + 4, "text-anchor": "end"}, fmt(t)));
  }
  svg.appendChild(el("line", {x1: M.l, x2: M.l, y1: M.t, y2: H - M.b, "class": "axis"}));
  svg.appendChild(el("line", {x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, "class": "axis"}));
  svg.appendChild(el("text", {x: 12, y: (H - M.b + M.t) / 2, "text-anchor": "middle", "class": "axis-title",
                              transform: `rotate(-90 12 ${(H - M.b + M.t) / 2})`}, opts.yTitle));
  // Each report row is one point group: its marks on every line it appears on.
  const groups = new Map();
  lines.forEach((line, s) => {
    const color = PALETTE[s % PALETTE.length];
    const pts = line.rows.map(r => [px(xs.indexOf(String(opts.x(r)))), py(line.value(r)), r]).sort((a, b) => a[0] - b[0]);
    svg.appendChild(el("polyline", {points: pts.map(p => `${p[0]},${p[1]}`).join(" "), fill: "none", stroke: color,
                                    "stroke-width": 2, "stroke-dasharray": line.dash}));
    for (const [x, y, r] of pts) {
      if (!groups.has(r)) groups.set(r, el("g"));
      const dot = el("circle", {cx: x, cy: y, r: r.generalised ? 4.5 : 3.2, fill: r.generalised ? "#fff" : color,
                                stroke: color, "stroke-width": 2});
      groups.get(r).appendChild(title(dot, `${line.name}, ${dimValue("", opts.x(r))}: ${fmtMeasure(opts.measureOf(line), line.value(r))}`));
    }
  });
  let drawn = 0;
  for (const [r, g] of groups) { svg.appendChild(mark(g, r, opts.tip(r))); drawn++; }
  const every = Math.ceil(xs.length / Math.max(1, Math.floor((W - M.l - M.r) / 56)));
  xs.forEach((t, i) => {
    if (i % every) return;
    svg.appendChild(el("text", {x: px(i), y: H - M.b + 15, "text-anchor": "middle"}, opts.xLabel(t)));
  });
  svg.appendChild(el("text", {x: (M.l + W - M.r) / 2, y: H - 12, "text-anchor": "middle", "class": "axis-title"},
                     opts.xTitle));
  legend(svg, M.l, H - 2, keyItems, W - M.l - M.r);
  return {svg, drawn};
}

function shortDate(iso) {
  const d = new Date(String(iso).length === 10 ? iso + "T00:00:00Z" : iso);
  if (isNaN(d)) return String(iso);
  return d.toLocaleDateString("en-GB", {day: "numeric", month: "short", timeZone: "UTC"});
}

// -- the reports' own charts ------------------------------------------------------------

const DRAW = {};

DRAW.heatmap = (report, rows, ctx) => {
  // 7 local days x 24 hours, coloured by events; a generalised row is a hatched band
  // over its member cells, each coloured by the band's average per cell.
  const W = ctx.width, M = {l: 40, r: 10, t: 8, b: 84};
  const cw = (W - M.l - M.r) / 24, ch = 22, H = M.t + 7 * ch + M.b;
  const svg = frame(W, H);
  const cells = [];  // {row, members: [[dow, hour]], perCell}
  for (const r of rows) {
    const members = heatCells(r);
    cells.push({row: r, members, perCell: r.suppressed ? null : r.events / Math.max(members.length, 1)});
  }
  const max = niceMax(Math.max(...cells.filter(c => c.perCell !== null).map(c => c.perCell), 0), true);
  for (let d = 0; d < 7; d++)
    svg.appendChild(el("text", {x: M.l - 6, y: M.t + d * ch + ch / 2 + 4, "text-anchor": "end"}, DAY_NAMES[d]));
  for (let h = 0; h < 24; h++) {
    svg.appendChild(el("rect", {x: M.l + h * cw, y: M.t, width: cw - 1, height: 7 * ch - 1, fill: "#fafbfc"}));
    if (h % 2 === 0)
      svg.appendChild(el("text", {x: M.l + h * cw + cw / 2, y: M.t + 7 * ch + 13, "text-anchor": "middle"},
                         String(h).padStart(2, "0")));
  }
  svg.appendChild(el("text", {x: M.l + 12 * cw, y: M.t + 7 * ch + 30, "text-anchor": "middle", "class": "axis-title"},
                     `hour of day (local time, ${report.options.tz || "Asia/Seoul"}); rows: day of week`));
  let drawn = 0;
  for (const c of cells) {
    const g = el("g");
    for (const [dow, hour] of c.members) {
      const x = M.l + hour * cw, y = M.t + (dow - 1) * ch;
      const fill = c.perCell === null ? svg.sup : ramp(c.perCell / max);
      g.appendChild(el("rect", {x, y, width: cw - 1, height: ch - 1, fill}));
    }
    if (c.row.generalised) {
      for (const run of runs(c.members)) {
        const [dow, h0, h1] = run;
        g.appendChild(el("rect", {x: M.l + h0 * cw, y: M.t + (dow - 1) * ch, width: (h1 - h0 + 1) * cw - 1,
                                  height: ch - 1, fill: svg.gen, stroke: "#333", "stroke-width": 1}));
      }
    }
    if (c.row.suppressed) {
      g.classList.add("suppressed");
      title(g, `${rowLabel(report, c.row)}: suppressed (${c.row.suppressed_reason})`);
    } else {
      mark(g, c.row, `${rowLabel(report, c.row)}: ${fmtInt(c.row.events)} events` +
           (c.members.length > 1 ? ` (${fmtNum(c.perCell)} per hour cell)` : ""));
      drawn++;
    }
    svg.appendChild(g);
  }
  const ky = M.t + 7 * ch + 56;
  colorScale(svg, M.l, ky, Math.min(260, W - M.l - 200), max, "events per hour of the week, summed over the range",
             fmtNum, true);
  legend(svg, M.l + Math.min(260, W - M.l - 200) + 44, ky - 1, [
    {name: "suppressed", color: "#eef0f2", hatch: svg.sup},
    {name: "generalised", color: ramp(0.4), hatch: svg.gen},
  ], 170);
  return {svg, drawn};
};

function heatCells(r) {
  // The (day of week, hour) cells a heat-map row covers: its members when generalised,
  // else the hour span its label names ("0-5 (night)"), else its own cell.
  if (Array.isArray(r.members) && r.members.length)
    return r.members.map(m => [Number(m.day_of_week), Number(m.hour)]).filter(([d, h]) => d >= 1 && h >= 0);
  const days = Number.isInteger(r.day_of_week) ? [r.day_of_week] : [1, 2, 3, 4, 5, 6, 7];
  let hours = [r.hour];
  if (!Number.isInteger(r.hour)) {
    const m = /^(\d+)\s*[-\u2013]\s*(\d+)/.exec(String(r.hour));
    hours = m ? Array.from({length: Number(m[2]) - Number(m[1]) + 1}, (_, i) => Number(m[1]) + i) : [];
  }
  return days.flatMap(d => hours.map(h => [d, h]));
}

function runs(cells) {
  // Cells merged into [day, first hour, last hour] runs of consecutive hours.
  const out = [];
  const sorted = [...cells].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  for (const [d, h] of sorted) {
    const last = out[out.length - 1];
    if (last && last[0] === d && last[2] === h - 1) last[2] = h; else out.push([d, h, h]);
  }
  return out;
}

DRAW.programs = (report, rows, ctx) => {
  // Program mix: per category, one 100% bar per model and firmware, a segment per
  // program or mode sized by its share of the bar's events.
  const W = ctx.width, L = 190, R = 86, barH = 18, gap = 5;
  const blocks = new Map();
  for (const r of rows) {
    const cat = String(r.schema || "").split(".")[0] || (ctx.choices.model_category || {})[r.model] || "other";
    if (!blocks.has(cat)) blocks.set(cat, new Map());
    const key = `${r.model}\u0000${r.firmware}`;
    const bars = blocks.get(cat);
    if (!bars.has(key)) bars.set(key, []);
    bars.get(key).push(r);
  }
  // Height first: axis, then per block a title, bars and a legend.
  const layout = [];
  let y = 34;
  for (const [cat, bars] of [...blocks].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
    const totals = new Map();
    for (const rs of bars.values()) for (const r of rs) totals.set(String(r.feature), (totals.get(String(r.feature)) || 0) + r.events);
    // Alphabetical, so programs two categories share (cotton, eco) get one colour.
    const features = [...totals.keys()].sort();
    const keyHeight = legendHeight(features.map(f => ({name: pretty(f)})), W - L - 10);
    layout.push({cat, bars, features, y});
    y += 18 + bars.size * (barH + gap) + keyHeight + 12;
  }
  const svg = frame(W, y + 4);
  const px = share => L + (W - L - R) * share;
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    svg.appendChild(el("line", {x1: px(t), x2: px(t), y1: 26, y2: y - 10, "class": "grid"}));
    svg.appendChild(el("text", {x: px(t), y: 22, "text-anchor": "middle"}, fmtPct(t, 0)));
  }
  svg.appendChild(el("text", {x: L, y: 10, "class": "axis-title"},
                     "share of the bar's events (program or mode chosen), per model and firmware"));
  svg.appendChild(el("text", {x: W - 4, y: 22, "text-anchor": "end", "class": "axis-title"}, "events"));
  let drawn = 0;
  for (const block of layout) {
    let by = block.y;
    svg.appendChild(el("text", {x: 4, y: by + 12, "class": "block-title"}, pretty(block.cat)));
    by += 18;
    const palette = colors(block.features.length);
    const colorOf = f => palette[block.features.indexOf(f) % palette.length];
    for (const rs of [...block.bars.values()].sort((a, b) => (barName(a[0]) < barName(b[0]) ? -1 : 1))) {
      const total = rs.reduce((s, r) => s + r.events, 0);
      const gen = rs.some(r => r.generalised && r.firmware !== undefined && !isFine(r.firmware));
      svg.appendChild(title(el("text", {x: L - 6, y: by + 13, "text-anchor": "end"}, barName(rs[0]) + (gen ? " *" : "")),
                            gen ? "firmware generalised" : barName(rs[0])));
      let x0 = 0;
      for (const r of [...rs].sort((a, b) => block.features.indexOf(String(a.feature)) - block.features.indexOf(String(b.feature)))) {
        const share = total ? r.events / total : 0;
        const g = el("g");
        const x = px(x0), w = Math.max(px(x0 + share) - x, 0.5);
        g.appendChild(el("rect", {x, y: by, width: w, height: barH, fill: colorOf(String(r.feature)),
                                  stroke: "#fff", "stroke-width": 0.6}));
        if (r.generalised) g.appendChild(el("rect", {x, y: by, width: w, height: barH, fill: svg.gen}));
        if (w > 34) g.appendChild(el("text", {x: x + w / 2, y: by + 13, "text-anchor": "middle", "class": "in-bar"},
                                     fmtPct(share, 0)));
        svg.appendChild(mark(g, r, `${barName(r)} · ${pretty(r.feature)}: ${fmtInt(r.events)} events ` +
                             `(${fmtPct(share)} of the bar), ${fmtInt(r.devices)} devices`));
        drawn++;
        x0 += share;
      }
      svg.appendChild(el("text", {x: W - 4, y: by + 13, "text-anchor": "end"}, fmtInt(total)));
      by += barH + gap;
    }
    legend(svg, L, by + 2, block.features.map(f => ({name: pretty(f), color: colorOf(f)})), W - L - 10);
  }
  return {svg, drawn};
};
function barName(r) {
  return `${r.model} · ${r.firmware === null || r.firmware === undefined ? "firmware not recorded" : r.firmware}`;
}
function isFine(v) { return /^[\w.+:/-]+$/.test(String(v)); }

DRAW.errors = (report, rows, ctx) => {
  // Per model, the error codes raised, one bar per firmware version: errors per 1,000
  // device-days of that model and firmware, so versions compare directly.
  const W = ctx.width, L = 120, R = 60, bh = 9;
  const models = new Map();
  for (const r of rows) {
    if (!models.has(r.model)) models.set(r.model, []);
    models.get(r.model).push(r);
  }
  const scale = axisScale(0, Math.max(...rows.map(r => r.per_1000_device_days), 0), 5);
  const max = scale.hi;
  const layout = [];
  let y = 40;
  for (const [model, rs] of [...models].sort((a, b) => (String(a[0]) < String(b[0]) ? -1 : 1))) {
    const firmware = ordered(rs.map(r => r.firmware));
    const codes = new Map();
    for (const r of rs) {
      if (!codes.has(String(r.code))) codes.set(String(r.code), []);
      codes.get(String(r.code)).push(r);
    }
    const codeList = [...codes].sort((a, b) => Math.max(...b[1].map(r => r.per_1000_device_days)) -
                                                  Math.max(...a[1].map(r => r.per_1000_device_days)));
    layout.push({model, firmware, codes: codeList, y});
    y += 20 + codeList.reduce((s, [, cr]) => s + Math.max(firmware.length, 1) * bh + 7, 0) + 20;
  }
  const svg = frame(W, y);
  const px = v => L + (W - L - R) * v / max;
  for (const t of scale.ticks) {
    svg.appendChild(el("line", {x1: px(t), x2: px(t), y1: 32, y2: y - 22, "class": "grid"}));
    svg.appendChild(el("text", {x: px(t), y: 28, "text-anchor": "middle"}, fmtNum(+t.toPrecision(3))));
  }
  svg.appendChild(el("text", {x: L, y: 12, "class": "axis-title"},
                     "errors raised per 1,000 device-days of the same model and firmware (bars: firmware versions)"));
  let drawn = 0;
  for (const block of layout) {
    let by = block.y;
    svg.appendChild(el("text", {x: 4, y: by + 12, "class": "block-title"}, String(block.model)));
    by += 20;
    const colorOf = fw => PALETTE[block.firmware.indexOf(String(fw)) % PALETTE.length];
    for (const [code, cr] of block.codes) {
      svg.appendChild(el("text", {x: L - 8, y: by + block.firmware.length * bh / 2 + 4, "text-anchor": "end"}, code));
      for (const r of cr) {
        const i = block.firmware.indexOf(String(r.firmware));
        const g = el("g"), v = r.per_1000_device_days, yy = by + i * bh;
        g.appendChild(el("rect", {x: L, y: yy, width: Math.max(px(v) - L, 0.5), height: bh - 1, fill: colorOf(r.firmware)}));
        if (r.generalised) g.appendChild(el("rect", {x: L, y: yy, width: Math.max(px(v) - L, 0.5), height: bh - 1, fill: svg.gen}));
        g.appendChild(el("text", {x: px(v) + 4, y: yy + bh - 1, "font-size": 9}, fmtNum(v)));
        svg.appendChild(mark(g, r, `${r.model} ${r.firmware}, ${code}: ${fmtNum(v)} per 1,000 device-days ` +
                             `(${fmtInt(r.errors)} errors, ${fmtInt(r.devices)} devices, ${fmtInt(r.device_days)} device-days)`));
        drawn++;
      }
      by += Math.max(block.firmware.length, 1) * bh + 7;
    }
    legend(svg, L, by + 1, block.firmware.map(fw => ({name: isFine(fw) ? `firmware ${fw}` : `${fw} (generalised)`, color: colorOf(fw)})), W - L - 10);
  }
  return {svg, drawn};
};

function cycleShares(rows) {
  // A row's device-weeks as a share of its category's shown ones; a generalised row
  // whose category is a merged label ("other categories") has no category of its own,
  // so its share is of every shown device-week.
  const totals = new Map();
  let all = 0;
  for (const r of rows.filter(r => !r.suppressed)) {
    totals.set(String(r.category), (totals.get(String(r.category)) || 0) + r.device_weeks);
    all += r.device_weeks;
  }
  const known = new Set(state.ctx.choices.category || []);
  const fine = new Set(rows.filter(r => !r.generalised || known.has(r.category)).map(r => String(r.category)));
  return r => (r.suppressed ? null : r.device_weeks / (fine.has(String(r.category)) ? totals.get(String(r.category)) : all));
}

DRAW.cycles = (report, rows, ctx) => {
  const share = cycleShares(rows);
  return groupedBars(report, rows, {
    width: ctx.width, pct: true, continuous: true, x: r => r.cycles, series: r => r.category, value: share,
    xLabel: String, seriesLabel: pretty,
    xTitle: "cycles per device in a whole Monday-Sunday week (UTC)",
    yTitle: "share of the category's shown device-weeks",
    tip: r => `${pretty(r.category)}, ${r.cycles} cycles: ${fmtInt(r.device_weeks)} device-weeks ` +
              `(${fmtPct(share(r))} of the category's)`,
  });
};

DRAW.cohorts = (report, rows, ctx) => {
  const measure = ctx.measure || "app_share";
  const kind = report.options.by === "tier" ? "membership tier" : "purchase channel";
  // app_share is null where a cohort had no uses at all: drawn as a zero bar.
  return groupedBars(report, rows, {
    width: ctx.width, pct: Boolean(MEASURES[measure].pct), x: r => r.cohort, series: r => r.category,
    value: r => r[measure] || 0, xLabel: pretty, seriesLabel: pretty,
    xTitle: kind, yTitle: measureLabel(measure),
    tip: r => `${pretty(r.cohort)}, ${pretty(r.category)}: ${fmtPct(r.app_share)} of uses from the app or a ` +
              `schedule, ${fmtNum(r.cycles_per_device_week)} cycles per device-week, ${fmtInt(r.devices)} devices`,
  });
};

DRAW.adoption = (report, rows, ctx) => lineChart(report, rows, {
  width: ctx.width, pct: true, x: r => r.week, xLabel: shortDate, seriesLabel: String,
  lines: [
    {name: "remote start (app)", value: r => r.remote_start_share},
    {name: "schedule", value: r => r.schedule_share},
  ],
  measureOf: line => (line.name === "schedule" ? "schedule_share" : "remote_start_share"),
  xTitle: "week from Monday (UTC)", yTitle: "share of the week's devices used",
  tip: r => `week of ${shortDate(r.week)}: ${fmtInt(r.active_devices)} devices used, ` +
            `${fmtPct(r.remote_start_share)} started from the app, ${fmtPct(r.schedule_share)} by a schedule`,
});

DRAW.completeness = (report, rows, ctx) => lineChart(report, rows, {
  width: ctx.width, pct: true, x: r => r.day, xLabel: shortDate, seriesLabel: String,
  lines: [{name: "completeness", series: r => r.model, value: r => r.completeness}],
  measureOf: () => "completeness",
  // Completeness sits near 100%: start the axis just below the lowest value.
  yMin: values => { const least = Math.min(...values, 1); return Math.max(0, least - Math.max(0.02, 0.1 * (1 - least))); },
  xTitle: "day (UTC)", yTitle: "messages received / sent",
  tip: r => `${r.model}, ${shortDate(r.day)}: ${fmtPct(r.completeness)} received ` +
            `(${fmtInt(r.received)} received, ${fmtInt(r.missing)} missing, ${fmtInt(r.device_days)} device-days)`,
});

DRAW.regions = (report, rows, ctx) => {
  // Korea's provinces and metropolitan cities as tiles, coloured by the chosen measure;
  // regions that are not a tile (a generalised "other regions", no region recorded, a
  // code outside Korea) get tiles of their own beside the grid.
  const measure = ctx.measure || "events_per_device";
  const T = 82, G = 4, X0 = 14, Y0 = 6;
  const onTile = new Map(), extra = [];
  for (const r of rows) {
    const t = !r.generalised && TILE_OF.get(r.region);
    if (t && !onTile.has(t.code)) onTile.set(t.code, r); else extra.push(r);
  }
  const memberOf = new Map();  // tile code -> the generalised row holding it
  for (const r of extra)
    for (const m of r.members || []) { const t = TILE_OF.get(m.region); if (t) memberOf.set(t.code, r); }
  const shown = rows.filter(r => !r.suppressed);
  // Hot spots are differences between regions: when every region is within a factor of
  // two, the scale starts near the lowest (its key says where), not at 0.
  const values = shown.map(r => r[measure]);
  const top = Math.max(...values, 0), least = Math.min(...values, top);
  const scale = axisScale(least >= top / 2 && shown.length > 1 ? least : 0, top, 4, measure !== "events_per_device");
  const lo = scale.lo, max = scale.hi;
  const gridW = 5 * (T + G), gridH = 6 * (T + G);
  const W = gridW + 2 * X0, H = Y0 + gridH + 60;
  const svg = frame(W, H);
  let drawn = 0;
  const fmt = v => fmtMeasure(measure, v);
  const tile = (x, y, w, h, r, name, code) => {
    const g = el("g");
    let fill = "#f1f3f5", ink = "#667", value = "no data";
    if (r && r.suppressed) { fill = svg.sup; value = "suppressed"; }
    else if (r) { const t = (r[measure] - lo) / (max - lo); fill = ramp(t); ink = inkOn(t); value = fmt(r[measure]); }
    g.appendChild(el("rect", {x, y, width: w, height: h, rx: 5, fill}));
    if (r && r.generalised) g.appendChild(el("rect", {x, y, width: w, height: h, rx: 5, fill: svg.gen}));
    const held = code && memberOf.get(code);
    if (held) g.appendChild(el("rect", {x: x + 1.5, y: y + 1.5, width: w - 3, height: h - 3, rx: 4, fill: svg.gen,
                                        stroke: "#333", "stroke-dasharray": "4 3"}));
    g.appendChild(el("text", {x: x + 6, y: y + 16, style: `fill:${ink}${name.length > 10 ? ";font-size:10px" : ""}`,
                              "class": "tile-name"}, name));
    if (code) g.appendChild(el("text", {x: x + 6, y: y + 29, style: `fill:${ink}`, "class": "tile-code"}, code));
    g.appendChild(el("text", {x: x + 6, y: y + h - 9, style: `fill:${ink}`, "class": "tile-value"},
                     held && !r ? "merged" : value));
    if (r && !r.suppressed) {
      mark(g, r, `${name}: ${fmtNum(r.events_per_device)} events per device, ${fmtInt(r.events)} events, ` +
                 `${fmtInt(r.cycles)} cycles, ${fmtInt(r.devices)} devices`);
      drawn++;
    } else if (r) {
      g.classList.add("suppressed");
      title(g, `${name}: suppressed (${r.suppressed_reason})`);
    } else {
      title(g, held ? `${name}: merged into "${held.region}" (${held.generalised})` : `${name}: no usage in this view`);
    }
    svg.appendChild(g);
  };
  for (const t of KOREA) {
    const r = onTile.get(t.code) || (t.also || []).map(c => onTile.get(c)).find(Boolean);
    tile(X0 + t.col * (T + G), Y0 + t.row * (T + G), T, T, r, t.name, (r && r.region) || t.code);
  }
  extra.forEach((r, i) => {
    const name = r.region === null || r.region === undefined ? "not recorded" : String(r.region);
    const x = X0 + 2 * (T + G) + (i % 3) * (T + G), y = Y0 + 4 * (T + G) + Math.floor(i / 3) * (T + G);
    tile(x, y, T, T, r, name.length > 13 ? name.slice(0, 12) + "\u2026" : name, TILE_OF.has(r.region) ? r.region : "");
  });
  colorScale(svg, X0, gridH + 28, gridW - 24, max, measureLabel(measure), v => fmt(+v.toPrecision(3)),
             measure !== "events_per_device", lo);
  return {svg, drawn};
};

// Which measures a planner may switch a chart between (the first is the default).
const MEASURE_CHOICES = {
  regions: ["events_per_device", "events", "cycles", "devices"],
  cohorts: ["app_share", "cycles_per_device_week"],
};

function fallback(report, rows, ctx) {
  // A report this page has no drawing of its own for: by its chart description.
  const c = report.chart;
  if (c.kind === "line")
    return lineChart(report, rows, {
      width: ctx.width, pct: Boolean((MEASURES[c.value] || {}).pct), x: r => r[c.x], xLabel: String,
      seriesLabel: String, lines: [{name: measureLabel(c.value), series: c.series ? r => r[c.series] : null,
                                    value: r => r[c.value]}],
      measureOf: () => c.value, xTitle: c.x, yTitle: measureLabel(c.value), tip: r => rowText(report, r),
    });
  return groupedBars(report, rows, {
    width: ctx.width, pct: Boolean((MEASURES[c.value] || {}).pct),
    x: r => (c.label.length ? c.label : [c.x]).map(d => r[d]).join(" "), series: r => (c.series ? r[c.series] : ""),
    value: r => r[c.value], xLabel: String, seriesLabel: v => v || measureLabel(c.value),
    xTitle: (c.label.length ? c.label : [c.x]).join(", "), yTitle: measureLabel(c.value), tip: r => rowText(report, r),
  });
}

// -- the table under each chart ----------------------------------------------------------

function table(report, rows, extra) {
  // Every row of the report, suppressed ones included (named, numbers withheld), with
  // the exact numbers; `extra` adds derived columns ({name, value(row)}).
  const anyGeneralised = rows.some(r => r.generalised);
  const head = html("tr", {},
    ...report.dimensions.map(d => html("th", {}, DIMENSION_LABELS[d] || d)),
    ...report.measures.map(m => html("th", {className: "num", title: `${measureLabel(m)} (${m})`},
                                     (MEASURES[m] || {}).short || measureLabel(m))),
    ...extra.map(x => html("th", {className: "num"}, x.name)),
    anyGeneralised ? html("th", {}, "generalised") : null);
  const body = html("tbody");
  const columns = [...report.dimensions.map(d => r => r[d]), ...report.measures.map(m => r => r[m]),
                   ...extra.map(x => x.sort || (() => null))];
  const trs = rows.map(r => {
    const cells = report.dimensions.map(d => html("td", {}, dimValue(d, r[d])));
    if (r.suppressed) {
      cells.push(html("td", {className: "why", colspan: report.measures.length + extra.length},
                      `suppressed: ${r.suppressed_reason || "below k"}`));
    } else {
      cells.push(...report.measures.map(m => html("td", {className: "num"}, exactMeasure(m, r[m]))));
      cells.push(...extra.map(x => html("td", {className: "num"}, x.value(r))));
    }
    if (anyGeneralised) cells.push(html("td", {className: "note"}, r.generalised || ""));
    const tr = html("tr", {className: r.suppressed ? "suppressed" : r.generalised ? "generalised" : null}, ...cells);
    tr.row = r;
    return tr;
  });
  body.append(...trs);
  // A click on a column's heading sorts by it (again: the other way); suppressed rows,
  // which have no numbers, stay last.
  [...head.children].forEach((th, i) => {
    if (i >= columns.length) return;
    th.addEventListener("click", () => {
      const down = th.getAttribute("aria-sort") === "ascending";
      for (const other of head.children) other.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", down ? "descending" : "ascending");
      const key = columns[i];
      const sorted = [...trs].sort((a, b) => {
        const x = key(a.row), y = key(b.row);
        if (x === null || x === undefined) return y === null || y === undefined ? 0 : 1;
        if (y === null || y === undefined) return -1;
        const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return down ? -c : c;
      });
      body.replaceChildren(...sorted);
    });
  });
  return html("div", {className: "table-wrap"}, html("table", {}, html("thead", {}, head), body));
}

const EXTRA_COLUMNS = {
  programs: rows => {
    const totals = new Map();
    for (const r of rows) if (!r.suppressed) totals.set(barName(r), (totals.get(barName(r)) || 0) + r.events);
    const share = r => (r.suppressed ? null : r.events / totals.get(barName(r)));
    return [{name: "share of model & firmware", value: r => fmtPct(share(r), 2), sort: share}];
  },
  cycles: rows => {
    const share = cycleShares(rows);
    return [{name: "share of category", value: r => fmtPct(share(r), 2), sort: share}];
  },
};

// -- what a view says about itself: suppression, generalisation, empty ranges ----------

function notices(report, ctx) {
  // The notes above a chart: why segments are missing or merged, and buttons that do
  // what would help (widen the range, drop a filter, go to where the data is).
  const out = [];
  const rows = report.rows, k = report.k_anonymity;
  const suppressed = rows.filter(r => r.suppressed).length;
  const generalised = rows.filter(r => r.generalised && !r.suppressed);
  const f = report.filters;
  const active = DIMENSIONS.flatMap(d => (f[d] || []).map(v => [d, v]));
  const spanDays = (Date.parse(f.end) - Date.parse(f.start)) / DAY_MS;
  const actions = [];
  const dataStart = ctx.choices.data_start, dataEnd = ctx.choices.data_end;
  const outside = dataStart && (Date.parse(f.end) <= Date.parse(dataStart) || Date.parse(f.start) >= Date.parse(dataEnd));
  if (outside) actions.push(["Go to the data", {start: day(dataStart), end: day(dataEnd)}]);
  let allData = false;
  if (!outside && dataStart) {
    // Widen backwards, as far as 90 days or the first stored day; offered only where it
    // adds at least half as much again.
    const end = Date.parse(f.end), start = Math.max(end - Math.max(90, 2 * spanDays) * DAY_MS, Date.parse(dataStart));
    if (end - start >= 1.5 * spanDays * DAY_MS)
      actions.push([`Widen to ${Math.round((end - start) / DAY_MS)} days`, {start: day(start), end: f.end}]);
    else allData = Date.parse(f.start) <= Date.parse(dataStart) + DAY_MS;
  }
  for (const [d, v] of active) actions.push([`Drop ${d} ${d === "region" ? regionName(v) : v}`, {drop: [d, v]}]);
  if (active.length > 1) actions.push(["Drop every filter", {dropAll: true}]);
  const population = report.marketing_usable
    ? `This view counts only ${report.population}, so fewer owners reach each segment.` : null;
  if (rows.length === 0) {
    const lines = [outside
      ? `No usage in this range: the stored data covers ${day(dataStart)} to ${lastDay(dataEnd)}.`
      : !dataStart ? "No usage is stored yet: seed data (usagepipe demo or usagepipe simulate) and reload."
      : "No usage matches this range and these filters."];
    if (population && !outside && dataStart) lines.push(population);
    if (report.report === "cycles" && !outside && wholeWeeks(f) === 0)
      lines.push("This report counts whole Monday-to-Sunday weeks (UTC) only, and the range holds none: " +
                 "widen it to cover a whole week.");
    out.push(["warn", lines, actions]);
  } else if (suppressed === rows.length) {
    out.push(["warn", [`Nothing can be shown: each of the ${fmtInt(rows.length)} segments has fewer than ` +
                       `k = ${k} distinct owners, and the report never shows a group that small.`,
                       allData ? `The range already covers nearly all stored usage (from ${day(dataStart)}): ` +
                                 "drop a filter, or wait for more data." :
                                 "More owners per segment: widen the time range or drop a filter.", population]
                       .filter(Boolean), actions]);
  } else if (suppressed > 0) {
    out.push(["info", [`${fmtInt(suppressed)} of ${fmtInt(rows.length)} segments are hidden (fewer than k = ${k} ` +
                       "distinct owners each); they are listed, without numbers, in the table. Widen the range or " +
                       "drop a filter to see more of them."], actions.length ? actions : undefined]);
  }
  if (generalised.length) {
    const why = [...new Set(generalised.map(r => r.generalised))];
    out.push(["info", [`${fmtInt(generalised.length)} segment${generalised.length > 1 ? "s were" : " was"} ` +
                       `generalised so that each reaches k = ${k} owners (hatched in the chart):`], undefined,
              why.slice(0, 6).concat(why.length > 6 ? [`and ${why.length - 6} more (see the table)`] : [])]);
  }
  return out;
}

function wholeWeeks(f) {
  const monday = Date.UTC(1970, 0, 5);
  const start = Date.parse(f.start), end = Date.parse(f.end);
  const first = monday + Math.ceil((start - monday) / (7 * DAY_MS)) * 7 * DAY_MS;
  return Math.max(0, Math.floor((end - first) / (7 * DAY_MS)));
}

function day(t) { return new Date(typeof t === "number" ? t : Date.parse(t)).toISOString().slice(0, 10); }
function lastDay(end) { return day((typeof end === "number" ? end : Date.parse(end)) - 1); }

function noticeNode(kind, lines, actions, items) {
  const node = html("div", {className: `notice ${kind}`, role: kind === "warn" ? "alert" : null});
  for (const line of lines) node.append(html("p", {}, line));
  if (items && items.length) node.append(html("ul", {}, ...items.map(t => html("li", {}, t))));
  if (actions && actions.length) {
    const p = html("p");
    for (const [label, change] of actions) {
      const b = html("button", {type: "button", className: "do"}, label);
      b.addEventListener("click", () => apply(changed(change)));
      p.append(b);
    }
    node.append(p);
  }
  return node;
}

// -- the planner's sign-in -----------------------------------------------------------------

const TOKEN_KEY = "usagepipe.insights.token";
const signIn = {token: null};

function takeToken() {
  // #token=... into sessionStorage, and out of the address bar (other fragment keys stay).
  const fragment = new URLSearchParams(location.hash.slice(1));
  const given = fragment.get("token");
  try {
    if (given) sessionStorage.setItem(TOKEN_KEY, given);
    signIn.token = sessionStorage.getItem(TOKEN_KEY);
  } catch (err) {  // storage turned off: this load only
    signIn.token = given;
  }
  if (fragment.has("token")) {
    fragment.delete("token");
    const rest = fragment.toString();
    history.replaceState(history.state, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
}

function forgetToken() {
  signIn.token = null;
  try { sessionStorage.removeItem(TOKEN_KEY); } catch (err) { /* nothing kept */ }
}

function api(url) {
  // fetch() of this app's API with the planner's token.
  return fetch(url, signIn.token ? {headers: {Authorization: `Bearer ${signIn.token}`}} : {});
}

function refusedSignIn(err) {
  // A 401 or 403 of the API: the whole page says what happened and what to do.
  const had = Boolean(signIn.token);
  if (err.status === 401) forgetToken();
  const local = html("code", {}, "usagepipe auth token --dashboard");
  const lines = err.status === 403
    ? [html("b", {}, "You are signed in, but not as a planner."),
       ` The API says: ${err.message}. Ask for the planner scope on your account, or open the page with a planner's link.`]
    : had
      ? [html("b", {}, "Your sign-in was not accepted."),
         ` The API says: ${err.message}. Open the page again from a new sign-in link (on a local run: `, local, ")."]
      : [html("b", {}, "Sign in to see the usage data."),
         " This page needs a planner's token in its address (it ends in #token=…). Open it from the link your " +
         "sign-in gives you; on a local run, the one ", html("code", {}, "usagepipe insights serve"), " prints, or ",
         local, "."];
  const box = document.getElementById("signin");
  box.replaceChildren(html("p", {}, ...lines));
  box.hidden = false;
  document.getElementById("scope").replaceChildren(html("span", {className: "error-text"},
    err.status === 403 ? "Not a planner's sign-in" : "Not signed in"));
  document.body.dataset.auth = err.reason || (err.status === 403 ? "insufficient_scope" : "unauthenticated");
  document.body.dataset.state = "error";
}

function isSignInProblem(err) { return err && (err.status === 401 || err.status === 403); }

// -- one report card ---------------------------------------------------------------------

function card(spec) {
  const section = html("section", {className: "card" + (WIDE.has(spec.name) ? " wide" : ""), id: spec.name,
                                   "data-report": spec.name, "data-state": "loading"});
  const header = html("header", {}, html("h2", {}, spec.title));
  if (spec.marketing_usable)
    header.append(html("span", {className: "badge", title: "counts only owners active now who consent to analytics " +
                                                           "and marketing"}, "marketing population"));
  const controls = html("span", {className: "controls"});
  if (MEASURE_CHOICES[spec.name]) {
    const select = html("select", {name: `measure-${spec.name}`, "aria-label": "measure"},
      ...MEASURE_CHOICES[spec.name].map(m => html("option", {value: m}, measureLabel(m))));
    select.addEventListener("change", () => redraw(section));
    controls.append("show", select);
  }
  for (const [key, option] of Object.entries(spec.options || {})) {
    if (!option.choices || !option.choices.length) continue;
    const select = html("select", {name: key, "aria-label": option.help},
      ...option.choices.map(c => html("option", {value: c}, key === "by" ? `by ${c}` : c)));
    select.addEventListener("change", () => {
      const params = new URLSearchParams(location.search);
      params.set(key, select.value);
      apply(params);
    });
    controls.append(select);
  }
  const downloads = html("span", {className: "downloads"}, "download ",
    html("a", {className: "csv", href: "#", download: `${spec.name}.csv`}, "CSV"),
    html("a", {className: "parquet", href: "#", download: `${spec.name}.parquet`}, "Parquet"));
  // A plain link would go without the token: fetch the file with it, then save it.
  for (const a of downloads.querySelectorAll("a")) a.addEventListener("click", event => {
    event.preventDefault();
    download(section, a);
  });
  header.append(downloads);
  section.append(header, html("p", {className: "desc"}, spec.description), controls,
                 html("div", {className: "notes"}));
  const body = spec.name === "regions" ? html("div", {className: "split"}) : html("div", {className: "stack"});
  body.append(html("div", {className: "plot"}), html("div", {className: "table-slot"}));
  section.append(body, html("p", {className: "table-caption"}));
  section.spec = spec;
  return section;
}

function reportQuery(spec, params) {
  // The page's filters plus this report's own options (by, tz): never another's.
  const q = new URLSearchParams();
  for (const key of [...RANGE_KEYS, ...DIMENSIONS]) for (const v of params.getAll(key)) q.append(key, v);
  for (const key of Object.keys(spec.options || {})) if (params.has(key)) q.set(key, params.get(key));
  return q;
}

async function drawCard(section, params, ctx, generation) {
  const spec = section.spec;
  const q = reportQuery(spec, params);
  section.dataset.state = "loading";
  let report;
  try {
    const response = await api(`api/reports/${spec.name}?${q}`);
    if (!response.ok) throw await problem(response);
    report = await response.json();
  } catch (err) {
    if (generation !== state.generation) return;
    if (isSignInProblem(err)) refusedSignIn(err);  // the token expired while the page was open
    fail(section, err);
    return;
  }
  if (generation !== state.generation) return;
  section.report = report;
  for (const a of section.querySelectorAll(".downloads a")) {
    const dq = new URLSearchParams(q);
    dq.set("format", a.className);
    a.href = `api/reports/${spec.name}?${dq}`;
  }
  for (const select of section.querySelectorAll(".controls select[name]"))
    if (report.options && report.options[select.name]) select.value = report.options[select.name];
  redraw(section, ctx);
}

async function download(section, link) {
  let response;
  try {
    response = await api(link.href);
    if (!response.ok) throw await problem(response);
  } catch (err) {
    if (isSignInProblem(err)) return refusedSignIn(err);
    section.querySelector(".notes").prepend(noticeNode("bad", [`The download failed: ${err.message}`]));
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const save = html("a", {href: url, download: link.getAttribute("download")});
  document.body.append(save);
  save.click();
  save.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

async function problem(response) {
  // The API's Problem document as an Error with its status and reason.
  let body = {};
  try { body = await response.json(); } catch (err) { /* not JSON: the status says it */ }
  const err = new Error(body.field ? `${body.field}: ${body.detail}` : body.detail || response.statusText ||
                        `HTTP ${response.status}`);
  err.status = response.status;
  err.reason = body.reason;
  return err;
}

function fail(section, err) {
  const message = String(err && err.message ? err.message : err);
  section.querySelector(".notes").replaceChildren(noticeNode("bad", [`This report could not be read: ${message}`]));
  section.querySelector(".plot").replaceChildren();
  section.querySelector(".table-slot").replaceChildren();
  section.dataset.state = "error";
  section.dataset.error = message;
}

function redraw(section, ctx) {
  ctx = ctx || state.ctx;
  const report = section.report, spec = section.spec;
  if (!report) return;
  const rows = report.rows;
  const shown = rows.filter(r => !r.suppressed);
  const plot = section.querySelector(".plot");
  const width = Math.max(360, Math.round(plot.clientWidth || 560));
  const select = section.querySelector(`select[name="measure-${spec.name}"]`);
  const drawCtx = {...ctx, width, measure: select ? select.value : undefined};
  section.querySelector(".notes").replaceChildren(...notices(report, ctx).map(n => noticeNode(...n)));
  let drawn = 0;
  try {
    const kind = DRAW[spec.name] || fallback;
    // The heat map and the tiles also draw suppressed segments (greyed); the others
    // only what may be shown.
    const input = ["heatmap", "regions", "cycles", "cohorts"].includes(spec.name) ? rows : shown;
    if (shown.length || spec.name === "regions") {
      const out = kind(report, input, drawCtx);
      plot.replaceChildren(out.svg);
      drawn = out.drawn;
    } else {
      plot.replaceChildren();
    }
  } catch (err) {
    fail(section, err);
    return;
  }
  const extra = EXTRA_COLUMNS[spec.name] ? EXTRA_COLUMNS[spec.name](rows) : [];
  section.querySelector(".table-slot").replaceChildren(rows.length ? table(report, rows, extra) : "");
  const sup = rows.filter(r => r.suppressed).length, gen = rows.filter(r => r.generalised).length;
  section.querySelector(".table-caption").textContent = rows.length
    ? `${fmtInt(rows.length)} segments: ${fmtInt(shown.length)} shown, ${fmtInt(sup)} suppressed` +
      (gen ? `, ${fmtInt(gen)} generalised` : "") + `. k = ${report.k_anonymity}; source: ${report.source}.`
    : `source: ${report.source}.`;
  Object.assign(section.dataset, {
    state: !rows.length ? "empty" : !shown.length ? "suppressed" : "drawn",
    rendered: String(drawn), rows: String(rows.length), suppressed: String(sup), generalised: String(gen),
    start: report.filters.start, end: report.filters.end, options: new URLSearchParams(report.options).toString(),
  });
  delete section.dataset.error;
}

// -- the filter form and the page's state ------------------------------------------------

const state = {generation: 0, catalogue: null, ctx: {choices: {}}};

function changed(change) {
  // The current query string with one change applied (a new range, a filter dropped).
  const params = new URLSearchParams(location.search);
  if (change.start) params.set("start", change.start);
  if (change.end) params.set("end", change.end);
  if (change.drop) {
    const [d, v] = change.drop;
    const keep = params.getAll(d).filter(x => x !== v);
    params.delete(d);
    for (const x of keep) params.append(d, x);
  }
  if (change.dropAll) for (const d of DIMENSIONS) params.delete(d);
  return params;
}

function apply(params) {
  const query = params.toString();
  history.pushState(null, "", query ? `?${query}` : location.pathname);
  return load();
}

function formParams(form) {
  const params = new URLSearchParams(location.search);
  const from = form.elements.from, through = form.elements.through;
  // A date left as shown keeps the range's exact bounds (the default ends at the
  // current hour, not at midnight).
  if (from.value !== from.dataset.shown) from.value ? params.set("start", from.value) : params.delete("start");
  if (through.value !== through.dataset.shown) {
    if (through.value) params.set("end", day(Date.parse(through.value + "T00:00:00Z") + DAY_MS));
    else params.delete("end");
  }
  for (const d of DIMENSIONS) {
    params.delete(d);
    for (const box of form.querySelectorAll(`details[data-name="${d}"] input:checked`)) params.append(d, box.value);
  }
  return params;
}

function fillForm(params, range, choices) {
  const form = document.getElementById("filters");
  const from = form.elements.from, through = form.elements.through;
  from.value = from.dataset.shown = day(range.start);
  through.value = through.dataset.shown = lastDay(range.end);
  for (const d of DIMENSIONS) {
    const box = form.querySelector(`details[data-name="${d}"]`);
    const picked = params.getAll(d);
    const values = [...new Set([...(choices[d] || []), ...picked])].sort();
    const options = box.querySelector(".options");
    options.replaceChildren(...values.map(v => {
      const input = html("input", {type: "checkbox", name: d, value: v, checked: picked.includes(v)});
      input.addEventListener("change", () => summarise(box));
      const note = d === "model" ? (choices.model_category || {})[v] : d === "region" ? (TILE_OF.get(v) || {}).name : null;
      const missing = !(choices[d] || []).includes(v);
      return html("label", {}, input, d === "category" ? pretty(v) : v,
                  note ? html("small", {}, pretty(note)) : null, missing ? html("small", {}, "(no data in range)") : null);
    }));
    if (!values.length) options.append(html("div", {className: "none"}, "no values in this range"));
    summarise(box);
  }
}

function summarise(box) {
  const picked = [...box.querySelectorAll("input:checked")].map(i => i.value);
  const name = box.dataset.name;
  const label = !picked.length ? "all" : picked.length === 1 ? (name === "region" ? regionName(picked[0]) : pretty(picked[0]))
    : `${picked.length} selected`;
  box.querySelector("summary").replaceChildren(html("span", {className: "name"}, `${name}: `), label);
}

function describeScope(range, params, k) {
  const start = Date.parse(range.start), end = Date.parse(range.end);
  const midnight = t => t % DAY_MS === 0;
  const days = (end - start) / DAY_MS;
  const when = midnight(start) && midnight(end)
    ? `${day(start)} to ${lastDay(end)}`
    : `${new Date(start).toISOString().slice(0, 16).replace("T", " ")} to ${new Date(end).toISOString().slice(0, 16).replace("T", " ")}`;
  const node = html("span", {}, "Showing ", html("b", {className: "range", "data-start": range.start,
                                                        "data-end": range.end}, when),
                    ` UTC (${+days.toFixed(2)} day${days === 1 ? "" : "s"})`);
  for (const d of DIMENSIONS) {
    const vs = params.getAll(d);
    node.append(" \u00b7 ", `${d}: `, vs.length ? html("span", {className: "chip"},
      vs.map(v => (d === "region" ? regionName(v) : d === "category" ? pretty(v) : v)).join(", ")) : "all");
  }
  return node;
}

async function json(url) {
  const response = await api(url);
  if (!response.ok) throw await problem(response);
  return response.json();
}

async function load() {
  const generation = ++state.generation;
  document.body.dataset.state = "loading";
  const params = new URLSearchParams(location.search);
  const scope = document.getElementById("scope");
  const range = new URLSearchParams();
  for (const key of RANGE_KEYS) if (params.has(key)) range.set(key, params.get(key));
  let choices;
  try {
    [state.catalogue, choices] = await Promise.all([
      state.catalogue || json("api/reports"), json(`api/filters?${range}`)]);
  } catch (err) {
    if (generation !== state.generation) return;
    if (isSignInProblem(err)) return refusedSignIn(err);
    const what = err.status === 422 ? "These filters cannot be used" : "The usage data cannot be read";
    scope.replaceChildren(html("span", {className: "error-text"}, `${what}: ${err.message}`), " ",
                          err.status === 422 ? html("a", {href: location.pathname}, "Start over") : "");
    document.body.dataset.state = "error";
    return;
  }
  if (generation !== state.generation) return;
  state.ctx = {choices};
  fillForm(params, choices, choices);
  scope.replaceChildren(describeScope(choices, params));
  document.getElementById("data-extent").textContent = choices.data_start
    ? `Stored usage covers ${day(choices.data_start)} to ${lastDay(choices.data_end)} (UTC).`
    : "No usage is stored yet.";
  const cards = document.getElementById("cards");
  if (!cards.children.length) {
    const specs = [...state.catalogue].sort((a, b) => rank(a.name) - rank(b.name));
    cards.replaceChildren(...specs.map(card));
  }
  await Promise.all([...cards.children].map(s => drawCard(s, params, state.ctx, generation)));
  if (generation !== state.generation || document.body.dataset.auth) return;
  const k = [...cards.children].map(s => s.report && s.report.k_anonymity).find(Boolean);
  document.getElementById("privacy").textContent =
    `Privacy: a segment with fewer than k = ${k} distinct owners is never shown (suppressed, or merged with others ` +
    "into a generalised segment that reaches k). Marketing-usable views count only owners active now who consent " +
    "to analytics and marketing. No view shows a device or a person.";
  document.body.dataset.query = reportQuery({options: {}}, params).toString();
  document.body.dataset.state = "ready";
}

function rank(name) { const i = ORDER.indexOf(name); return i < 0 ? ORDER.length : i; }

function quickRange(days) {
  const c = state.ctx.choices;
  const params = new URLSearchParams(location.search);
  if (!c.data_end) return;
  const end = Date.parse(c.data_end);
  const start = days === "all" ? Date.parse(c.data_start) : end - Number(days) * DAY_MS;
  params.set("start", day(start));
  params.set("end", day(end));
  apply(params);
}

function main() {
  takeToken();
  const form = document.getElementById("filters");
  form.addEventListener("submit", event => {
    event.preventDefault();
    for (const d of form.querySelectorAll("details[open]")) d.open = false;
    apply(formParams(form));
  });
  document.getElementById("reset").addEventListener("click", () => apply(new URLSearchParams()));
  for (const b of document.querySelectorAll("#quick button"))
    b.addEventListener("click", () => quickRange(b.dataset.days));
  // One drop-down open at a time; a click elsewhere closes it.
  document.addEventListener("click", event => {
    for (const d of form.querySelectorAll("details.multi[open]")) if (!d.contains(event.target)) d.open = false;
  });
  window.addEventListener("popstate", load);
  let resize;
  window.addEventListener("resize", () => {
    clearTimeout(resize);
    resize = setTimeout(() => { for (const s of document.querySelectorAll("section.card")) redraw(s); }, 200);
  });
  load();
}
main();
