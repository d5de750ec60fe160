// Fleet: the job store, the API replicas and workers sharing it (GET /v1/fleet),
// what each runs and when each last reported. Refreshed every few seconds.

import { enc, get } from "./api.js";
import { busy, card, clear, fmtDuration, fmtNum, h, kv, poller, table } from "./ui.js";

const POLL_MS = 5000;  // members stamp their heartbeat about this often

export async function render(root, ctx) {
  const storeBox = h("div");
  const replicasBox = h("div");
  const workersBox = h("div");
  const refreshBtn = h("button", { type: "button" }, "Refresh");
  clear(root, h("div.title-row", {}, h("h1", {}, "Fleet"), refreshBtn),
    card("Job store", storeBox),
    card("API replicas", replicasBox),
    card("Workers", workersBox,
      h("p.help", {}, "A worker that stops reporting is shown as lost; one that ended cleanly, as stopped.")));
  const refresh = async () => {
    const fleet = await get("/v1/fleet");
    if (!ctx.active()) return;
    clear(storeBox, storeDetails(fleet));
    clear(replicasBox, alive(fleet.replicas), replicasTable(fleet.replicas));
    clear(workersBox, alive(fleet.workers), workersTable(fleet.workers));
  };
  await refresh();
  if (!ctx.active()) return;
  const p = poller(refresh, POLL_MS, ctx.active);
  ctx.onLeave(() => p.stop());
  refreshBtn.addEventListener("click", () => busy(refreshBtn, refresh, "Could not load the fleet"));
}

function storeDetails(fleet) {
  const store = fleet.store || {}, jobs = fleet.jobs || {};
  return kv([
    ["Database", store.dialect],
    ["URL", store.url ? h("code", {}, store.url) : null],
    ["Queued jobs", fmtNum(jobs.queued ?? null)],
    ["Running jobs", fmtNum(jobs.running ?? null)],
  ]);
}

function alive(members) {
  if (!members.length) return null;
  return h("p.fleet-count", {}, `${members.filter((m) => m.state === "alive").length} alive of ${members.length}`);
}

const stateBadge = (state) => h(`span.badge.fleet-${state || "unknown"}`, {}, state || "unknown");
const heartbeat = (m) => `${fmtDuration(m.heartbeat_age_s)} ago`;

function replicasTable(replicas) {
  const rows = replicas.map((m) => h(`tr.fleet-${m.state}`, { dataset: { member: m.id } },
    h("td.wrap", {}, h("code", {}, m.id)),
    h("td.wrap", {}, m.host),
    h("td.num", {}, m.pid),
    h("td.wrap", {}, m.address || "—"),
    h("td", {}, stateBadge(m.state)),
    h("td", {}, heartbeat(m))));
  return table(["Replica", "Host", "PID", "Address", "State", "Heartbeat"], rows,
    { empty: "No API replica has reported." });
}

// The same words as `openft status`.
function capabilities(c) {
  if (!c) return "—";
  return `${c.cpus ?? "?"} cpus, ${c.gpus ?? 0} gpus, up to ${c.max_ranks ?? "?"} ranks`;
}

function runs(m) {
  const job = m.job;
  if (job && job.id) {
    return [h("a", { href: `#/jobs/${enc(job.id)}` }, job.id),
      h("div.sub", {}, `${job.model || "?"} · ${job.ranks === 1 ? "1 rank" : `${job.ranks} ranks`}`)];
  }
  if (job) return h("span.other-job", {}, "another owner's job");  // named only to its owner
  return h("span.idle", {}, m.state === "stopped" ? "—" : "idle");
}

function workersTable(workers) {
  const rows = workers.map((m) => h(`tr.fleet-${m.state}`, { dataset: { member: m.id } },
    h("td.wrap", {}, h("code", {}, m.id)),
    h("td.wrap", {}, m.host),
    h("td.num", {}, m.pid),
    h("td", {}, capabilities(m.capabilities)),
    h("td", {}, stateBadge(m.state)),
    h("td", {}, heartbeat(m)),
    h("td.runs", {}, runs(m))));
  return table(["Worker", "Host", "PID", "Capabilities", "State", "Heartbeat", "Running"], rows,
    { empty: "No worker has reported. Start one with 'openft worker', or 'openft serve' without --no-worker." });
}
