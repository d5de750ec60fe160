"""Tool calls between OpenAI's shapes and a model's chat template.

OpenAI (requests, fine-tuning data) carries a call as
`{"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}}`;
Hugging Face chat templates (Qwen2.5's, Hermes-style ones) expect `arguments` as
a JSON object, which they write with `tojson` between `<tool_call>` tags. The
model then answers a tool prompt with such blocks, which `parse_tool_calls` turns
back into OpenAI calls, so no template markup reaches a client.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

# A template renders tools when it reads the `tools` variable and writes the
# assistant's `tool_calls` (Qwen2.5, Llama 3.1+, Hermes, Mistral v3 all do).
_READS_TOOLS = re.compile(r"\btools\b")
_WRITES_CALLS = re.compile(r"\btool_calls\b")

# Qwen/Hermes output: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>.
# The last block may be cut off by the stop token before its closing tag.
TOOL_CALL_TAG = "<tool_call>"


@dataclass(frozen=True)
class ToolStyle:
    """How a family's template writes an assistant's calls, so how its model answers."""

    name: str  # "hermes", "llama3", "mistral"
    opener: str  # what starts the calls in the model's output (may be a special token it drops)
    args_key: str  # the key of a call's arguments object
    blocks: bool  # each call its own <tool_call> block (else: the rest of the answer is the calls)
    forced_start: str  # what a forced answer opens with, before the call's object


HERMES = ToolStyle("hermes", TOOL_CALL_TAG, "arguments", True, TOOL_CALL_TAG + "\n")
LLAMA3 = ToolStyle("llama3", "<|python_tag|>", "parameters", False, "")
MISTRAL = ToolStyle("mistral", "[TOOL_CALLS]", "arguments", False, "[TOOL_CALLS][")
MISTRAL_ID = 9  # Mistral's templates refuse a call id that is not 9 letters and digits
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_TAGLESS = re.compile(r"\s*\{.*\}\s*$", re.DOTALL)  # a whole answer that is one JSON object


def supports_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` definitions and assistant `tool_calls`."""
    return bool(template) and bool(_READS_TOOLS.search(template)) and bool(_WRITES_CALLS.search(template))


def tool_style(template: str | None) -> ToolStyle | None:
    """The form a template writes calls in, or None when openft cannot read it back
    (or the template renders no tools at all)."""
    if not supports_tools(template):
        return None
    if TOOL_CALL_TAG in template:
        return HERMES
    if MISTRAL.opener in template:
        return MISTRAL
    if "<|start_header_id|>" in template and '"parameters"' in template:
        return LLAMA3
    return None


def model_tool_style(tokenizer) -> ToolStyle:
    """The style a loaded model's answers are read in (Hermes where its template has none)."""
    template = getattr(tokenizer, "chat_template", None)
    return tool_style(template if isinstance(template, str) else None) or HERMES


def new_call_id(style: ToolStyle | None = None) -> str:
    if style is MISTRAL:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(MISTRAL_ID))
    return "call_" + secrets.token_hex(12)


def template_message(
    role: str,
    content: str | None,
    tool_calls: list[dict] | None = None,
    tool_call_id: str | None = None,
    name: str | None = None,
) -> dict:
    """One message in the shape HF chat templates expect: OpenAI's, except that
    each call's `arguments` is the decoded object (templates `tojson` it; a JSON
    string there would be written as a quoted string)."""
    out: dict[str, Any] = {"role": role, "content": content or ""}
    if tool_calls:
        out["tool_calls"] = [
            {
                "id": c.get("id"),
                "type": "function",
                "function": {"name": c["function"]["name"], "arguments": _decoded(c["function"]["arguments"])},
            }
            for c in tool_calls
        ]
    if tool_call_id is not None:
        out["tool_call_id"] = tool_call_id
    if name is not None:
        out["name"] = name
    return out


def _decoded(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except (ValueError, RecursionError):
            return arguments  # not ours to fix here: data validation refuses it earlier
    return arguments


def _call(body: str | dict, style: ToolStyle | None = None) -> dict | None:
    """An OpenAI call from one block's JSON, or None when it is not a call."""
    try:
        obj = json.loads(body) if isinstance(body, str) else body
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": new_call_id(style),
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def parse_tool_calls(
    text: str, names: frozenset[str] | set[str] | None = None, style: ToolStyle = HERMES
) -> tuple[str, list[dict]]:
    """Split a generated answer into (content, OpenAI tool calls), read in the
    model's `style`.

    Hermes: every `<tool_call>` block is removed from the content. A block whose
    body is not a call (bad JSON, no name) keeps its body as content, without the
    tags: the client sees what the model said, never template markup. With `names`
    (the tools offered), an answer that is nothing but a bare call object of one of
    them is a call too: small models (Qwen2.5-Coder-0.5B) often drop the tags.
    Llama 3 and Mistral: the calls are the rest of the answer from the opener on
    (which a decoder that drops special tokens leaves out: then a whole answer
    that is calls of offered tools).
    """
    if not style.blocks:
        return _trailing_calls(text, names, style)
    if names and _TAGLESS.match(text) and TOOL_CALL_TAG not in text:
        call = _call(text.strip(), style)
        if call is not None and call["function"]["name"] in names:
            return "", [call]
    calls: list[dict] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        kept.append(text[pos : m.start()])
        pos = m.end()
        call = _call(m.group(1).strip(), style)
        if call is None:
            kept.append(m.group(1))
        else:
            calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).replace("</tool_call>", "")
    return (content.strip() if calls else content), calls


def _trailing_calls(text: str, names, style: ToolStyle) -> tuple[str, list[dict]]:
    """Llama 3 / Mistral: content, then the opener and the calls to the end.
    What does not read as calls stays content (without the opener)."""
    k = text.find(style.opener)
    head, rest = (text[:k], text[k + len(style.opener) :]) if k >= 0 else ("", text)
    calls = _calls_of(rest.strip(), style)
    if calls and (k >= 0 or (names and all(c["function"]["name"] in names for c in calls))):
        return head.strip(), calls
    return text.replace(style.opener, ""), []


def _calls_of(body: str, style: ToolStyle) -> list[dict]:
    """Calls from a JSON object, a JSON list of them, or (Llama 3) objects joined by ';'."""
    if not body.startswith(("{", "[")):
        return []
    try:
        objs = json.loads(body)
    except (ValueError, RecursionError):
        try:  # Llama 3.2 writes several calls as `{...}; {...}`
            objs = [json.loads(p) for p in body.split(";") if p.strip()]
        except (ValueError, RecursionError):
            return []
    objs = objs if isinstance(objs, list) else [objs]
    calls = [_call(o, style) for o in objs]
    return calls if calls and all(c is not None for c in calls) else []


def forced_call_prefill(name: str | None = None, style: ToolStyle = HERMES) -> str:
    """The start of an answer that must be a tool call (`tool_choice` "required"), or
    a call of the tool `name`: the prompt ends with it, so the model can only go on."""
    if name is None:  # Llama 3 has no opener to force: the call's object is begun instead
        return style.forced_start or '{"name": '
    return style.forced_start + '{"name": ' + json.dumps(name, ensure_ascii=False) + f', "{style.args_key}": '


class CallHoldBack:
    """Streaming with tools in play: text is sent as it comes while it can only be
    content, and held from the style's opener (`<tool_call>`; or the start of what
    may become one, with the whitespace before it) to the end, where
    `parse_tool_calls` reads the held rest. An answer with no call streams exactly
    its text."""

    def __init__(self, prefill: str = "", bare: bool = False, style: ToolStyle = HERMES):
        self.held = prefill
        self.in_call = bool(prefill)  # a forced call: everything is the call
        # `bare`: an answer that opens with "{" (Mistral: "[" too) may be a call without
        # its opener (see parse_tool_calls' `names`): held until it ends.
        self.bare, self.started = bare, False
        self.tag = style.opener
        self.bare_starts = ("{", "[") if style is MISTRAL else ("{",)

    def push(self, text: str) -> str:
        """Take the next piece of the answer; return the content that is safe to send now."""
        self.held += text
        if self.in_call:
            return ""
        if not self.started:
            head = self.held.lstrip()
            if not head:
                return ""
            self.started = True
            if self.bare and head.startswith(self.bare_starts):
                self.in_call = True
                return ""
        k = self.held.find(self.tag)
        if k >= 0:
            out, self.held, self.in_call = self.held[:k].rstrip(), self.held[k:], True
            return out
        keep = _partial_tag(self.held, self.tag)
        body = self.held[: len(self.held) - keep]
        safe = body.rstrip()  # whitespace right before a call is not content (parse_tool_calls strips it)
        keep += len(body) - len(safe)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out


def _partial_tag(text: str, tag: str = TOOL_CALL_TAG) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
