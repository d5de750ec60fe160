// The console shell: hash routing, the API-key setting, the server status dot.
// Each page is a module exporting render(root, ctx) that only calls the HTTP API.

import { get, getKey, setKey } from "./api.js";
import { banner, clear, h, showError, takeFlash } from "./ui.js";
import * as datasets from "./datasets.js";
import * as newjob from "./newjob.js";
import * as jobs from "./jobs.js";
import * as compare from "./compare.js";
import * as playground from "./playground.js";
import * as models from "./models.js";
import * as fleet from "./fleet.js";

const PAGES = [
  { path: "datasets", title: "Datasets", module: datasets },
  { path: "new", title: "New job", module: newjob },
  { path: "jobs", title: "Jobs", module: jobs },
  { path: "compare", title: "Compare", module: compare },
  { path: "playground", title: "Playground", module: playground },
  { path: "models", title: "Models & keys", module: models },
  { path: "fleet", title: "Fleet", module: fleet },
];

let current = { token: 0, cleanup: null };

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [pathPart, queryPart = ""] = raw.split("?");
  const parts = pathPart.split("/").filter(Boolean).map(decodeURIComponent);
  const query = Object.fromEntries(new URLSearchParams(queryPart));
  return { page: parts[0] || "jobs", args: parts.slice(1), query };
}

async function route() {
  const { page, args, query } = parseHash();
  const entry = PAGES.find((p) => p.path === page) || PAGES[2];
  if (current.cleanup) { try { current.cleanup(); } catch { /* ignore */ } }
  const token = ++current.token;
  current.cleanup = null;
  for (const a of document.querySelectorAll("nav.tabs a")) {
    a.classList.toggle("active", a.dataset.page === entry.path);
    if (a.dataset.page === entry.path) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  document.title = `${entry.title} · openft`;
  const root = document.getElementById("page");
  clear(root, h("p.loading", {}, "Loading…"));
  takeFlash();
  const ctx = {
    args, query,
    active: () => current.token === token,
    onLeave: (fn) => { if (current.token === token) current.cleanup = fn; },
  };
  try {
    await entry.module.render(root, ctx);
  } catch (err) {
    if (current.token !== token) return;
    clear(root, h("p.empty", {}, "This page could not be loaded."));
    showError(err);
  }
}

function keyDialog() {
  const dialog = document.getElementById("key-dialog");
  const input = dialog.querySelector("input");
  input.value = getKey();
  dialog.showModal();
}

function setupKey() {
  const dialog = document.getElementById("key-dialog");
  const input = dialog.querySelector("input");
  document.getElementById("key-button").addEventListener("click", keyDialog);
  dialog.querySelector("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const action = ev.submitter ? ev.submitter.value : "save";
    if (action === "save") setKey(input.value.trim());
    else if (action === "forget") setKey("");
    dialog.close();
    updateKeyButton();
    if (action !== "cancel") route();
  });
  updateKeyButton();
}

function updateKeyButton() {
  const btn = document.getElementById("key-button");
  const key = getKey();
  btn.textContent = key ? `API key …${key.slice(-4)}` : "API key";
  btn.classList.toggle("has-key", !!key);
}

// The status dot: /health every 10 s; a banner when the server stops answering.
let wasDown = false;
async function health() {
  const dot = document.getElementById("health");
  try {
    const r = await get("/health");
    dot.className = "health ok";
    dot.title = `openft ${r.version} · worker ${r.worker_pid ? "running" : "not running"}`;
    dot.textContent = r.worker_pid ? "online" : "online · no worker";
    if (wasDown) banner("The server is reachable again.", "info");
    wasDown = false;
  } catch (err) {
    dot.className = "health down";
    dot.textContent = "offline";
    dot.title = err.message;
    if (!wasDown) showError(err);
    wasDown = true;
  }
}

function setupNav() {
  const nav = document.querySelector("nav.tabs");
  clear(nav, PAGES.map((p) => h("a", { href: `#/${p.path}`, dataset: { page: p.path } }, p.title)));
}

window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (ev) => showError(ev.reason));
setupNav();
setupKey();
route();
health();
setInterval(health, 10000);
