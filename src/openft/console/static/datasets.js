// Datasets: upload (drag-and-drop or picker), the validation report with each
// problem at its line/record, token statistics with a length histogram, and a
// preview of examples as the model sees them (trained tokens highlighted).

import { del, enc, get, qs, request, upload } from "./api.js";
import { barChart } from "./chart.js";
import {
  banner, busy, card, flash, clear, field, fmtBytes, fmtDuration, fmtNum, fmtTime, h, kv, modelInput, navigate,
  showError, statusBadge, table,
} from "./ui.js";
import { lastModel, loadModels, rememberModel } from "./shared.js";

export async function render(root, ctx) {
  if (ctx.args[0]) return renderFile(root, ctx, ctx.args[0]);
  const files = (await get("/v1/files")).data;
  if (!ctx.active()) return;
  clear(root, h("h1", {}, "Datasets"), uploadCard(), card("Files", filesTable(files)));
}

function uploadCard() {
  const purpose = h("select", { name: "purpose", "aria-label": "purpose" },
    h("option", { value: "fine-tune" }, "training / validation data (fine-tune)"),
    h("option", { value: "evals" }, "question set (evals)"));
  const picker = h("input", { type: "file", id: "file-picker", accept: ".json,.jsonl,.csv,.tsv,.xml,.parquet,.txt", hidden: true });
  const status = h("p.upload-status", { "aria-live": "polite" });
  const zone = h("div.dropzone", { tabindex: "0", role: "button", "aria-label": "Upload a dataset" },
    h("strong", {}, "Drop a dataset here"), " or ", h("span.linkish", {}, "choose a file"),
    h("div.help", {}, "JSON, JSONL, CSV/TSV, XML or Parquet: OpenAI messages, ShareGPT, Alpaca, prompt/completion, question/answer or text."));
  const send = async (file) => {
    if (!file) return;
    status.textContent = `Uploading ${file.name} (${fmtBytes(file.size)})…`;
    zone.classList.add("busy");
    try {
      const f = await upload(file, purpose.value);
      status.textContent = "";
      flash(f.status === "error" ? `${f.filename}: ${f.status_details}` : `Uploaded ${f.filename} (${f.id})`,
        f.status === "error" ? "error" : "info");
      navigate(`#/datasets/${enc(f.id)}`);
    } catch (err) {
      status.textContent = "";
      showError(err, `Upload of ${file.name} failed`);
    } finally {
      zone.classList.remove("busy");
      picker.value = "";
    }
  };
  zone.addEventListener("click", () => picker.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); picker.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    send(e.dataTransfer.files[0]);
  });
  picker.addEventListener("change", () => send(picker.files[0]));
  return card("Upload", field("Purpose", purpose), zone, picker, status);
}

function filesTable(files) {
  const rows = files.map((f) => h("tr", {},
    h("td", {}, h("a", { href: `#/datasets/${enc(f.id)}` }, f.filename), h("div.sub", {}, f.id)),
    h("td", {}, f.purpose),
    h("td", {}, statusBadge(f.status)),
    h("td.num", {}, f.validation ? fmtNum(f.validation.examples) : "—"),
    h("td.num", {}, fmtBytes(f.bytes)),
    h("td", {}, fmtTime(f.created_at)),
    h("td", {}, f.purpose === "fine-tune" && f.status === "processed"
      ? h("a.button", { href: `#/new?training_file=${enc(f.id)}` }, "Train on it") : null),
  ));
  return table(["File", "Purpose", "Status", "Examples", "Size", "Uploaded", ""], rows,
    { empty: "No files yet: upload a dataset above." });
}

// ---- one file ----------------------------------------------------------------

async function renderFile(root, ctx, id) {
  const f = await get(`/v1/files/${enc(id)}`);
  if (!ctx.active()) return;
  const deleteBtn = h("button.danger", { type: "button" }, "Delete");
  deleteBtn.addEventListener("click", () => {
    if (!confirm(`Delete ${f.filename}?`)) return;
    busy(deleteBtn, async () => { await del(`/v1/files/${enc(id)}`); navigate("#/datasets"); }, "Delete failed");
  });
  const actions = h("div.row", {},
    f.purpose === "fine-tune" && f.status === "processed" ? h("a.button.primary", { href: `#/new?training_file=${enc(id)}` }, "Fine-tune on this") : null,
    deleteBtn);
  clear(root,
    h("p.crumbs", {}, h("a", { href: "#/datasets" }, "Datasets"), " / ", f.filename),
    h("h1", {}, f.filename, " ", statusBadge(f.status)),
    card(null, kv([["File id", f.id], ["Purpose", f.purpose], ["Size", fmtBytes(f.bytes)], ["Uploaded", fmtTime(f.created_at)],
      f.status_details ? ["Details", f.status_details] : null]), actions));
  if (f.validation) root.append(validationCard(f));
  if (f.purpose === "fine-tune" && f.validation && f.validation.examples > 0) {
    const models = await loadModels();
    if (!ctx.active()) return;
    root.append(...insightsCard(f, models, ctx));
  } else if (f.purpose !== "fine-tune") {
    root.append(contentCard(f));
  }
}

function where(p) {
  if (p.line !== undefined && p.line !== null) return `line ${p.line}` + (p.column != null ? `, column ${p.column}` : "");
  if (p.record !== undefined && p.record !== null) return `record ${p.record}`;
  return "whole file";
}

function problemsTable(problems, kind) {
  return table(["Where", "Field", "Problem"], problems.map((p) => h(`tr.${kind}`, { dataset: { line: p.line ?? "", record: p.record ?? "" } },
    h("td.where", {}, (p.file ? `${p.file}: ` : "") + where(p)),
    h("td", {}, p.field || "—"),
    h("td", {}, p.message))));
}

function validationCard(f) {
  const v = f.validation;
  const errors = v.errors || [], warnings = v.warnings || [];
  const summary = h(`p.verdict.${v.usable ? "good" : "bad"}`, {},
    v.usable ? `Usable: ${v.examples} example(s)` : `Not usable: ${errors.length} error(s) must be fixed`,
    v.layout ? ` · layout: ${v.layout}` : "",
    warnings.length ? ` · ${warnings.length} warning(s)` : "");
  const extra = v.records !== undefined ? [["Records read", fmtNum(v.records)], ["Examples", fmtNum(v.examples)]] : [];
  return card("Validation", summary,
    errors.length ? [h("h3", {}, `Errors (${errors.length})`), problemsTable(errors, "error")] : h("p.good", {}, "No errors."),
    warnings.length ? [h("h3", {}, `Warnings (${warnings.length})`), problemsTable(warnings, "warning")] : null,
    extra.length ? kv(extra) : null);
}

function insightsCard(f, models, ctx) {
  const m = modelInput(models, { value: lastModel(models), name: "model", "aria-label": "model", placeholder: "model name" });
  const epochs = h("input", { type: "text", value: "auto", size: 5, name: "n_epochs", "aria-label": "epochs" });
  const method = h("select", { name: "method", "aria-label": "method" }, h("option", { value: "lora" }, "LoRA"), h("option", { value: "full" }, "full"));
  const go = h("button.primary", { type: "submit" }, "Analyse");
  const statsOut = h("div.stats-out"), previewOut = h("div.preview-out");
  const n = h("input", { type: "number", min: 1, max: 50, value: 3, name: "n", "aria-label": "examples to preview" });
  // A newer request supersedes an older one still running (a first call on the
  // built-in model may convert it, which takes a while).
  let seq = 0, failed = false;
  const run = async () => {
    const model = m.input.value.trim();
    if (!model) { showError(new Error("pick a model: statistics count tokens with its tokenizer")); return; }
    const mine = ++seq;
    rememberModel(model);
    clear(statsOut, h("p.loading", {}, `Counting tokens with ${model}'s tokenizer…`));
    clear(previewOut);
    const q = { model, n_epochs: epochs.value.trim() || "auto", method: method.value };
    try {
      const [stats, preview] = await Promise.all([
        get(`/v1/files/${enc(f.id)}/stats${qs(q)}`),
        get(`/v1/files/${enc(f.id)}/preview${qs({ model, n: n.value })}`),
      ]);
      if (!ctx.active() || mine !== seq) return;
      if (failed) banner(null);  // an earlier run's error no longer applies
      failed = false;
      clear(statsOut, statsView(stats));
      clear(previewOut, previewView(preview));
    } catch (err) {
      if (mine !== seq) return;
      failed = true;
      clear(statsOut, h("p.warning", {}, `No statistics: ${err.message}`));
      showError(err, "Statistics failed");
    }
  };
  const form = h("form.inline", { onsubmit: (e) => { e.preventDefault(); run(); } },
    field("Model (tokenizer)", m.wrap), field("Epochs", epochs), field("Method", method), field("Preview", n), go);
  run();
  return [card("Statistics", form, statsOut), card("Preview: as the model sees it", h("p.help", {},
    "Highlighted text is trained on (the loss is computed on it); the rest is context."), previewOut)];
}

function statsView(s) {
  const pairs = [
    ["Examples", fmtNum(s.examples)], ["Turns", fmtNum(s.turns)], ["Tokens", fmtNum(s.total_tokens)],
    ["Trained tokens", fmtNum(s.supervised_tokens)],
    ["Length p50 / p90 / p99 / max", [s.length_p50, s.length_p90, s.length_p99, s.length_max].map((x) => fmtNum(x)).join(" / ")],
    ["Max sequence length", fmtNum(s.max_seq_length)],
    ["Longer than that (truncated)", fmtNum(s.over_max_length)],
    ["Nothing to train on (fully masked)", fmtNum(s.fully_masked)],
    ["Epochs", fmtNum(s.epochs)],
    ["Estimated training time", fmtDuration(s.estimated_seconds)],
  ];
  const warn = (s.warnings || []).map((w) => h("p.warning", {}, w.message || String(w)));
  const hist = s.histogram && s.histogram.counts ? barChart(s.histogram.edges, s.histogram.counts, {
    xLabel: "tokens per example", yLabel: "examples", marker: s.max_seq_length,
  }) : null;
  return [kv(pairs), warn, hist ? h("figure.hist", {}, hist, h("figcaption", {}, "Length histogram (tokens per example)")) : null];
}

function previewView(p) {
  return p.examples.map((ex) => h("article.example", {},
    h("header", {}, h("strong", {}, ex.where), ` · ${fmtNum(ex.tokens)} tokens, ${fmtNum(ex.trained_tokens)} trained`),
    h("pre.tokens", {}, ex.segments.map((seg) => h(seg.trained ? "mark.trained" : "span.context", {}, seg.text)))));
}

function contentCard(f) {
  const out = h("pre.content", {}, "Loading…");
  request("GET", `/v1/files/${enc(f.id)}/content`, { raw: true })
    .then((r) => r.text())
    .then((t) => { out.textContent = t.length > 4000 ? t.slice(0, 4000) + "\n…" : t; })
    .catch((err) => { out.textContent = ""; showError(err); });
  return card("Content", out);
}
