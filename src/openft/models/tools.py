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
from typing import Any

# A template renders tools when it reads the `tools` variable and writes the
# assistant's `tool_calls` (Qwen2.5, Llama 3.1+, Hermes, Mistral v3 all do).
_READS_TOOLS = re.compile(r"\btools\b")
_WRITES_CALLS = re.compile(r"\btool_calls\b")

# Qwen/Hermes output: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>.
# The last block may be cut off by the stop token before its closing tag.
TOOL_CALL_TAG = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_TAGLESS = re.compile(r"\s*\{.*\}\s*$", re.DOTALL)  # a whole answer that is one JSON object


def supports_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` definitions and assistant `tool_calls`."""
    return bool(template) and bool(_READS_TOOLS.search(template)) and bool(_WRITES_CALLS.search(template))


def new_call_id() -> str:
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


def _call(body: str) -> dict | None:
    """An OpenAI call from one block's JSON, or None when it is not a call."""
    try:
        obj = json.loads(body)
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
        "id": new_call_id(),
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def parse_tool_calls(text: str, names: frozenset[str] | set[str] | None = None) -> tuple[str, list[dict]]:
    """Split a generated answer into (content, OpenAI tool calls).

    Every `<tool_call>` block is removed from the content. A block whose body is
    not a call (bad JSON, no name) keeps its body as content, without the tags:
    the client sees what the model said, never template markup. With `names` (the
    tools offered), an answer that is nothing but a bare call object of one of them
    is a call too: small models (Qwen2.5-Coder-0.5B) often drop the tags.
    """
    if names and _TAGLESS.match(text) and TOOL_CALL_TAG not in text:
        call = _call(text.strip())
        if call is not None and call["function"]["name"] in names:
            return "", [call]
    calls: list[dict] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        kept.append(text[pos : m.start()])
        pos = m.end()
        call = _call(m.group(1).strip())
        if call is None:
            kept.append(m.group(1))
        else:
            calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).replace("</tool_call>", "")
    return (content.strip() if calls else content), calls


def reads_tool_call_blocks(template: str | None) -> bool:
    """Whether the model writes its calls as `<tool_call>` blocks (Qwen2.5, Hermes),
    the form `parse_tool_calls` reads: the server offers tools only to those."""
    return supports_tools(template) and TOOL_CALL_TAG in (template or "")


def forced_call_prefill(name: str | None = None) -> str:
    """The start of an answer that must be a tool call (`tool_choice` "required"), or
    a call of the tool `name`: the prompt ends with it, so the model can only go on."""
    if name is None:
        return TOOL_CALL_TAG + "\n"
    return TOOL_CALL_TAG + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


class CallHoldBack:
    """Streaming with tools in play: text is sent as it comes while it can only be
    content, and held from the first `<tool_call>` (or the start of what may become
    one, with the whitespace before it) to the end, where `parse_tool_calls` reads
    the held rest. An answer with no call streams exactly its text."""

    def __init__(self, prefill: str = "", bare: bool = False):
        self.held = prefill
        self.in_call = bool(prefill)  # a forced call: everything is the call
        # `bare`: an answer that opens with "{" may be a call without its tags
        # (see parse_tool_calls' `names`): held until it ends.
        self.bare, self.started = bare, False

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
            if self.bare and head.startswith("{"):
                self.in_call = True
                return ""
        k = self.held.find(TOOL_CALL_TAG)
        if k >= 0:
            out, self.held, self.in_call = self.held[:k].rstrip(), self.held[k:], True
            return out
        keep = _partial_tag(self.held)
        body = self.held[: len(self.held) - keep]
        safe = body.rstrip()  # whitespace right before a call is not content (parse_tool_calls strips it)
        keep += len(body) - len(safe)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that is a proper start of `<tool_call>`."""
    for n in range(min(len(text), len(TOOL_CALL_TAG) - 1), 0, -1):
        if TOOL_CALL_TAG.startswith(text[-n:]):
            return n
    return 0
