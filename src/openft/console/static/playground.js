// Playground: chat with any model (streaming), optionally two side by side on the
// same prompt; system prompt, temperature, max tokens; "copy as code".

import { streamChat } from "./api.js";
import { banner, card, clear, copyText, field, h, modelInput, showError } from "./ui.js";
import { lastModel, loadModels } from "./shared.js";

export async function render(root, ctx) {
  const models = await loadModels();
  if (!ctx.active()) return;
  const q = ctx.query;
  const a = modelInput(models, { name: "model_a", value: q.model || lastModel(models), placeholder: "model" });
  const b = modelInput(models, { name: "model_b", value: q.model2 || "", placeholder: "second model (e.g. the base)" });
  const sideBySide = h("input", { type: "checkbox", name: "side_by_side", checked: !!q.model2 });
  const system = h("textarea", { name: "system", rows: 2, placeholder: "optional system prompt, e.g. You are Pip, the Lumen support assistant." });
  const temperature = h("input", { type: "number", name: "temperature", min: 0, max: 2, step: 0.1, value: q.temperature || 0.7 });
  const maxTokens = h("input", { type: "number", name: "max_tokens", min: 1, max: 4096, value: q.max_tokens || 256 });
  const prompt = h("textarea", { name: "prompt", rows: 3, placeholder: "Ask something… (Ctrl+Enter sends)" });
  const send = h("button.primary", { type: "submit" }, "Send");
  const stop = h("button", { type: "button", disabled: true }, "Stop");
  const reset = h("button.ghost", { type: "button" }, "New chat");
  const codeBtn = h("button", { type: "button" }, "Copy as code");
  const code = h("pre.code", { hidden: true });
  const panes = [makePane("A"), makePane("B")];
  const panesBox = h("div.panes", {}, panes[0].el, panes[1].el);
  const layout = () => {
    panes[1].el.hidden = !sideBySide.checked;
    b.input.disabled = !sideBySide.checked;
    panesBox.classList.toggle("two", sideBySide.checked);
  };
  sideBySide.addEventListener("change", layout);

  let controller = null;
  const settings = () => ({
    system: system.value.trim(),
    temperature: Number(temperature.value),
    max_tokens: Number(maxTokens.value) || undefined,
  });
  const active = () => (sideBySide.checked ? panes : [panes[0]]).map((p, i) => ({ pane: p, model: (i ? b : a).input.value.trim() }));

  const submit = async () => {
    const text = prompt.value.trim();
    if (!text || controller) return;
    const targets = active();
    const missing = targets.find((t) => !t.model);
    if (missing) { showError(new Error(`pick a model for pane ${missing.pane.name}`)); return; }
    prompt.value = "";
    controller = new AbortController();
    send.disabled = true; stop.disabled = false;
    banner(null);
    const cfg = settings();
    await Promise.all(targets.map((t) => t.pane.ask(t.model, text, cfg, controller.signal)));
    controller = null;
    send.disabled = false; stop.disabled = true;
    if (ctx.active()) prompt.focus();
  };
  const form = h("form.composer", { onsubmit: (e) => { e.preventDefault(); submit(); } }, prompt,
    h("div.row", {}, send, stop, reset, codeBtn));
  prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); } });
  stop.addEventListener("click", () => controller && controller.abort());
  reset.addEventListener("click", () => { if (controller) controller.abort(); panes.forEach((p) => p.reset()); });
  codeBtn.addEventListener("click", async () => {
    const t = active()[0];
    const snippet = pythonSnippet(t.model, t.pane.messages(settings().system, prompt.value.trim()), settings());
    code.textContent = snippet;
    code.hidden = false;
    const ok = await copyText(snippet);
    banner(ok ? "Copied a Python snippet for the openai client." : "Select the snippet below to copy it.", "info");
  });
  ctx.onLeave(() => controller && controller.abort());

  clear(root, h("h1", {}, "Playground"),
    card(null,
      h("div.grid2", {}, field("Model", a.wrap), field(h("span", {}, sideBySide, " side by side with"), b.wrap)),
      field("System prompt", system),
      h("div.grid2", {}, field("Temperature", temperature, "0 = greedy, the same answer every time"), field("Max tokens", maxTokens))),
    panesBox, form, code);
  layout();
}

function makePane(name) {
  const history = [];  // {role, content} of this pane's conversation (system prompt excluded)
  const log = h("div.chat-log", { "aria-live": "polite" }, h("p.empty", {}, "No messages yet."));
  const title = h("div.pane-title", {}, `Model ${name}`);
  const el = h("section.pane", { dataset: { pane: name } }, title, log);

  const bubble = (role, text) => h(`div.msg.${role}`, {}, h("span.role", {}, role === "user" ? "You" : "Model"), h("div.text", {}, text));

  async function ask(model, text, cfg, signal) {
    if (!history.length) log.replaceChildren();
    title.textContent = `Model ${name}: ${model}`;
    history.push({ role: "user", content: text });
    log.append(bubble("user", text));
    const answer = bubble("assistant", "");
    const out = answer.querySelector(".text");
    const meta = h("div.meta", {}, "…");
    answer.classList.add("streaming");
    answer.append(meta);
    log.append(answer);
    const messages = cfg.system ? [{ role: "system", content: cfg.system }, ...history] : [...history];
    const t0 = performance.now();
    let first = null;
    try {
      const r = await streamChat({ model, messages, temperature: cfg.temperature, max_tokens: cfg.max_tokens }, {
        signal,
        onDelta: (piece) => {
          if (first === null) first = performance.now();
          out.append(piece);
          log.scrollTop = log.scrollHeight;
        },
      });
      history.push({ role: "assistant", content: r.text });
      const secs = (performance.now() - t0) / 1000;
      const n = r.usage ? r.usage.completion_tokens : null;
      meta.textContent = [r.finish_reason ? `finish: ${r.finish_reason}` : null, n !== null ? `${n} tokens` : null,
        first !== null ? `first token ${((first - t0) / 1000).toFixed(2)} s` : null,
        n ? `${(n / secs).toFixed(1)} tokens/s` : null].filter(Boolean).join(" · ");
      if (!r.text) out.append(h("em", {}, "(empty answer)"));
    } catch (err) {
      if (err.name === "AbortError") {
        meta.textContent = "stopped";
        history.push({ role: "assistant", content: out.textContent });
      } else {
        history.pop();
        answer.classList.add("failed");
        meta.textContent = `error: ${err.message}`;
        showError(err, `Model ${name}`);
      }
    } finally {
      answer.classList.remove("streaming");
      answer.classList.add("done");
    }
  }

  return {
    name, el, ask,
    reset() { history.length = 0; clear(log, h("p.empty", {}, "No messages yet.")); },
    messages(system, pending) {
      const msgs = system ? [{ role: "system", content: system }, ...history] : [...history];
      if (pending) msgs.push({ role: "user", content: pending });
      if (!msgs.some((m) => m.role === "user")) msgs.push({ role: "user", content: "Hello!" });
      return msgs;
    },
  };
}

// A runnable snippet for the official openai client, with this chat's settings.
export function pythonSnippet(model, messages, cfg) {
  const py = (v) => JSON.stringify(v);  // a JSON string literal is a valid Python str literal
  const msgs = messages.map((m) => `        {"role": ${py(m.role)}, "content": ${py(m.content)}},`).join("\n");
  const args = [`    model=${py(model)},`, `    messages=[\n${msgs}\n    ],`];
  if (Number.isFinite(cfg.temperature)) args.push(`    temperature=${cfg.temperature},`);
  if (cfg.max_tokens) args.push(`    max_tokens=${cfg.max_tokens},`);
  args.push("    stream=True,");
  return `import os

from openai import OpenAI

client = OpenAI(base_url=${py(location.origin + "/v1")}, api_key=os.environ.get("OPENFT_API_KEY", "local"))
stream = client.chat.completions.create(
${args.join("\n")}
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
`;
}
