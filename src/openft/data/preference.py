"""Preference pairs: a prompt with a preferred and a rejected answer (DPO data).

Layouts (names as for `--layout`):

- `openai_preference`: OpenAI's preference JSONL, `{"input": {"messages": [...],
  "tools"?}, "preferred_output": [assistant msg], "non_preferred_output": [...]}`;
- `preference`: TRL's `prompt` / `chosen` / `rejected`, each a string or a list of
  messages (TRL's conversational form);
- `sharegpt_preference`: `{"conversations": [{"from", "value"}, ...], "chosen":
  {"from": "gpt", "value"}, "rejected": {...}}` (LLaMA-Factory's DPO files).

Each becomes one `Example` whose `messages` are the prompt followed by the
preferred answer and whose `rejected` is the other answer; `completion_turns` says
how many of the trailing `messages` are the answer. A record is refused with its
place when a side is missing or empty, is not the assistant's, when both sides
are the same, or when the prompt does not end on a user (or tool) turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from openft.data.types import Example, Location, Message

PREFERENCE_LAYOUTS: tuple[str, ...] = ("openai_preference", "preference", "sharegpt_preference")


def guess_preference(keys: Mapping[str, str]) -> str | None:
    """The preference layout a record's (lower-cased) keys look like, or None."""
    if "preferred_output" in keys and "non_preferred_output" in keys:
        return "openai_preference"
    if "chosen" in keys and "rejected" in keys:
        return "sharegpt_preference" if "conversations" in keys else "preference"
    return None


def normalise_pair(record: Mapping[str, Any], where: Location, layout: str, check) -> Example | None:
    """One record of a preference layout as an Example (None: its problems are in `check`)."""
    from openft.data import layouts as L

    if layout == "openai_preference":
        ikey, inp = L._field(record, "input", {})
        if not isinstance(inp, dict):
            check.error(ikey, f"'{ikey}' must be an object with 'messages', got {L._type_name(inp)}")
            return None
        prompt = L._message_list(inp.get("messages"), f"{ikey}.messages", check, sharegpt=False)
        sides = [_side(record, name, check, sharegpt=False) for name in ("preferred_output", "non_preferred_output")]
        tools_from = inp
    elif layout == "preference":
        pkey, raw = L._field(record, "prompt", {})
        prompt = _prompt(raw, pkey, check)
        sides = [_side(record, name, check, sharegpt=False) for name in ("chosen", "rejected")]
        tools_from = record
    else:
        ckey, raw = L._field(record, "conversations", {})
        prompt = L._message_list(raw, ckey, check, sharegpt=True)
        sides = [_side(record, name, check, sharegpt=True) for name in ("chosen", "rejected")]
        tools_from = record
    if prompt is None or None in sides:
        return None
    chosen, rejected = sides
    _check_pair(prompt, chosen, rejected, check)
    messages = prompt + chosen
    tkey = L._lookup(tools_from, "tools")
    tools = L.parse_tools(tools_from[tkey], tkey, check.error) if tkey else None
    if check.problems:
        return None
    return Example(messages=messages, where=where, tools=tools, rejected=rejected, completion_turns=len(chosen))


def _prompt(raw: Any, key: str, check) -> list[Message] | None:
    from openft.data import layouts as L

    if isinstance(raw, list):
        return L._message_list(raw, key, check, sharegpt=False)
    text = L._text(raw, key, check)
    return [Message("user", text)] if text is not None else None


def _side(record: Mapping[str, Any], name: str, check, sharegpt: bool) -> list[Message] | None:
    """One answer: a string, one message, or a list of messages, all the assistant's."""
    from openft.data import layouts as L

    key, raw = L._field(record, name, {})
    if isinstance(raw, str) and not raw.lstrip().startswith("["):
        text = L._text(raw, key, check)
        return [Message("assistant", text)] if text is not None else None
    if isinstance(raw, dict):
        raw = [raw]
    messages = L._message_list(raw, key, check, sharegpt=sharegpt)
    if messages is None:
        return None
    for i, m in enumerate(messages):
        if m.role != "assistant":
            check.error(f"{key}[{i}]", f"an answer must be the assistant's, got a '{m.role}' turn")
            return None
    return messages


def _check_pair(prompt: list[Message], chosen: list[Message], rejected: list[Message], check) -> None:
    if prompt[-1].role not in ("user", "tool"):
        check.error(None, f"the prompt must end on a user turn (it ends on a '{prompt[-1].role}' turn)")
    if [(m.content.strip(), m.tool_calls) for m in chosen] == [(m.content.strip(), m.tool_calls) for m in rejected]:
        check.error(None, "the preferred and the rejected answers are the same: the pair teaches nothing")
