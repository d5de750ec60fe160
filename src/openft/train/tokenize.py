"""Turn examples into token ids and labels, exactly as the model will see them.

The chat template is rendered as text once per conversation; the character span
of every assistant turn is found by rendering growing prefixes of the
conversation, and a token is trained (label = its id) when it starts inside such a
span. Everything else gets label -100 and costs no LM-head compute in training.
"""

from __future__ import annotations

from dataclasses import dataclass

from openft.data.types import Example, Message
from openft.models.reasoning import EMPTY_THINK, THINK_CLOSE, THINK_OPEN, has_empty_think, is_reasoning_model
from openft.models.templates import ADVICE, TemplateError
from openft.models.tools import supports_tools, template_message

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    kwargs = {"tools": tools} if tools else {}  # templates without tool support never see the argument
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def chat_messages(messages: list[Message]) -> list[dict]:
    """Messages as chat templates take them (tool calls with their arguments decoded)."""
    return [
        template_message(m.role, m.content, [c.to_openai() for c in m.tool_calls], m.tool_call_id, m.name)
        for m in messages
    ]


def _check_tools(tokenizer, example: Example) -> None:
    """Tool calls through a template that cannot write them would train empty turns."""
    uses_tools = bool(example.tools) or any(m.tool_calls for m in example.messages or [])
    if uses_tools and not supports_tools(getattr(tokenizer, "chat_template", None)):
        raise TemplateError(
            f"{example.where}: the conversation has tools or tool calls, but the model's chat template does not "
            "render tools; use a model whose template does (Qwen2.5, Llama 3.1) or pass --chat-template FILE"
        )


def assistant_spans(
    tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return (text, [(start, end) char spans of assistant turns]).

    The span starts where the generation prompt ends and runs to the end of the
    turn, so the end-of-turn token is trained: that is how the model learns to stop.
    """
    full = _render(tokenizer, messages, False, tools)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, tools) if i else ""
        through = _render(tokenizer, messages[: i + 1], False, tools)
        if not full.startswith(before) or not full.startswith(through):
            raise TemplateError(
                "the chat template does not render conversations incrementally, so the assistant turns cannot "
                f"be told from the prompt; {ADVICE}"
            )
        end = len(through)
        # Trailing whitespace after the end-of-turn token (ChatML's "\n") is not
        # something the model should be trained to emit.
        while end > len(before) and through[end - 1].isspace():
            end -= 1
        spans.append((len(before), end))
    return full, spans


def encode(tokenizer, example: Example, max_length: int, train_on_prompt: bool = False) -> Encoded:
    if example.messages is None:
        ids = tokenizer(example.text or "", add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        truncated = len(ids) > max_length
        ids = ids[:max_length]
        return Encoded(ids, list(ids), truncated)

    _check_tools(tokenizer, example)
    text, spans = masked_spans(tokenizer, chat_messages(example.messages), example.tools)
    return labelled(tokenizer, text, spans, max_length, train_all=train_on_prompt)


def labelled(tokenizer, text: str, spans: list[tuple[int, int]], max_length: int, train_all: bool = False) -> Encoded:
    """`text` tokenised, each token labelled when it starts inside one of `spans`
    (character ranges, in order), or every token with `train_all`."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    si = 0
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        while si < len(spans) and start >= spans[si][1]:
            si += 1
        if train_all or (si < len(spans) and spans[si][0] <= start < spans[si][1]):
            labels[t] = ids[t]
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


# ---- reasoning templates (<think> blocks)


def masked_spans(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """`assistant_spans`, minus any empty think block the template injected into an
    answer that has none (Qwen3's `<think>\n\n</think>\n\n`): those tokens are context
    the model is given, never something it learns to write. A think block written in
    the data is trained as written. A reasoning template that renders earlier turns
    differently from the one being answered (DeepSeek-R1 and Qwen3 drop the reasoning
    of earlier turns) is trained on its last assistant turn (`reasoning_spans`)."""
    try:
        text, spans = assistant_spans(tokenizer, messages, tools)
        contents = [m.get("content") for m in messages if m["role"] == "assistant"]
    except TemplateError:
        if not is_reasoning_model(tokenizer):
            raise
        text, spans = reasoning_spans(tokenizer, messages, tools)
        contents = [[m for m in messages if m["role"] == "assistant"][-1].get("content")]
    out: list[tuple[int, int]] = []
    for (start, end), content in zip(spans, contents):
        out += _without_injected_think(text, start, end, content)
    return text, out


def _without_injected_think(text: str, start: int, end: int, content) -> list[tuple[int, int]]:
    """The span [start, end) with each empty think block cut out, unless the answer
    as written has one itself (then it is data, trained as written)."""
    if not isinstance(content, str) or has_empty_think(content):
        return [(start, end)]
    out: list[tuple[int, int]] = []
    for m in EMPTY_THINK.finditer(text, start, end):
        if m.start() > start:
            out.append((start, m.start()))
        start = m.end()
    if end > start:
        out.append((start, end))
    return out


def reasoning_spans(
    tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """(text, [span of the last assistant turn]) for a reasoning template whose
    earlier turns are history: the prompt is what the template writes before the
    answer is generated, and the answer follows as the model would write it.

    Where rendering the whole conversation continues the prompt (Qwen3), that
    rendering is the text. Where it does not (DeepSeek-R1's prompt ends with an
    opened `<think>\n` that its rendering of answers strips), the text is the prompt
    plus the answer as written (its opening tag merged into the prompt's), then the
    template's end-of-turn; an answer without reasoning gets the opened block closed
    empty, untrained."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _render(tokenizer, messages[:last], True, tools)
    through = _render(tokenizer, messages[: last + 1], False, tools)
    if through.startswith(prompt):
        end = len(through.rstrip())
        return through, [(len(prompt), max(len(prompt), end))]
    content = messages[last].get("content") or ""
    injected = ""
    if prompt.rstrip().endswith(THINK_OPEN):
        if content.lstrip().startswith(THINK_OPEN):
            content = content.lstrip()[len(THINK_OPEN) :].lstrip("\n")
        elif THINK_CLOSE not in content:
            injected = "\n" + THINK_CLOSE + "\n\n"
    body = content + _end_of_turn(tokenizer)
    start = len(prompt) + len(injected)
    return prompt + injected + body, [(start, start + len(body))]


_SENTINEL = "OPENFT-END-OF-TURN-PROBE"


def _end_of_turn(tokenizer) -> str:
    """What the template writes after an answer's text (`<｜end▁of▁sentence｜>`, `<|im_end|>`)."""
    text = _render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}], False)
    at = text.rfind(_SENTINEL)
    if at < 0:
        raise TemplateError(f"the chat template does not write an assistant's answer as given; {ADVICE}")
    return text[at + len(_SENTINEL) :].rstrip()


def encode_all(tokenizer, examples: list[Example], max_length: int, train_on_prompt: bool = False) -> list[Encoded]:
    return [encode(tokenizer, ex, max_length, train_on_prompt) for ex in examples]


def segments(tokenizer, example: Example, train_on_prompt: bool = False) -> tuple[Encoded, list[tuple[bool, str]]]:
    """The example as the model sees it, cut into runs of (trained?, text)."""
    enc = encode(tokenizer, example, 1 << 30, train_on_prompt)
    out: list[tuple[bool, str]] = []
    run: list[int] = []
    trained: bool | None = None
    for tid, lab in zip(enc.input_ids, enc.labels):
        t = lab != IGNORE
        if trained is not None and t != trained:
            out.append((trained, tokenizer.decode(run)))
            run = []
        run.append(tid)
        trained = t
    if run:
        out.append((bool(trained), tokenizer.decode(run)))
    return enc, out
