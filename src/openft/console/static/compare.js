// Compare: a job's before/after comparison (GET /v1/fine_tuning/jobs/{id}/comparison),
// or any two models, checkpoints included, on a question set (POST /v1/comparisons).

import { enc, get, post } from "./api.js";
import { busy, card, clear, field, fmtNum, h, modelInput, table } from "./ui.js";
import { loadFiles, loadModels } from "./shared.js";

export async function render(root, ctx) {
  if (ctx.args[0]) return renderJob(root, ctx, ctx.args[0]);
  const [jobs, models, evals, allFiles] = await Promise.all([
    get("/v1/fine_tuning/jobs?limit=100").then((r) => r.data), loadModels(), loadFiles("evals"), loadFiles(),
  ]);
  if (!ctx.active()) return;
  const withComparison = jobs.filter((j) => j.has_comparison);
  const jobList = table(["Job", "Fine-tuned model", ""], withComparison.map((j) => h("tr", {},
    h("td", {}, h("a", { href: `#/jobs/${enc(j.id)}` }, j.id)),
    h("td.wrap", {}, j.fine_tuned_model || "—"),
    h("td", {}, h("a.button.small.primary", { href: `#/compare/${enc(j.id)}` }, "Open comparison")))),
  { empty: "No job has a comparison yet: give a job a question set (New job → Question set)." });

  const q = ctx.query;
  const before = modelInput(models, { name: "before_model", value: q.before || "", placeholder: "e.g. the base model" });
  const after = modelInput(models, { name: "after_model", value: q.after || "", placeholder: "a fine-tuned model or a checkpoint" });
  // Question sets are usually purpose=evals; other files are listed too.
  const others = allFiles.filter((f) => f.purpose !== "evals");
  const questions = h("select", { name: "questions_file" },
    h("optgroup", { label: "question sets" }, evals.map((f) => h("option", { value: f.id }, `${f.filename} · ${f.id}`))),
    others.length ? h("optgroup", { label: "other files" }, others.map((f) => h("option", { value: f.id }, `${f.filename} · ${f.id}`))) : null);
  if (q.questions_file) questions.value = q.questions_file;
  const maxTokens = h("input", { type: "number", name: "max_tokens", min: 1, max: 2048, value: 64 });
  const go = h("button.primary", { type: "submit" }, "Compare");
  const out = h("div.comparison-out");
  const form = h("form.compare-form", {
    onsubmit: (e) => {
      e.preventDefault();
      busy(go, async () => {
        clear(out, h("p.loading", {}, "Both models are answering every question; this takes a while on a CPU…"));
        try {
          const c = await post("/v1/comparisons", {
            before_model: before.input.value.trim(), after_model: after.input.value.trim(),
            questions_file: questions.value, max_tokens: Number(maxTokens.value) || 64,
          });
          if (ctx.active()) clear(out, comparisonView(c));
        } catch (err) {
          clear(out);
          throw err;
        }
      }, "Comparison failed");
    },
  }, h("div.grid2", {}, field("Before", before.wrap), field("After", after.wrap)),
  h("div.grid2", {}, field("Question set", questions), field("Max answer tokens", maxTokens)), go);

  clear(root, h("h1", {}, "Compare"),
    card("Job comparisons", jobList),
    card("Compare any two models or checkpoints", h("p.help", {}, "Both models answer each question (greedy decoding); answers are scored against the references."), form),
    out);
}

async function renderJob(root, ctx, id) {
  const [c, job] = await Promise.all([get(`/v1/fine_tuning/jobs/${enc(id)}/comparison`), get(`/v1/fine_tuning/jobs/${enc(id)}`)]);
  if (!ctx.active()) return;
  // The stored comparison names the models by their paths on the server; show
  // the names a client calls them by.
  const names = { before: job.model, after: job.fine_tuned_model || c.after_model };
  clear(root, h("p.crumbs", {}, h("a", { href: "#/compare" }, "Compare"), " / ", h("a", { href: `#/jobs/${enc(id)}` }, id)),
    h("h1", {}, "Before vs after"), comparisonView(c, names));
}

const pct = (x) => (x === null || x === undefined ? "—" : `${(x * 100).toFixed(0)}%`);

export function comparisonView(c, names = {}) {
  const s = c.summary || {};
  const beforeName = names.before || c.before_model, afterName = names.after || c.after_model;
  const v = c.verdict;
  const verdict = v ? card("Verdict",
    h(`p.verdict.${v.ok ? "good" : "bad"}`, {}, v.summary),
    h("ul.checks", {}, (v.checks || []).map((ch) => h(`li.${ch.ok ? "ok" : (ch.severity === "warning" ? "warn" : "bad")}`, {},
      h("span.mark", {}, ch.ok ? "✓" : "✗"), h("strong", {}, ch.name), " ", ch.detail)))) : null;
  const b = s.before || {}, a = s.after || {};
  const metric = (label, kb, fmt = fmtNum) => h("tr", {}, h("td", {}, label), h("td.num", {}, fmt(b[kb])), h("td.num", {}, fmt(a[kb])));
  const summary = card("Summary",
    h("p", {}, `${s.questions} question(s), ${s.with_reference} with a reference; the fine-tuned model answered differently on ${s.answers_changed}.`,
      s.metric ? ` By ${s.metric === "similarity" ? "similarity" : "ROUGE-L"}: ${s.improved} improved, ${s.worse} got worse, ${s.unchanged} about the same.` : ""),
    h("p.models", {}, h("span.label", {}, "Before: "), h("code", {}, beforeName), h("br"), h("span.label", {}, "After: "), h("code", {}, afterName)),
    s.with_reference ? table(["Score", "Before", "After"], [
      metric("exact match", "exact_rate", pct), metric("contains the reference", "contains_rate", pct),
      metric("ROUGE-L (mean)", "rouge_l"), metric("similarity (mean)", "similarity"),
    ]) : null);
  const rows = (c.rows || []).map((r, i) => {
    const better = betterSide(r, s.metric);
    return h("article.qa", {},
      h("h3", {}, `${i + 1}. `, r.question),
      r.reference ? h("p.reference", {}, h("span.label", {}, "reference "), r.reference) : null,
      h("div.sides", {},
        side("before", beforeName, r.before, r.before_scores, better === "before"),
        side("after", afterName, r.after, r.after_scores, better === "after")));
  });
  return [verdict, summary, card("Answers", h("div.qa-list", {}, rows))];
}

function betterSide(r, metric) {
  if (!metric || !r.before_scores || !r.after_scores) return null;
  const b = r.before_scores[metric], a = r.after_scores[metric];
  if (b === null || a === null || b === undefined || a === undefined || Math.abs(a - b) <= 0.01) return null;
  return a > b ? "after" : "before";
}

function side(which, model, answer, scores, better) {
  const chips = [];
  if (scores && scores.rouge_l !== null && scores.rouge_l !== undefined) {
    chips.push(h(`span.chip.${scores.exact ? "yes" : "no"}`, {}, `exact ${scores.exact ? "✓" : "✗"}`));
    chips.push(h(`span.chip.${scores.contains ? "yes" : "no"}`, {}, `contains ${scores.contains ? "✓" : "✗"}`));
    chips.push(h("span.chip", {}, `ROUGE-L ${fmtNum(scores.rouge_l, 2)}`));
    if (scores.similarity !== null && scores.similarity !== undefined) chips.push(h("span.chip", {}, `similarity ${fmtNum(scores.similarity, 2)}`));
  } else {
    chips.push(h("span.chip", {}, "no reference"));
  }
  return h(`div.side.${which}${better ? ".better" : ""}`, {},
    h("div.side-head", {}, h("strong", {}, which === "before" ? "Before" : "After"), " ", h("code", {}, model)),
    h("p.answer", {}, answer || h("em", {}, "(empty answer)")),
    h("div.chips", {}, chips));
}
