// Small DOM helpers shared by the pages. Text always goes in through
// textContent (never innerHTML), so any dataset or model output, Chinese or
// markup-looking, is shown as written.

export function h(tag, attrs = {}, ...children) {
  const [name, ...classes] = tag.split(".");
  const el = document.createElement(name || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = [el.className, v].filter(Boolean).join(" ");
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, v);
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

// ---- the banner: one place for errors and notices ---------------------------

let bannerTimer = null;
export function banner(message, kind = "error", { sticky = kind === "error" } = {}) {
  const el = document.getElementById("banner");
  clearTimeout(bannerTimer);
  if (!message) { el.hidden = true; el.replaceChildren(); return; }
  el.className = `banner ${kind}`;
  el.hidden = false;
  el.setAttribute("role", kind === "error" ? "alert" : "status");
  clear(el, h("span.banner-text", {}, message),
    h("button.banner-close", { type: "button", title: "Dismiss", "aria-label": "Dismiss", onclick: () => banner(null) }, "×"));
  if (!sticky) bannerTimer = setTimeout(() => banner(null), 4000);
}

// A notice for the page about to be shown (a route change clears the banner).
let pending = null;
export function flash(message, kind = "info") { pending = [message, kind]; }
export function takeFlash() {
  const p = pending;
  pending = null;
  if (p) banner(p[0], p[1]);
  else banner(null);
}

export function showError(err, context = "") {
  const msg = err && err.message ? err.message : String(err);
  const where = err && err.param ? ` (${err.param})` : "";
  banner(`${context ? context + ": " : ""}${msg}${where}`, "error");
}

// Runs an async action for a button: disables it meanwhile and reports failures.
export async function busy(button, fn, context) {
  if (button) button.disabled = true;
  try {
    return await fn();
  } catch (err) {
    if (err && err.name === "AbortError") return undefined;
    showError(err, context);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

// ---- formatting --------------------------------------------------------------

export function fmtTime(ts) {
  if (!ts) return "—";
  const d = new Date(ts * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtDuration(sec) {
  if (sec === null || sec === undefined || !isFinite(sec)) return "—";
  sec = Math.max(0, Math.round(sec));
  if (sec < 60) return `${sec} s`;
  const m = Math.floor(sec / 60), r = sec % 60;
  if (m < 60) return `${m} min ${r} s`;
  const hr = Math.floor(m / 60);
  return `${hr} h ${m % 60} min`;
}

export function fmtNum(n, digits = 4) {
  if (n === null || n === undefined) return "—";
  if (typeof n !== "number") return String(n);
  if (Number.isInteger(n)) return n.toLocaleString("en-US");
  const a = Math.abs(n);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return n.toExponential(2);
  return Number(n.toFixed(digits)).toString();
}

export function fmtBytes(b) {
  if (b === null || b === undefined) return "—";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${i ? b.toFixed(1) : b} ${units[i]}`;
}

export function statusBadge(status) {
  return h(`span.badge.status-${status || "unknown"}`, {}, status || "unknown");
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// An <input> with a <datalist> of model ids: pick one, or type a name.
let listCounter = 0;
export function modelInput(models, attrs = {}) {
  const id = `models-${++listCounter}`;
  const list = h("datalist", { id }, models.map((m) => h("option", { value: m.id }, modelLabel(m))));
  const input = h("input", { type: "text", list: id, autocomplete: "off", spellcheck: "false", ...attrs });
  return { input, list, wrap: h("span.model-input", {}, input, list) };
}

export function modelLabel(m) {
  if (m.kind === "fine-tuned") return `fine-tuned from ${m.parent || "?"}`;
  if (m.kind === "checkpoint") return `checkpoint, step ${m.step}`;
  return "base model";
}

export function field(label, control, help) {
  return h("label.field", {}, h("span.field-label", {}, label), control, help ? h("span.help", {}, help) : null);
}

export function table(headers, rows, { empty = "Nothing here yet." } = {}) {
  if (!rows.length) return h("p.empty", {}, empty);
  return h("div.table-wrap", {},
    h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
      h("tbody", {}, rows)));
}

export function card(title, ...children) {
  return h("section.card", {}, title ? h("h2", {}, title) : null, ...children);
}

export function kv(pairs) {
  return h("dl.kv", {}, pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v === undefined || v === null ? "—" : v)]));
}

// Copies text; falls back to a selected textarea where the async clipboard API
// is unavailable (plain http on a non-loopback host is not a secure context).
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const ta = h("textarea", { style: { position: "fixed", left: "-9999px" } }, text);
    document.body.append(ta);
    ta.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    ta.remove();
    return ok;
  }
}

export function navigate(hash) {
  if (location.hash === hash) window.dispatchEvent(new HashChangeEvent("hashchange"));
  else location.hash = hash;
}

// Polls fn every `ms` until stop() or until the page changes; errors go to the
// banner once and polling continues (the server may come back).
// Polls fn every `ms` (measured from the start of each call, so a slow answer
// does not stretch the period) until stop() or until the page changes; errors go
// to the banner once and polling continues (the server may come back).
export function poller(fn, ms, isActive) {
  let timer = null, stopped = false, failing = false, running = false;
  const tick = async () => {
    if (stopped || running || !isActive()) return;
    running = true;
    clearTimeout(timer);
    const started = performance.now();
    try {
      await fn();
      if (failing) { failing = false; banner(null); }
    } catch (err) {
      if (!failing) showError(err);
      failing = true;
    } finally {
      running = false;
    }
    if (!stopped && isActive()) timer = setTimeout(tick, Math.max(50, ms - (performance.now() - started)));
  };
  timer = setTimeout(tick, ms);
  return { stop() { stopped = true; clearTimeout(timer); }, now() { clearTimeout(timer); tick(); } };
}
