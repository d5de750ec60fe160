// Jobs: the list, and a job page that follows a run live: progress and ETA, the
// loss chart (and a DPO job's reward chart), events, checkpoints, and cancel /
// pause / resume / clone.

import { enc, get, listAll, post } from "./api.js";
import { lossChart, rewardChart, scoreChart } from "./chart.js";
import {
  TERMINAL, busy, card, clear, fmtDuration, fmtNum, fmtTime, h, kv, poller, statusBadge, table,
} from "./ui.js";

const POLL_MS = 1000;

// Chat and comparisons take every model name (built-in, registered, fine-tuned);
// a job from before bases were names may hold a server path (it has a "/"), not served.
const callable = (model) => !!model && !model.includes("/");
// A job's `resources`: what it asked for, or what its worker runs it on once started.
const ranks = (resources) => {
  const n = (resources && resources.nproc_per_node) || 1;
  return n === 1 ? "1 rank" : `${n} ranks`;
};
// A job's `method` as the API returns it: {type, [type]: {hyperparameters}}.
const isDpo = (job) => !!job.method && job.method.type === "dpo";
const methodLabel = (job) => {
  if (!isDpo(job)) return "Supervised";
  const hp = (job.method.dpo && job.method.dpo.hyperparameters) || {};
  const beta = hp.beta === undefined || hp.beta === null || hp.beta === "auto" ? "auto (0.1)" : fmtNum(hp.beta);
  return `DPO (preference pairs), beta ${beta}`;
};
const pct = (v) => (v === undefined || v === null ? "—" : `${(v * 100).toFixed(1)}%`);

export async function render(root, ctx) {
  if (ctx.args[0]) return renderJob(root, ctx, ctx.args[0]);
  const list = h("div");
  clear(root, h("div.title-row", {}, h("h1", {}, "Fine-tuning jobs"), h("a.button.primary", { href: "#/new" }, "New job")),
    card(null, list));
  const refresh = async () => {
    const jobs = (await get("/v1/fine_tuning/jobs?limit=100")).data;
    if (!ctx.active()) return;
    clear(list, jobsTable(jobs));
    return jobs;
  };
  const jobs = await refresh();
  // Keep the list fresh while something is still moving.
  if (jobs && jobs.some((j) => !TERMINAL.has(j.status))) {
    const p = poller(refresh, 2000, ctx.active);
    ctx.onLeave(() => p.stop());
  }
}

function jobsTable(jobs) {
  const rows = jobs.map((j) => h("tr", { dataset: { job: j.id } },
    h("td", {}, h("a", { href: `#/jobs/${enc(j.id)}` }, j.id), j.suffix ? h("div.sub", {}, j.suffix) : null),
    h("td", {}, statusBadge(j.status)),
    h("td.wrap", {}, j.model),
    h("td.wrap", {}, j.fine_tuned_model || "—"),
    h("td", {}, fmtTime(j.created_at)),
    h("td.num", {}, j.trained_tokens ? fmtNum(j.trained_tokens) : "—")));
  return table(["Job", "Status", "Base model", "Fine-tuned model", "Created", "Trained tokens"], rows,
    { empty: "No jobs yet. Start one from New job." });
}

// ---- one job -----------------------------------------------------------------

async function renderJob(root, ctx, id) {
  let job = await get(`/v1/fine_tuning/jobs/${enc(id)}`);
  let events = await listAll(`/v1/fine_tuning/jobs/${enc(id)}/events`, { order: "asc", limit: 1000 });
  if (!ctx.active()) return;

  const header = h("div.title-row");
  const actions = h("div.row.actions");
  const progress = h("div.progress-card");
  const details = h("div");
  const chart = lossChart();
  const dpo = isDpo(job);
  const rewards = dpo ? rewardChart() : null;
  const rewardLine = h("p.reward-line", { "aria-live": "polite" });
  // A job with questions scores the base model and every checkpoint on them.
  const scores = job.questions_file ? scoreChart() : null;
  const scoreLine = h("p.score-line", { "aria-live": "polite" });
  const ckptBox = h("div");
  const showMetrics = h("input", { type: "checkbox", checked: true });
  const log = h("ol.events", { reversed: true });
  showMetrics.addEventListener("change", () => log.classList.toggle("hide-metrics", !showMetrics.checked));

  clear(root, h("p.crumbs", {}, h("a", { href: "#/jobs" }, "Jobs"), " / ", id), header, actions,
    card("Progress", progress),
    card("Loss", chart.el),
    dpo ? card("Rewards", rewards.el, rewardLine) : null,
    scores ? card("Checkpoint scores", scores.el, scoreLine) : null,
    card("Checkpoints", ckptBox),
    card("Events", h("label.check", {}, showMetrics, " show step metrics"), h("div.log-wrap", {}, log)),
    card("Details", details));

  const metricRows = () => events.filter((e) => e.type === "metrics" && e.data && e.data.step !== undefined);
  const totalSteps = () => {
    for (let i = events.length - 1; i >= 0; i--) {
      const d = events[i].data || {};
      if (d.total_steps) return d.total_steps;
    }
    return null;
  };

  const drawHeader = () => {
    clear(header, h("h1", {}, job.suffix ? `${job.suffix} · ` : "", job.id, " ", statusBadge(job.status),
      h("span.method-tag", {}, methodLabel(job))));
    const act = (label, path, enabled, cls = "") => {
      const b = h(`button${cls}`, { type: "button", disabled: !enabled }, label);
      b.addEventListener("click", () => busy(b, async () => {
        job = await post(`/v1/fine_tuning/jobs/${enc(id)}/${path}`, {});
        drawAll();
        p.now();
      }, `${label} failed`));
      return b;
    };
    const running = job.status === "running", waiting = ["validating_files", "queued"].includes(job.status);
    clear(actions,
      act("Pause", "pause", running || waiting),
      act("Resume", "resume", job.status === "paused"),
      act("Cancel", "cancel", !TERMINAL.has(job.status), ".danger"),
      h("a.button", { href: `#/new?from=${enc(id)}` }, "Clone with changes"),
      job.has_comparison ? h("a.button", { href: `#/compare/${enc(id)}` }, "Comparison") : null,
      job.fine_tuned_model ? h("a.button.primary", { href: `#/playground?model=${enc(job.fine_tuned_model)}${callable(job.model) ? `&model2=${enc(job.model)}` : ""}` }, "Chat with it") : null);
  };

  const drawProgress = () => {
    const rows = metricRows();
    const last = rows.length ? rows[rows.length - 1].data : null;
    const total = totalSteps();
    const step = last ? last.step : 0;
    const done = job.status === "succeeded";
    const frac = done ? 1 : total ? Math.min(1, step / total) : 0;
    const lastValid = [...rows].reverse().find((e) => e.data.valid_loss !== undefined);
    const eta = TERMINAL.has(job.status) || job.status === "paused" ? null
      : job.estimated_finish ? job.estimated_finish - Date.now() / 1000 : last ? last.eta_s : null;
    clear(progress,
      h("div.progress", { role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(frac * 100) },
        h("div.bar", { style: { width: `${(frac * 100).toFixed(1)}%` } })),
      h("p.progress-line", {},
        h("strong", {}, total ? `step ${step} of ${total}` : job.status === "running" ? "starting…" : job.status),
        ` · ${Math.round(frac * 100)}%`,
        eta !== null && eta !== undefined ? ` · about ${fmtDuration(eta)} left` : "",
        last && last.elapsed_s !== undefined ? ` · ${fmtDuration(last.elapsed_s)} elapsed` : ""),
      kv([
        ["Training loss", last ? fmtNum(last.train_loss) : "—"],
        ["Validation loss", lastValid ? `${fmtNum(lastValid.data.valid_loss)} (step ${lastValid.data.step})` : "—"],
        dpo ? ["Reward accuracy", last ? pct(last.train_reward_accuracy) : "—"]
          : ["Token accuracy", last && last.train_mean_token_accuracy !== undefined ? `${(last.train_mean_token_accuracy * 100).toFixed(1)}%` : "—"],
        ["Trained tokens", fmtNum(job.trained_tokens || (last && last.trained_tokens) || null)],
        ["Throughput", last && last.tokens_per_s ? `${fmtNum(Math.round(last.tokens_per_s))} tokens/s` : "—"],
      ]),
      job.error ? h("p.error-box", {}, `${job.error.code ? job.error.code + ": " : ""}${job.error.message}`) : null);
    chart.update({
      train: rows.map((e) => [e.data.step, e.data.train_loss]),
      valid: rows.filter((e) => e.data.valid_loss !== undefined).map((e) => [e.data.step, e.data.valid_loss]),
      totalSteps: total,
    });
    if (dpo) drawRewards(rows, total);
    if (scores) drawScores(total);
  };

  // The events that carry a score: the base model's (no step) and each checkpoint's.
  const scoreEvents = () => events.filter((e) => e.data && typeof e.data.eval_score === "number" && e.data.eval_pass_rate !== undefined);
  const selectedStep = () => {
    const e = [...events].reverse().find((x) => x.data && x.data.step !== undefined && /^Selected the checkpoint/.test(x.message));
    return e ? e.data.step : null;
  };
  const drawScores = (total) => {
    const scored = scoreEvents();
    const base = scored.find((e) => e.data.step === null || e.data.step === undefined);
    const ckpts = scored.filter((e) => e.data.step !== null && e.data.step !== undefined);
    const last = Math.max(total || 0, ...ckpts.map((e) => e.data.step), 1);
    scores.update({
      score: ckpts.map((e) => [e.data.step, e.data.eval_score, Boolean(e.data.eval_below_base)]),
      base: base ? [[0, base.data.eval_score], [last, base.data.eval_score]] : [],
      totalSteps: total,
    });
    const best = ckpts.reduce((b, e) => (!b || e.data.eval_score >= b.data.eval_score ? e : b), null);
    const below = ckpts.filter((e) => e.data.eval_below_base).length;
    const chosen = selectedStep();
    clear(scoreLine,
      h("span.base-score", {}, "base model ", h("strong", {}, base ? fmtNum(base.data.eval_score) : "—")),
      best ? h("span.best-score", {}, " · best checkpoint: step ", String(best.data.step), " ", h("strong", {}, fmtNum(best.data.eval_score))) : null,
      below ? h("span.below-count", {}, ` · ${below} checkpoint${below > 1 ? "s" : ""} below the base model`) : null,
      chosen !== null ? h("span.selected-step", {}, ` · serving the checkpoint at step ${chosen}`) : null);
  };

  // A DPO job: the rewards of the preferred (chosen) and the rejected answers per
  // step, their margin, and the latest reward accuracy (train, and valid when present).
  const drawRewards = (rows, total) => {
    const series = (key) => rows.filter((e) => e.data[key] !== undefined).map((e) => [e.data.step, e.data[key]]);
    rewards.update({
      chosen: series("train_chosen_reward"),
      rejected: series("train_rejected_reward"),
      margin: series("train_reward_margin"),
      valid: series("valid_reward_margin"),
      totalSteps: total,
    });
    const latest = (key) => [...rows].reverse().find((e) => e.data[key] !== undefined);
    const train = latest("train_reward_accuracy"), valid = latest("valid_reward_accuracy");
    clear(rewardLine,
      h("span.train-accuracy", {}, "reward accuracy (preferred answer rewarded higher): train ",
        h("strong", {}, train ? pct(train.data.train_reward_accuracy) : "—"), train ? ` (step ${train.data.step})` : ""),
      valid ? h("span.valid-accuracy", {}, " · valid ", h("strong", {}, pct(valid.data.valid_reward_accuracy)), ` (step ${valid.data.step})`) : null);
  };

  const drawDetails = () => {
    const hp = job.hyperparameters || {};
    clear(details, kv([
      ["Base model", job.model],
      ["Fine-tuned model", job.fine_tuned_model],
      ["Method", methodLabel(job)],
      ["Weights", job.training_method === "full" ? "full fine-tuning" : "LoRA"],
      ["Training file", h("a", { href: `#/datasets/${enc(job.training_file)}` }, job.training_file)],
      ["Validation", job.validation_file ? h("a", { href: `#/datasets/${enc(job.validation_file)}` }, job.validation_file)
        : `split ${job.validation_split ?? "auto"}`],
      ["Question set", job.questions_file ? h("a", { href: `#/datasets/${enc(job.questions_file)}` }, job.questions_file) : "none"],
      ["Hyperparameters", Object.entries(hp).map(([k, v]) => `${k}=${v}`).join(", ")],
      job.lora ? ["LoRA", Object.entries(job.lora).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join("+") : v}`).join(", ")] : null,
      ["Resources", ranks(job.resources)],
      ["Seed", job.seed],
      ["Created", fmtTime(job.created_at)],
      ["Finished", fmtTime(job.finished_at)],
    ]));
  };

  const logRow = (e) => h(`li.event.level-${e.level}.type-${e.type}`, { dataset: { eventId: e.id } },
    h("time", {}, fmtTime(e.created_at).slice(11)), " ", h("span.msg", {}, e.message));
  const drawEvents = (fresh) => {
    // Newest first: prepend the new ones in order.
    for (const e of fresh) log.prepend(logRow(e));
  };

  let ckptSeen = -1;
  const drawCheckpoints = async (force = false) => {
    const count = events.filter((e) => /checkpoint/i.test(e.message)).length;
    if (!force && count === ckptSeen) return;
    ckptSeen = count;
    const data = (await get(`/v1/fine_tuning/jobs/${enc(id)}/checkpoints?limit=100`)).data;
    if (!ctx.active()) return;
    const m = (c, k) => (c.metrics[k] === undefined ? "—" : fmtNum(c.metrics[k]));
    // A DPO checkpoint's accuracy is the share of pairs whose preferred answer is rewarded higher.
    const acc = dpo ? "valid_reward_accuracy" : "valid_mean_token_accuracy";
    const withScores = data.some((c) => c.metrics.eval_score !== undefined);
    const chosen = selectedStep();
    const scoreCell = (c) => h("td.num.eval-score", {}, c.metrics.eval_score === undefined ? "—" : fmtNum(c.metrics.eval_score),
      c.metrics.eval_below_base ? h("span.tag.below", { title: "scores below the base model" }, "below base") : null,
      c.step_number === chosen ? h("span.tag.selected", { title: "the fine-tuned model serves this checkpoint" }, "selected") : null);
    const heads = ["Step", "Model", "Train loss", "Valid loss", dpo ? "Valid reward accuracy" : "Valid accuracy", ...(withScores ? ["Eval score"] : []), ""];
    clear(ckptBox, table(heads, data.map((c) => h("tr", {},
      h("td.num", {}, c.step_number),
      h("td.wrap", {}, h("code", {}, c.fine_tuned_model_checkpoint)),
      h("td.num", {}, m(c, "train_loss")),
      h("td.num", {}, c.metrics.full_valid_loss !== undefined ? fmtNum(c.metrics.full_valid_loss) : m(c, "valid_loss")),
      h("td.num", {}, c.metrics[acc] !== undefined ? pct(c.metrics[acc]) : "—"),
      withScores ? scoreCell(c) : null,
      h("td", {}, h("div.row", {},
        h("a.button.small", { href: `#/playground?model=${enc(c.fine_tuned_model_checkpoint)}` }, "Chat"),
        h("a.button.small", { href: `#/compare?before=${enc(callable(job.model) ? job.model : job.fine_tuned_model || job.model)}&after=${enc(c.fine_tuned_model_checkpoint)}${job.questions_file ? `&questions_file=${enc(job.questions_file)}` : ""}` }, "Compare"))))),
    { empty: "No checkpoints yet." }));
  };

  const drawAll = () => { drawHeader(); drawProgress(); drawDetails(); };
  drawAll();
  drawEvents(events);
  await drawCheckpoints(true);

  // Live: new events (after the last one seen, oldest first) and the job, every second.
  const tick = async () => {
    const after = events.length ? events[events.length - 1].id : undefined;
    const [page, fresh] = await Promise.all([
      get(`/v1/fine_tuning/jobs/${enc(id)}/events?order=asc&limit=1000${after ? `&after=${enc(after)}` : ""}`),
      get(`/v1/fine_tuning/jobs/${enc(id)}`),
    ]);
    if (!ctx.active()) return;
    const before = job.status;
    job = fresh;
    if (page.data.length) {
      events = events.concat(page.data);
      drawEvents(page.data);
    }
    if (page.data.length || before !== job.status) {
      drawAll();
      await drawCheckpoints(before !== job.status);
    }
    if (TERMINAL.has(job.status) && !page.has_more) p.stop();
  };
  const p = poller(tick, POLL_MS, ctx.active);
  ctx.onLeave(() => p.stop());
  if (TERMINAL.has(job.status)) p.stop();
}
