"""Which chat template a model is trained and served with, and the check that it fits.

One resolver (`resolve_template`) for every caller (training, data preview and
validate, the before/after comparison, the server), in this order:

1. `--chat-template FILE` (a Jinja file), when given: source "file";
2. the model's own template (GGUF `tokenizer.chat_template`, the HF tokenizer
   config or `chat_template.jinja`): source "model";
3. the family's canonical template, chosen by the architecture (`model_type` of
   config.json) and confirmed by the vocabulary (every control marker the template
   writes is a single token): Gemma's `<start_of_turn>`, Qwen's ChatML, Llama 3's
   header tokens, Mistral's `[INST]`: source "family";
4. else a plain-text "User: ... / Assistant: ..." template whose assistant turns
   end with the model's own EOS token (so answers still stop): source "plain".

Why the vocabulary matters: a template written for another family (ChatML on
Gemma) has markers the tokenizer splits into several text pieces; the model never
learnt them as turn boundaries, and its end-of-turn never comes as one token, so
generation never stops. `check_template` refuses such a template before training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TemplateSource = Literal["model", "family", "plain", "file"]


class TemplateError(ValueError):
    """A chat template that cannot be used with this model or data (the message says what to do)."""


ADVICE = "pass --chat-template FILE with a template in the model's own format, or use a model with its own template"


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # "chatml", "gemma", "llama3", "mistral", "deepseek", "plain", "custom" or the file's stem
    source: TemplateSource
    text: str  # the Jinja source, as transformers' apply_chat_template renders it
    origin: str = ""  # where it came from, in words (a file path, the family, why not a family's)

    def describe(self) -> str:
        where = {
            "model": "the model's own template",
            "family": "its family's canonical template (the model ships none)",
            "plain": "plain text ending each answer with the model's EOS (the model ships no template)",
            "file": "from --chat-template",
        }[self.source]
        return f"{self.name}, {where}" + (f": {self.origin}" if self.origin else "")


# --------------------------------------------------------------------------- family templates

# Gemma: system folded into the first user turn, the assistant's role named "model"
# (as Google's own Gemma 2/3 templates do); BOS written by the template, since
# training and serving tokenise the rendered text without adding special tokens.
GEMMA = (
    "{{ bos_token if bos_token else '' }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral's v3 tokenizers have [INST]/[/INST] as control tokens; the system prompt
# goes in front of the first user turn, answers end with EOS.
MISTRAL = (
    "{{ bos_token if bos_token else '' }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + (message['content'] | trim) + eos_token }}"
    "{% else %}{{ '[INST] ' + (system if loop.first else '') + (message['content'] | trim) + ' [/INST]' }}"
    "{% endif %}{% endfor %}"
)

FAMILY_TEMPLATES = {"gemma": GEMMA, "chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}

# config.json `model_type` -> the family templates to try, in order; the first whose
# control markers are all single tokens of the vocabulary is used. Llama-architecture
# models without Llama 3's header tokens (SmolLM's base models) ship ChatML's tokens.
FAMILIES: dict[str, tuple[str, ...]] = {
    "gemma": ("gemma",),
    "gemma2": ("gemma",),
    "gemma3": ("gemma",),
    "gemma3_text": ("gemma",),
    "qwen2": ("chatml",),
    "qwen2_moe": ("chatml",),
    "qwen3": ("chatml",),
    "qwen3_moe": ("chatml",),
    "llama": ("llama3", "chatml"),
    "mistral": ("mistral",),
}


def plain_template(tokenizer) -> ChatTemplate:
    """'User: ... / Assistant: ...' text, each answer ended by the model's own EOS,
    with BOS in front where the tokenizer itself would add one."""
    bos = "{{ bos_token }}" if _adds_bos(tokenizer) else ""
    text = (
        bos + "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] | trim }}{{ '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + (message['content'] | trim) + eos_token + '\n' }}"
        "{% else %}{{ (message['role'] | capitalize) + ': ' + (message['content'] | trim) + '\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )
    return ChatTemplate("plain", "plain", text)


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


# --------------------------------------------------------------------------- control markers

# Turn markers of the common templates: ChatML/Llama 3/Phi `<|...|>`, DeepSeek's
# full-width `<｜...｜>`, Gemma's turn tags and Mistral's [INST] pair.
MARKER = re.compile(r"<\|[^|\s<>]+\|>|<｜[^｜\s]+｜>|<start_of_turn>|<end_of_turn>|\[/?INST\]")
# Written as plain text by Llama 2 and Mistral v0.1/v0.2 on purpose (their vocabularies
# have no such token), so a model's own template is not refused for them.
TEXT_MARKERS_IN_OWN = frozenset({"[INST]", "[/INST]"})


def control_markers(template: str) -> list[str]:
    """The control markers written by the template's literal strings, in first-seen order."""
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:  # `{% generation %}` and such: scan the raw source
        literals = [template]
    else:
        literals = [n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)]
        literals += [n.data for n in ast.find_all(nodes.TemplateData)]
    seen: list[str] = []
    for text in literals:
        for m in MARKER.findall(text):
            if m not in seen:
                seen.append(m)
    return seen


def is_single_token(tokenizer, marker: str) -> bool:
    return len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1


def split_markers(tokenizer, markers: list[str]) -> list[str]:
    """The markers this tokenizer would split into more than one token."""
    return [m for m in markers if not is_single_token(tokenizer, m)]


def style_of(template: str) -> str:
    """A name for a template by the markers it writes (for messages and preview)."""
    for marker, name in (
        ("<|im_start|>", "chatml"),
        ("<start_of_turn>", "gemma"),
        ("<|start_header_id|>", "llama3"),
        ("<｜Assistant｜>", "deepseek"),
        ("[INST]", "mistral"),
    ):
        if marker in template:
            return name
    return "custom"


# --------------------------------------------------------------------------- the resolver


def model_type(config: dict | None) -> str:
    return str((config or {}).get("model_type") or "")


def family_template(tokenizer, config: dict | None) -> tuple[ChatTemplate | None, str]:
    """The first of the architecture's family templates the vocabulary confirms, and
    why none was (empty when one was found or the architecture has no family)."""
    kind = model_type(config)
    refused: list[str] = []
    for name in FAMILIES.get(kind, ()):
        text = FAMILY_TEMPLATES[name]
        split = split_markers(tokenizer, control_markers(text))
        if not split:
            return ChatTemplate(name, "family", text, f"{kind} architecture"), ""
        refused.append(f"{name} ({', '.join(split)} not single tokens of the vocabulary)")
    why = f"the {kind} family's template does not fit this vocabulary: {'; '.join(refused)}" if refused else ""
    return None, why


def template_from_file(path: str | Path) -> ChatTemplate:
    import jinja2

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise TemplateError(f"cannot read the chat template file {p}: {e.strerror or e}") from None
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        if "generation" not in str(e):  # transformers' own `{% generation %}` tag is fine
            raise TemplateError(
                f"the chat template file {p} is not valid Jinja (line {e.lineno}): {e.message}"
            ) from None
    return ChatTemplate(p.stem, "file", text, str(p))


def own_template(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):  # a named set (transformers): the default one renders chats
        t = t.get("default")
    return t if isinstance(t, str) and t.strip() else None


def resolve_template(tokenizer, config: dict | None, override: str | Path | None = None) -> ChatTemplate:
    """The chat template to use for this tokenizer and model config (see the module doc)."""
    if override:
        return template_from_file(override)
    own = own_template(tokenizer)
    if own is not None:
        return ChatTemplate(style_of(own), "model", own)
    found, why = family_template(tokenizer, config)
    if found is not None:
        return found
    plain = plain_template(tokenizer)
    return ChatTemplate(plain.name, "plain", plain.text, why)


def apply_template(tokenizer, config: dict | None, override: str | Path | None = None) -> ChatTemplate:
    """Resolve, and make the tokenizer render with it (its own stays untouched)."""
    template = resolve_template(tokenizer, config, override)
    if template.source != "model":
        tokenizer.chat_template = template.text
    # Kept beside the tokenizer, so what serves it (the HTTP preview) can say which
    # template renders and where it came from.
    tokenizer.openft_template = template
    return template


# --------------------------------------------------------------------------- the check before training

PROBE = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]


def check_template(tokenizer, template: ChatTemplate, examples: list, *, train_on_prompt: bool = False) -> None:
    """Refuse `template` (raise TemplateError) when a control marker it writes into the
    data is not one token of the vocabulary, or when no example would train a token.
    `examples` are `openft.data.types.Example`s; the tokenizer renders with the template
    for the check and is left as it was."""
    previous = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = template.text
    try:
        _check_markers(tokenizer, template, examples)
        if not train_on_prompt:
            _check_loss_mask(tokenizer, template, examples)
    finally:
        tokenizer.chat_template = previous


def _rendered(tokenizer, template: ChatTemplate, messages: list[dict], where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as e:  # noqa: BLE001 - a template's raise_exception and Jinja errors alike
        raise TemplateError(f"the chat template ({template.describe()}) cannot render {where}: {e}; {ADVICE}") from None


def _check_markers(tokenizer, template: ChatTemplate, examples: list, sample: int = 64) -> None:
    markers = control_markers(template.text)
    if template.source == "model":
        markers = [m for m in markers if m not in TEXT_MARKERS_IN_OWN]
    if not markers:
        return
    # Only markers the data actually gets: a tool-call marker never rendered cannot hurt.
    texts = [_rendered(tokenizer, template, PROBE, "a two-turn chat")]
    for ex in [e for e in examples if e.messages is not None][:sample]:
        msgs = [{"role": m.role, "content": m.content} for m in ex.messages]
        texts.append(_rendered(tokenizer, template, msgs, str(ex.where) or "an example"))
    used = [m for m in markers if any(m in t for t in texts)]
    split = split_markers(tokenizer, used)
    if split:
        pieces = ", ".join(f"{m!r} -> {len(tokenizer(m, add_special_tokens=False)['input_ids'])} tokens" for m in split)
        raise TemplateError(
            f"the chat template ({template.describe()}) writes control markers that are not single tokens of "
            f"this model's vocabulary ({pieces}): the model never learnt them as turn boundaries and its answers "
            f"would not stop; {ADVICE}"
        )


def _check_loss_mask(tokenizer, template: ChatTemplate, examples: list) -> None:
    from openft.train.tokenize import encode

    chats = [e for e in examples if e.messages is not None]
    if not chats or len(chats) < len(examples):  # plain-text examples train every token
        return
    for ex in chats:  # usually the first one has trained tokens: stop there
        if encode(tokenizer, ex, 1 << 30).n_trained:
            return
    raise TemplateError(
        f"with the chat template ({template.describe()}) no example has a trained token (the loss mask is "
        f"empty: the template does not render the assistant turns as a continuation of the prompt); {ADVICE}"
    )
