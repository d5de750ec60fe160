// Models & keys: fine-tuned models with their lineage, config and training
// summary; export in every format the server offers (of the model or one of its
// checkpoints) and delete; the caller's API keys.

import { del, download, enc, get, getKey, post, setKey } from "./api.js";
import { banner, busy, card, clear, copyText, field, flash, fmtBytes, fmtDuration, fmtNum, fmtTime, h, kv, table } from "./ui.js";
import { loadModels } from "./shared.js";

export async function render(root, ctx) {
  const models = await loadModels();
  if (!ctx.active()) return;
  const tuned = models.filter((m) => m.kind === "fine-tuned");
  const ckpts = models.filter((m) => m.kind === "checkpoint");
  const bases = models.filter((m) => m.kind === "base");
  const keysBox = h("div");
  clear(root, h("h1", {}, "Models & keys"),
    card("Fine-tuned models", tunedTable(tuned, ckpts, ctx)),
    card("Base models", table(["Model", "Owned by"], bases.map((m) => h("tr", {}, h("td", {}, h("code", {}, m.id)), h("td", {}, m.owned_by))),
      { empty: "No built-in model is installed; a local model folder or .gguf path works as a base model too." }),
    h("p.help", {}, "Any Hugging Face model folder or .gguf file on the server can also be typed as the base model of a new job.")),
    card("API keys", keysBox));
  await renderKeys(keysBox, ctx);
}

function tunedTable(tuned, ckpts, ctx) {
  const rows = [];
  for (const m of tuned) {
    const detail = h("td.detail", { colspan: 5 });
    const detailRow = h("tr.detail-row", { hidden: true }, detail);
    const more = h("button.small", { type: "button", "aria-expanded": "false" }, "Details");
    const open = async (focusExport) => {
      const full = await get(`/v1/models/${enc(m.id)}`);
      if (!ctx.active()) return;
      clear(detail, modelDetails(full, ckpts.filter((c) => c.parent === m.id)));
      detailRow.hidden = false;
      more.setAttribute("aria-expanded", "true");
      if (focusExport) detail.querySelector("select[name=format]").focus();
    };
    more.addEventListener("click", () => busy(more, async () => {
      if (!detailRow.hidden) { detailRow.hidden = true; more.setAttribute("aria-expanded", "false"); return; }
      await open(false);
    }, "Could not load the model"));
    const exportBtn = h("button.small", { type: "button" }, "Export…");
    exportBtn.addEventListener("click", () => busy(exportBtn, () => open(true), "Could not load the model"));
    const delBtn = h("button.small.danger", { type: "button" }, "Delete");
    delBtn.addEventListener("click", () => {
      if (!confirm(`Delete ${m.id} and its checkpoints? Its job stays in the job list.`)) return;
      busy(delBtn, async () => {
        await del(`/v1/models/${enc(m.id)}`);
        flash(`Deleted ${m.id}.`, "info");
        window.dispatchEvent(new HashChangeEvent("hashchange"));
      }, "Delete failed");
    });
    rows.push(h("tr", { dataset: { model: m.id } },
      h("td.wrap", {}, h("code", {}, m.id)),
      h("td.wrap", {}, m.parent || "—"),
      h("td", {}, m.fine_tuning_job_id ? h("a", { href: `#/jobs/${enc(m.fine_tuning_job_id)}` }, m.fine_tuning_job_id) : "—"),
      h("td", {}, fmtTime(m.created)),
      h("td", {}, h("div.row", {}, more, h("a.button.small", { href: `#/playground?model=${enc(m.id)}` }, "Chat"),
        exportBtn, delBtn))), detailRow);
  }
  return table(["Model", "Base", "Job", "Created", ""], rows, { empty: "No fine-tuned models yet." });
}

function modelDetails(m, ckpts) {
  const lin = m.lineage || {}, cfg = m.config || {}, sum = m.summary || {};
  const lineage = Object.keys(lin).length ? kv(Object.entries(lin).map(([k, v]) => [k, short(v)])) : h("p.empty", {}, "No lineage recorded.");
  const train = cfg.train || cfg;
  const config = Object.keys(cfg).length ? kv([
    ...Object.entries(train).filter(([, v]) => typeof v !== "object" || v === null).map(([k, v]) => [k, short(v)]),
    cfg.lora ? ["lora", Object.entries(cfg.lora).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join("+") : v}`).join(", ")] : null,
  ]) : h("p.empty", {}, "No config recorded.");
  const sig = sum.signals || {};
  const summary = Object.keys(sum).length ? kv([
    ["trained tokens", fmtNum(sum.trained_tokens)], ["steps", fmtNum(sum.steps)],
    ["training time", fmtDuration(sum.elapsed_s)], ["throughput", sum.tokens_per_s ? `${fmtNum(Math.round(sum.tokens_per_s))} tokens/s` : null],
    ["first → last training loss", `${fmtNum(sig.first_train_loss)} → ${fmtNum(sig.last_train_loss)}`],
    ["first → final validation loss", `${fmtNum(sig.first_valid_loss)} → ${fmtNum(sum.full_valid_loss ?? sig.last_valid_loss)}`],
    ["stopped early", sum.stopped_early ? "yes" : "no"],
  ]) : h("p.empty", {}, "No summary recorded.");
  return h("div.model-details", {},
    h("div.detail-col", {}, h("h3", {}, "Lineage"), lineage),
    h("div.detail-col", {}, h("h3", {}, "Training config (resolved)"), config),
    h("div.detail-col", {}, h("h3", {}, "Training summary"), summary,
      ckpts.length ? [h("h3", {}, "Checkpoints"), h("ul.plain", {}, ckpts.map((c) => h("li", {}, h("code", {}, c.id), " ",
        h("a", { href: `#/playground?model=${enc(c.id)}` }, "chat"))))] : null),
    h("div.detail-col", {}, h("h3", {}, "Export"), exportForm(m, ckpts)));
}

const FORMAT_LABELS = {
  hf: "Merged model (Hugging Face safetensors)",
  adapter: "PEFT adapter",
  vllm: "vLLM adapter (checked against vLLM's rules)",
  gguf: "GGUF, merged (llama.cpp, LM Studio)",
  "gguf-lora": "LoRA GGUF (llama-server --lora)",
  ollama: "Ollama (GGUF + Modelfile)",
};

// Export the model or one of its checkpoints: the formats and quantisations come
// from the server's own list for that source (a full fine-tune has no adapter).
function exportForm(m, ckpts) {
  const source = h("select", { name: "source", "aria-label": "export source" },
    h("option", { value: m.id }, "the final model"),
    ckpts.map((c) => h("option", { value: c.id }, `checkpoint at step ${fmtNum(c.step)}`)));
  const format = h("select", { name: "format", "aria-label": "export format" });
  const quant = h("select", { name: "quant", "aria-label": "quantisation" });
  const merge = h("input", { type: "checkbox", name: "merge" });
  const quantField = field("Quantisation", quant), mergeField = h("label.check", {}, merge, " merge when vLLM would refuse the adapter");
  const options = { [m.id]: m.exports || { formats: ["hf"], quants: {}, default_quant: {} } };
  let current = options[m.id];  // what the selects show: the last source whose options have arrived
  const showFormats = () => {
    const was = format.value;
    clear(format, current.formats.map((f) => h("option", { value: f }, FORMAT_LABELS[f] || f)));
    if (current.formats.includes(was)) format.value = was;
    showQuants();
  };
  const showQuants = () => {
    const qs = current.quants[format.value] || [];
    clear(quant, qs.map((q) => h("option", { value: q }, q)));
    if (qs.length) quant.value = current.default_quant[format.value];
    quantField.hidden = !qs.length;
    mergeField.hidden = format.value !== "vllm";
  };
  const go = h("button.primary.small", { type: "button" }, "Download");
  const form = h("form.export", { onsubmit: (e) => e.preventDefault() });
  // While a checkpoint's options load, nothing else can be chosen: a format picked
  // meanwhile would be one of the previous source's.
  const loading = (on) => {
    for (const el of [format, quant, merge, go]) el.disabled = on;
    if (on) form.setAttribute("aria-busy", "true"); else form.removeAttribute("aria-busy");
  };
  source.addEventListener("change", () => busy(source, async () => {
    const id = source.value;
    loading(true);
    try {
      options[id] ||= (await get(`/v1/models/${enc(id)}`)).exports;
      if (source.value === id) { current = options[id]; showFormats(); }
    } finally { loading(false); }
  }, "Could not load the checkpoint"));
  format.addEventListener("change", showQuants);
  go.addEventListener("click", () => busy(go, async () => {
    const params = new URLSearchParams({ format: format.value });
    if (!quantField.hidden) params.set("quant", quant.value);
    if (!mergeField.hidden && merge.checked) params.set("merge", "true");
    banner(`Exporting ${source.value} as ${format.value}${params.has("quant") ? " " + quant.value : ""}… (merging and converting can take a minute)`, "info", { sticky: true });
    const r = await download(`/v1/models/${enc(source.value)}/export?${params}`, `${source.value}-${format.value}`);
    banner(`Downloaded ${r.name} (${fmtBytes(r.bytes)}).`, "info");
  }, "Export failed"));
  showFormats();
  return clear(form, ckpts.length ? field("Of", source) : null, field("Format", format), quantField, mergeField, go);
}

function short(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "object") return JSON.stringify(v);
  const s = String(v);
  return /^[0-9a-f]{64}$/.test(s) ? h("code", { title: s }, `${s.slice(0, 12)}…`) : s;
}

async function renderKeys(box, ctx) {
  let keys;
  try {
    keys = (await get("/v1/keys")).data;  // also tells whether this server offers keys at all
  } catch (err) {
    clear(box, h("p.warning", {}, `Keys are not available: ${err.message}`));
    return;
  }
  if (!ctx.active()) return;
  const secret = h("div.secret");
  const create = h("button.primary", { type: "button" }, "Create a key");
  create.addEventListener("click", () => busy(create, async () => {
    const k = await post("/v1/keys", {});
    const adopted = !getKey();
    if (adopted) setKey(k.key);  // creating the first key ends local mode: this browser needs one from now on
    clear(secret, h("p", {}, h("strong", {}, "New key (shown once): "), h("code.key", {}, k.key), " ",
      h("button.small", { type: "button", onclick: () => copyText(k.key).then((ok) => banner(ok ? "Key copied." : "Select the key to copy it.", "info")) }, "Copy")),
    adopted ? h("p.help", {}, "This browser now uses it (API key button, top right).") : null);
    await renderKeysList();
  }, "Could not create a key"));
  const list = h("div");
  const renderKeysList = async (fresh = true) => {
    if (fresh) keys = (await get("/v1/keys")).data;
    clear(list, table(["Key id", "Owner", "Created", ""], keys.map((k) => {
      const b = h("button.small.danger", { type: "button" }, "Delete");
      b.addEventListener("click", () => {
        if (!confirm(`Delete key ${k.id}? Clients using it stop working.`)) return;
        busy(b, async () => { await del(`/v1/keys/${enc(k.id)}`); await renderKeysList(); }, "Delete failed");
      });
      return h("tr", {}, h("td", {}, h("code", {}, k.id), k.prefix ? h("div.sub", {}, `${k.prefix}…`) : null), h("td", {}, k.owner),
        h("td", {}, fmtTime(k.created_at)), h("td", {}, b));
    }), { empty: "No API keys: the server accepts local (loopback) callers only. Creating a key makes every request need one." }));
  };
  clear(box, h("p.help", {}, "Keys of your own owner. Send one as Authorization: Bearer <key>."), list, create, secret);
  await renderKeysList(false);
}
