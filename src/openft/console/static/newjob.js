// New job: base model (built-in, registered, or a fine-tuned model for a second
// round), data, validation, the method (supervised, or DPO on preference pairs with
// its beta), hyperparameters shown as `auto` with their rule, an optional question
// set, the ranks to train on, and the server's estimate before starting.

import { enc, get, post } from "./api.js";
import { busy, card, clear, field, fmtDuration, fmtNum, h, modelInput, navigate } from "./ui.js";
import { lastModel, loadFiles, loadModels, rememberModel } from "./shared.js";

// name, label, type, where it goes (hp = hyperparameters, else a top-level extra field), help
// The help lines are the `auto` rules of openft.config / the README.
export const HYPER = [
  ["n_epochs", "Epochs", "int", "hp", "passes over the data; auto: 3, raised so tiny sets see ≥100 examples, lowered for huge ones"],
  ["batch_size", "Batch size", "int", "hp", "examples per optimizer step; auto: 8 (fewer for sets under 80 examples)"],
  ["learning_rate_multiplier", "LR multiplier", "float", "hp", "scales the auto learning rate; auto: 1"],
  ["learning_rate", "Learning rate", "float", "x", "peak learning rate (overrides the multiplier); auto: 5e-4 for LoRA, 2e-5 for full, a tenth of that for DPO"],
  ["lora_rank", "LoRA rank", "int", "x", "LoRA rank r; auto: 16", "lora"],
  ["lora_alpha", "LoRA alpha", "float", "x", "LoRA scaling; auto: 2 × rank", "lora"],
  ["lora_dropout", "LoRA dropout", "float", "x", "auto: 0 (dropout costs ~35% of a CPU step)", "lora"],
  ["max_seq_length", "Max sequence length", "int", "x", "longer examples are truncated; auto: longest example rounded up to 64, at most 2048 and the model's context"],
  ["warmup_ratio", "Warmup ratio", "float", "x", "fraction of steps warming up the learning rate; auto: 0.05, then cosine decay"],
  ["weight_decay", "Weight decay", "float", "x", "AdamW weight decay; auto: 0 for LoRA, 0.01 for full"],
  ["early_stopping_patience", "Early stopping patience", "int", "x", "stop after N validations without improvement; auto: off"],
  ["max_steps", "Max steps", "int", "x", "stop after this many optimizer steps; auto: no limit (use it for a quick smoke run)"],
  ["seed", "Seed", "int", "x", "seed for the split, data order, initialisation and dropout; auto: 0"],
];

// The layouts a DPO job trains on (a file's validation.layout); only for a hint,
// the server decides (it answers 400 for another layout).
const PREFERENCE_LAYOUTS = ["openai_preference", "preference", "sharegpt_preference"];

function parseValue(raw, type) {
  const v = raw.trim();
  if (!v || v.toLowerCase() === "auto") return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || (type === "int" && !Number.isInteger(n))) return { bad: `expected ${type === "int" ? "an integer" : "a number"} or auto, got '${v}'` };
  return n;
}

export async function render(root, ctx) {
  const [models, fineTune, evals] = await Promise.all([loadModels(), loadFiles("fine-tune"), loadFiles("evals")]);
  const from = ctx.query.from ? await get(`/v1/fine_tuning/jobs/${enc(ctx.query.from)}`) : null;
  if (!ctx.active()) return;
  const trainable = models.filter((m) => m.kind !== "checkpoint");
  const usable = fineTune.filter((f) => f.status === "processed");
  const inputs = {};

  const model = modelInput(trainable, { name: "model", required: true, placeholder: "base model name or fine-tuned model", value: lastModel(trainable) });
  inputs.model = model.input;
  const fileOptions = (files, none) => [none ? h("option", { value: "" }, none) : null,
    ...files.map((f) => h("option", { value: f.id }, `${f.filename} · ${f.validation ? f.validation.examples + " examples · " : ""}${f.id}`))];
  inputs.training_file = h("select", { name: "training_file", required: true }, fileOptions(usable, usable.length ? null : "no usable training file: upload one first"));
  inputs.validation_file = h("select", { name: "validation_file" }, fileOptions(usable, "— choose a file —"));
  inputs.validation_split = h("input", { type: "text", name: "validation_split", placeholder: "auto", inputmode: "decimal" });
  const splitRadio = h("input", { type: "radio", name: "valmode", value: "split", checked: true });
  const fileRadio = h("input", { type: "radio", name: "valmode", value: "file" });
  const method = h("select", { name: "method" }, h("option", { value: "lora" }, "LoRA (adapter; fast, small)"), h("option", { value: "full" }, "full fine-tuning (all weights)"));
  // OpenAI's `method.type`: supervised (chat examples) or dpo (preference pairs).
  inputs.method_type = h("select", { name: "method_type" },
    h("option", { value: "supervised" }, "Supervised (chat examples)"),
    h("option", { value: "dpo" }, "DPO (preference pairs)"));
  inputs.beta = h("input", { type: "text", name: "beta", placeholder: "auto", inputmode: "decimal", autocomplete: "off" });
  const betaField = field("Beta", inputs.beta, "DPO: how far the model may move from the base model it starts from (the reference); a number in (0, 2], higher stays closer; auto: 0.1");
  const layoutHint = h("p.warning.layout-hint", { hidden: true, "aria-live": "polite" });
  inputs.train_on_prompt = h("input", { type: "checkbox", name: "train_on_prompt" });
  inputs.questions_file = h("select", { name: "questions_file" }, fileOptions(evals, "— none —"));
  inputs.suffix = h("input", { type: "text", name: "suffix", maxlength: 64, placeholder: "e.g. support-bot", pattern: "[A-Za-z0-9._\\-]*" });
  inputs.nproc_per_node = h("input", { type: "number", name: "nproc_per_node", min: 1, max: 64, step: 1, placeholder: "1", inputmode: "numeric" });

  const hyperRows = HYPER.map(([name, label, type, , help, group]) => {
    inputs[name] = h("input", { type: "text", name, placeholder: "auto", inputmode: type === "int" ? "numeric" : "decimal", autocomplete: "off" });
    return h(`label.hp${group ? "." + group : ""}`, {}, h("span.hp-name", {}, label, h("code", {}, name)), inputs[name], h("span.help", {}, help));
  });

  const estimateOut = h("div.estimate", { "aria-live": "polite" }, h("p.help", {}, "Pick a model and a training file to see the estimate."));
  const estimateBtn = h("button", { type: "button" }, "Estimate");
  const submit = h("button.primary", { type: "submit" }, "Start fine-tuning");

  const dpo = () => inputs.method_type.value === "dpo";
  // A hint only: a DPO job's files must hold preference pairs (the server says so too).
  const layoutOf = (id) => {
    const f = usable.find((x) => x.id === id);
    return f && f.validation ? f.validation.layout : null;
  };
  const syncLayoutHint = () => {
    const wrong = [];
    if (dpo()) {
      for (const [what, select] of [["training file", inputs.training_file], ["validation file", fileRadio.checked ? inputs.validation_file : null]]) {
        const layout = select && select.value ? layoutOf(select.value) : null;
        if (layout && !PREFERENCE_LAYOUTS.includes(layout)) wrong.push(`the ${what} holds '${layout}' examples`);
      }
    }
    layoutHint.hidden = !wrong.length;
    clear(layoutHint, wrong.length ? `DPO trains on preference pairs (${PREFERENCE_LAYOUTS.join(", ")}), and ${wrong.join(" and ")}.` : null);
  };
  const syncVisibility = () => {
    const viaFile = fileRadio.checked;
    inputs.validation_file.disabled = !viaFile;
    inputs.validation_split.disabled = viaFile;
    for (const el of root.querySelectorAll(".hp.lora")) el.hidden = method.value === "full";
    betaField.hidden = !dpo();
    syncLayoutHint();
  };

  // The job body: exactly what any API client sends to POST /v1/fine_tuning/jobs.
  const body = () => {
    const out = { model: inputs.model.value.trim(), training_file: inputs.training_file.value };
    const hp = {};
    const problems = [];
    for (const [name, , type, where] of HYPER) {
      const v = parseValue(inputs[name].value, type);
      if (v && v.bad) { problems.push([name, v.bad]); continue; }
      if (where === "hp") hp[name] = v === undefined ? "auto" : v;
      else if (v !== undefined) out[name] = v;
    }
    if (dpo()) {
      // OpenAI's DPO body: the hyperparameters go with the method, beta among them.
      const beta = parseValue(inputs.beta.value, "float");
      if (beta && beta.bad) problems.push(["beta", beta.bad]);
      out.method = { type: "dpo", dpo: { hyperparameters: { beta: beta === undefined || beta.bad ? "auto" : beta, ...hp } } };
    } else {
      out.hyperparameters = hp;
    }
    if (fileRadio.checked) {
      if (inputs.validation_file.value) out.validation_file = inputs.validation_file.value;
    } else {
      const v = parseValue(inputs.validation_split.value, "float");
      if (v && v.bad) problems.push(["validation_split", v.bad]);
      else if (v !== undefined) out.validation_split = v;
    }
    if (method.value === "full") {
      out.full_finetune = true;
      for (const k of ["lora_rank", "lora_alpha", "lora_dropout"]) delete out[k];
    }
    if (inputs.train_on_prompt.checked) out.train_on_prompt = true;
    if (inputs.questions_file.value) out.questions_file = inputs.questions_file.value;
    if (inputs.suffix.value.trim()) out.suffix = inputs.suffix.value.trim();
    // One rank is what a job that asks for nothing gets: send resources only to ask for more.
    const ranks = parseValue(inputs.nproc_per_node.value, "int");
    if (ranks && ranks.bad) problems.push(["nproc_per_node", ranks.bad]);
    else if (ranks !== undefined && ranks !== 1) out.resources = { nproc_per_node: ranks };
    return { out, problems };
  };

  const markInvalid = (param) => {
    for (const el of root.querySelectorAll(".invalid")) el.classList.remove("invalid");
    const name = param ? String(param).split(".").pop() : null;
    if (name && inputs[name]) { inputs[name].classList.add("invalid"); inputs[name].focus(); }
  };

  let estimateSeq = 0;
  const estimate = async () => {
    const { out, problems } = body();
    if (!out.model || !out.training_file || problems.length) return;
    const seq = ++estimateSeq;
    clear(estimateOut, h("p.loading", {}, "Estimating…"));
    try {
      const e = await post("/v1/fine_tuning/estimate", out);
      if (seq !== estimateSeq || !ctx.active()) return;
      clear(estimateOut, h("p.estimate-line", {},
        h("strong", {}, `about ${fmtDuration(e.estimated_seconds)}`), " of training on this machine · ",
        `${fmtNum(e.examples)} training examples × ${fmtNum(e.epochs)} epoch(s) = ${fmtNum(e.steps)} steps of ${fmtNum(e.batch_size)} · `,
        `${fmtNum(e.total_tokens)} tokens, ${fmtNum(e.supervised_tokens)} trained · ${e.method === "full" ? "full fine-tuning" : "LoRA"}`,
        out.method ? " · DPO" : "",
        e.learning_rate ? ` · learning rate ${fmtNum(e.learning_rate)}` : "",
        e.max_seq_length ? ` · max length ${fmtNum(e.max_seq_length)}` : ""));
    } catch (err) {
      if (seq !== estimateSeq) return;
      clear(estimateOut, h("p.warning", {}, `No estimate: ${err.message}`));
    }
  };
  let timer = null;
  const soon = () => { clearTimeout(timer); timer = setTimeout(() => { if (ctx.active()) estimate(); }, 700); };
  ctx.onLeave(() => clearTimeout(timer));
  estimateBtn.addEventListener("click", () => busy(estimateBtn, estimate));

  const form = h("form.newjob", { novalidate: true },
    card("Model and data",
      field("Base model", model.wrap, "a base model (built-in, or registered on the server with openft models add), or one of your fine-tuned models or checkpoints (a second round)"),
      field("Training file", inputs.training_file, h("span", {}, "processed fine-tune files; ", h("a", { href: "#/datasets" }, "upload one"))),
      field("Method", inputs.method_type, "supervised: learn the assistant's answers of chat examples; DPO: learn to prefer the preferred answer of preference pairs (input, preferred_output, non_preferred_output) over the other"),
      betaField,
      layoutHint,
      h("fieldset.valmode", {}, h("legend", {}, "Validation"),
        h("label.radio", {}, splitRadio, " hold out a seeded split of the training file: ", inputs.validation_split,
          h("span.help", {}, "fraction held out; auto: 0.1 (10–20% advised); rows sharing a prompt stay on one side")),
        h("label.radio", {}, fileRadio, " use a separate validation file: ", inputs.validation_file)),
      field("Weights", method),
      h("label.check", {}, inputs.train_on_prompt, " train on prompts too ", h("span.help", {}, "auto: off, the loss is on assistant tokens only")),
      field("Question set (optional)", inputs.questions_file, "questions (and optional reference answers) answered before and after training, scored side by side"),
      field("Suffix", inputs.suffix, "a name inside the fine-tuned model's id: ft:<base>:<owner>:<suffix>:<id>"),
      field("Ranks (processes)", inputs.nproc_per_node, "training processes (torchrun ranks) on the worker's machine, 1–64; empty: the worker's own setting (1 unless it was started with --nproc-per-node)")),
    card("Hyperparameters", h("p.help", {}, "Leave a field empty (auto) to let openft decide from the data and the model; the resolved values are recorded with the run."),
      h("div.hp-grid", {}, hyperRows)),
    card("Estimate", estimateOut, h("div.row", {}, estimateBtn, submit)));

  form.addEventListener("input", soon);
  form.addEventListener("change", () => { syncVisibility(); soon(); });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submit, async () => {
      const { out, problems } = body();
      if (problems.length) { markInvalid(problems[0][0]); throw new Error(`${problems[0][0]}: ${problems[0][1]}`); }
      if (!out.model) { markInvalid("model"); throw new Error("model: pick a base model"); }
      if (!out.training_file) { markInvalid("training_file"); throw new Error("training_file: upload a usable training file first"); }
      rememberModel(out.model);
      try {
        const job = await post("/v1/fine_tuning/jobs", out, { extraHeaders: { "Idempotency-Key": idempotencyKey() } });
        navigate(`#/jobs/${enc(job.id)}`);
      } catch (err) {
        markInvalid(err.param);
        throw err;
      }
    }, "The job was not created");
  });

  clear(root, h("h1", {}, from ? `Clone of ${from.id}` : "New fine-tuning job"),
    from ? h("p.help", {}, "Pre-filled from the job below; change what you want and start it as a new job.") : null,
    form);
  prefill(inputs, { model, method, splitRadio, fileRadio }, from, ctx.query);
  syncVisibility();
  soon();
}

function prefill(inputs, { method, splitRadio, fileRadio }, job, query) {
  const set = (name, v) => {
    if (v === undefined || v === null || v === "auto" || !inputs[name]) return;
    if (inputs[name].type === "checkbox") inputs[name].checked = !!v;
    else if (inputs[name].tagName === "SELECT") ensureOption(inputs[name], v);
    else inputs[name].value = String(v);
  };
  if (query.model) set("model", query.model);
  if (query.training_file) set("training_file", query.training_file);
  if (!job) return;
  set("model", job.model);
  set("training_file", job.training_file);
  if (job.validation_file) { fileRadio.checked = true; splitRadio.checked = false; set("validation_file", job.validation_file); }
  else set("validation_split", job.validation_split);
  const m = job.method || {};
  const hp = job.hyperparameters || (m[m.type] && m[m.type].hyperparameters) || {};
  for (const k of ["n_epochs", "batch_size", "learning_rate_multiplier"]) set(k, hp[k]);
  if (m.type === "dpo") {
    inputs.method_type.value = "dpo";
    set("beta", m.dpo && m.dpo.hyperparameters && m.dpo.hyperparameters.beta);
  }
  if (job.training_method === "full") method.value = "full";
  if (job.lora) {
    set("lora_rank", job.lora.rank);
    set("lora_alpha", job.lora.alpha);
    set("lora_dropout", job.lora.dropout);
  }
  // Extension fields the job object carries (when the server returns them).
  for (const k of ["learning_rate", "max_seq_length", "warmup_ratio", "weight_decay", "early_stopping_patience", "max_steps", "train_on_prompt"]) set(k, job[k]);
  set("seed", job.seed);
  set("questions_file", job.questions_file);
  set("suffix", job.suffix);
  if (job.resources && job.resources.nproc_per_node > 1) set("nproc_per_node", job.resources.nproc_per_node);
}

// A file may have been deleted or be unlisted (another purpose): keep the id selectable.
function ensureOption(select, value) {
  if (![...select.options].some((o) => o.value === value)) select.append(h("option", { value }, value));
  select.value = value;
}

function idempotencyKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

