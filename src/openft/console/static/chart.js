// Charts drawn as plain SVG: the loss and reward curves of a job and a bar histogram.
// No library: a few scales and paths are all these need.

import { h, s } from "./ui.js";

const W = 760, H = 280;
const PAD = { left: 52, right: 16, top: 14, bottom: 34 };

function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function label(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-2 || a >= 1e5)) return v.toExponential(1);
  return Number(v.toPrecision(4)).toString();
}

// A live chart of some series against the step. Each series {key, label, short, dots}
// is a path of class `key` (and, with dots, a g.`key`-dots of circles);
// update({[key]: [[step, y]...], ..., totalSteps}) redraws it. The first series is
// the one the hover follows. `floorZero`: the y axis never goes below 0 (a loss);
// otherwise a y range spanning 0 gets a zero line (rewards go negative).
function lineChart({ cls, aria, series, floorZero = false }) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: `line-chart ${cls}`, role: "img", "aria-label": aria });
  const grid = s("g", { class: "grid" }), axes = s("g", { class: "axes" });
  const paths = {}, dots = {};
  const layers = [];
  for (const sr of series) {
    paths[sr.key] = s("path", { class: sr.key, d: "" });
    layers.push(paths[sr.key]);
    if (sr.dots) { dots[sr.key] = s("g", { class: `${sr.key}-dots` }); layers.push(dots[sr.key]); }
  }
  const zero = s("line", { class: "zero", x1: PAD.left, x2: W - PAD.right, visibility: "hidden" });
  const cross = s("g", { class: "cross", visibility: "hidden" }, s("line", { y1: PAD.top, y2: H - PAD.bottom }), s("text", { y: PAD.top + 12 }));
  const empty = s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty-note" }, "waiting for the first step…");
  svg.append(grid, axes, zero, ...layers, cross, empty);
  const legend = h("div.legend", {}, series.map((sr) => h(`span.key.${sr.key}`, {}, sr.label)));
  const wrap = h("div.chart", {}, svg, legend);
  let state = { totalSteps: 0 }, sx = null, sy = null;
  const points = (key) => state[key] || [];

  function update(next) {
    state = next;
    const all = series.flatMap((sr) => points(sr.key)).filter(([, y]) => Number.isFinite(y));
    empty.setAttribute("visibility", all.length ? "hidden" : "visible");
    if (!all.length) {
      for (const sr of series) { paths[sr.key].setAttribute("d", ""); paths[sr.key].dataset.points = "0"; }
      for (const g of Object.values(dots)) g.replaceChildren();
      zero.setAttribute("visibility", "hidden");
      return;
    }
    const maxStep = Math.max(state.totalSteps || 0, ...all.map(([x]) => x), 1);
    let lo = Math.min(...all.map(([, y]) => y)), hi = Math.max(...all.map(([, y]) => y));
    const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
    lo -= pad; hi += pad;
    if (floorZero) lo = Math.max(0, lo);
    sx = (x) => PAD.left + (x / maxStep) * (W - PAD.left - PAD.right);
    sy = (y) => PAD.top + (1 - (y - lo) / (hi - lo)) * (H - PAD.top - PAD.bottom);
    grid.replaceChildren(), axes.replaceChildren();
    for (const t of niceTicks(lo, hi, 4)) {
      if (t < lo || t > hi) continue;
      grid.append(s("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t) }));
      axes.append(s("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end" }, label(t)));
    }
    for (const t of niceTicks(0, maxStep, 6)) {
      if (t > maxStep || !Number.isInteger(t)) continue;
      axes.append(s("text", { x: sx(t), y: H - PAD.bottom + 16, "text-anchor": "middle" }, String(t)));
    }
    axes.append(s("line", { x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom }));
    axes.append(s("text", { x: W - PAD.right, y: H - 4, "text-anchor": "end", class: "axis-title" }, "step"));
    const showZero = !floorZero && lo < 0 && hi > 0;
    zero.setAttribute("visibility", showZero ? "visible" : "hidden");
    if (showZero) { zero.setAttribute("y1", sy(0)); zero.setAttribute("y2", sy(0)); }
    const path = (pts) => pts.filter(([, y]) => Number.isFinite(y))
      .map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    for (const sr of series) {
      paths[sr.key].setAttribute("d", path(points(sr.key)));
      paths[sr.key].dataset.points = String(points(sr.key).length);
      if (sr.dots) {
        // A point's third element flags it (a checkpoint scoring below the base model).
        dots[sr.key].replaceChildren(...points(sr.key).filter(([, y]) => Number.isFinite(y)).map(([x, y, flag]) =>
          s("circle", { cx: sx(x), cy: sy(y), r: flag ? 4.5 : 3, class: flag ? "flagged" : null },
            s("title", {}, `step ${x}: ${sr.label} ${label(y)}${flag ? ` (${sr.flag})` : ""}`))));
      }
    }
  }

  // Hover: the nearest step of the first series, with every series' value there.
  svg.addEventListener("mousemove", (ev) => {
    const lead = points(series[0].key);
    if (!sx || !lead.length) return;
    const box = svg.getBoundingClientRect();
    const x = ((ev.clientX - box.left) / box.width) * W;
    let best = lead[0];
    for (const p of lead) if (Math.abs(sx(p[0]) - x) < Math.abs(sx(best[0]) - x)) best = p;
    const values = series.map((sr) => {
      const p = points(sr.key).find((q) => q[0] === best[0]);
      return p && Number.isFinite(p[1]) ? `${sr.short} ${label(p[1])}` : null;
    }).filter(Boolean);
    const [line, text] = cross.children;
    line.setAttribute("x1", sx(best[0])); line.setAttribute("x2", sx(best[0]));
    const right = sx(best[0]) > W * 0.6;
    text.setAttribute("x", sx(best[0]) + (right ? -6 : 6));
    text.setAttribute("text-anchor", right ? "end" : "start");
    text.textContent = `step ${best[0]}: ${values.join(", ")}`;
    cross.setAttribute("visibility", "visible");
  });
  svg.addEventListener("mouseleave", () => cross.setAttribute("visibility", "hidden"));
  return { el: wrap, update };
}

// A live chart of training and validation loss against the step.
// update({train: [[step, loss]...], valid: [[step, loss]...], totalSteps}) redraws it.
export function lossChart() {
  return lineChart({
    cls: "loss-chart", aria: "Loss by step", floorZero: true,
    series: [
      { key: "train", label: "training loss", short: "train" },
      { key: "valid", label: "validation loss", short: "valid", dots: true },
    ],
  });
}

// A DPO job's rewards against the step: the preferred (chosen) and the rejected
// answer's reward, their margin, and the validation margin at validation steps.
// update({chosen, rejected, margin, valid: [[step, reward]...], totalSteps}) redraws it.
export function rewardChart() {
  return lineChart({
    cls: "reward-chart", aria: "Rewards by step",
    series: [
      { key: "chosen", label: "chosen reward", short: "chosen" },
      { key: "rejected", label: "rejected reward", short: "rejected" },
      { key: "margin", label: "reward margin", short: "margin" },
      { key: "valid", label: "validation margin", short: "valid margin", dots: true },
    ],
  });
}

// A job's eval score at each checkpoint against the base model's (a flat line);
// a checkpoint below the base is a larger dot of class `flagged`.
// update({score: [[step, score, below]...], base: [[0, b], [last, b]], totalSteps}) redraws it.
export function scoreChart() {
  return lineChart({
    cls: "score-chart", aria: "Eval score by checkpoint",
    series: [
      { key: "score", label: "checkpoint eval score", short: "score", dots: true, flag: "below the base model" },
      { key: "base", label: "base model", short: "base" },
    ],
  });
}

// Bars for a histogram: edges has one more entry than counts.
export function barChart(edges, counts, { xLabel = "", yLabel = "", marker = null } = {}) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "bar-chart", role: "img", "aria-label": `${yLabel} by ${xLabel}` });
  const top = Math.max(1, ...counts);
  const lo = edges[0], hi = edges[edges.length - 1];
  const sx = (x) => PAD.left + ((x - lo) / (hi - lo || 1)) * (W - PAD.left - PAD.right);
  const sy = (y) => PAD.top + (1 - y / top) * (H - PAD.top - PAD.bottom);
  for (const t of niceTicks(0, top, 4)) {
    if (!Number.isInteger(t)) continue;
    svg.append(s("line", { class: "gridline", x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t) }),
      s("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end" }, String(t)));
  }
  counts.forEach((c, i) => {
    const x0 = sx(edges[i]), x1 = sx(edges[i + 1]);
    svg.append(s("rect", { class: "bar", x: x0 + 1, y: sy(c), width: Math.max(1, x1 - x0 - 2), height: sy(0) - sy(c) },
      s("title", {}, `${edges[i]}–${edges[i + 1]} tokens: ${c} example(s)`)));
  });
  const every = Math.ceil(edges.length / 7);
  edges.forEach((e, i) => {
    if (i % every === 0 || i === edges.length - 1) svg.append(s("text", { x: sx(e), y: H - PAD.bottom + 16, "text-anchor": "middle" }, String(e)));
  });
  if (marker && marker > lo && marker < hi) {
    svg.append(s("line", { class: "marker", x1: sx(marker), x2: sx(marker), y1: PAD.top, y2: H - PAD.bottom }),
      s("text", { class: "marker-label", x: sx(marker) - 4, y: PAD.top + 10, "text-anchor": "end" }, `max length ${marker}`));
  }
  svg.append(s("line", { class: "axisline", x1: PAD.left, x2: W - PAD.right, y1: sy(0), y2: sy(0) }),
    s("text", { x: W - PAD.right, y: H - 4, "text-anchor": "end", class: "axis-title" }, xLabel));
  return svg;
}
