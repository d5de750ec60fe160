"""Recognise a dataset's layout from its records' keys and turn each record into
an `Example`.

Layouts (the names are the API, used by `--layout`):

- `messages`: OpenAI chat, `{"messages": [{"role", "content"}, ...], "tools"?}`
  (assistant `tool_calls` and `tool` replies: see data/tools.py).
- `sharegpt`: `{"conversations": [{"from", "value"}, ...], "system"?, "tools"?}`
  (also under a `messages` key when its items use from/value; `function_call` and
  `observation` turns).
- `alpaca`: `instruction`, `input`?, `output`, `system`?, `history`? (also Dolly's
  `context`/`response` names for input/output).
- `prompt_completion`: `prompt`, `completion` (strings, or message lists as TRL's
  conversational prompt-completion data has them).
- `qa`: a question column and an answer column, found by common names or named
  with `columns={"question": ..., "answer": ..., "system": ...}`.
- `text`: a `text` (or `content`) field, for continued pretraining.
- `openai_preference`, `preference`, `sharegpt_preference`: preference pairs for
  DPO (data/preference.py).

The layout is decided once per dataset by majority, so one odd record is
reported as that record's error instead of silently switching layouts. Every
record is checked completely: all its problems are reported, not the first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from openft.data.preference import PREFERENCE_LAYOUTS, guess_preference, normalise_pair
from openft.data.readers import json_loads, value_problem
from openft.data.tools import check_calls, parse_openai_calls, parse_sharegpt_calls, parse_tools
from openft.data.types import ROLES, Example, Location, Message, Problem

LAYOUTS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "prompt_completion", "qa", "text", *PREFERENCE_LAYOUTS)

# The field names each layout reads; `columns` may rename any of them. Order
# matters: a `columns` mapping picks the first layout that has all its keys.
FIELDS: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer", "system"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
    "preference": ("prompt", "chosen", "rejected"),
    "sharegpt_preference": ("conversations", "chosen", "rejected"),
}

# Question/answer column pairs recognised without a mapping (case-insensitive).
# input/output only counts when there is no `instruction` (then it is alpaca).
QA_PAIRS: tuple[tuple[str, str], ...] = (
    ("question", "answer"),
    ("q", "a"),
    ("query", "response"),
    ("question", "response"),
    ("query", "answer"),
    ("input", "output"),
    ("prompt", "response"),
)

# OpenAI names that map onto our four roles.
ROLE_ALIASES = {"developer": "system", "function": "tool"}

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "function_response": "tool",
}

LAYOUT_HINT = (
    "use --layout {" + ",".join(LAYOUTS) + "} to choose one, or --columns "
    "question=COL,answer=COL to name the question and answer columns"
)


def check_columns(columns: Mapping[str, str] | None) -> None:
    """Reject mapping keys that no layout reads (a typo would otherwise be ignored)."""
    known = sorted({f for fs in FIELDS.values() for f in fs})
    for key, value in (columns or {}).items():
        if key not in known:
            raise ValueError(f"unknown column role '{key}' in columns: accepted are {', '.join(known)}")
        if not isinstance(value, str) or not value:
            raise ValueError(f"column for '{key}' must be a non-empty column name")


def layout_for_columns(columns: Mapping[str, str]) -> str:
    """The layout a `columns` mapping implies: the first whose fields cover its keys."""
    for layout, fields in FIELDS.items():
        if set(columns) <= set(fields):
            return layout
    raise ValueError(f"columns {', '.join(columns)} do not belong to one layout; fields per layout: {FIELDS}")


# --------------------------------------------------------------------------- detection


def _keymap(record: Mapping[str, Any]) -> dict[str, str]:
    """Lower-cased key -> actual key, for case-insensitive lookups."""
    return {str(k).lower(): k for k in record}


def _lookup(record: Mapping[str, Any], name: str) -> str | None:
    """The record's actual key for `name`: exact, else case-insensitive."""
    if name in record:
        return name
    return _keymap(record).get(name.lower())


def qa_columns(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """The (question, answer) keys of a record, by common names."""
    keys = _keymap(record)
    if "instruction" in keys:
        return None
    for q, a in QA_PAIRS:
        if q in keys and a in keys:
            return keys[q], keys[a]
    return None


def _item_keys(value: Any) -> set[str]:
    if isinstance(value, str):  # CSV/Parquet cells may hold the list as JSON text
        value = _maybe_json_list(value)
    if isinstance(value, list):
        return {k for item in value[:3] if isinstance(item, dict) for k in item}
    return set()


def guess_layout(record: Mapping[str, Any]) -> str | None:
    """The layout one record looks like, or None."""
    keys = _keymap(record)
    if pair := guess_preference(keys):  # before `conversations`: LLaMA-Factory's DPO files have one too
        return pair
    if "messages" in keys:
        inner = _item_keys(record[keys["messages"]])
        return "sharegpt" if {"from", "value"} & inner and "role" not in inner else "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and ("output" in keys or "response" in keys):
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if qa_columns(record):
        return "qa"
    if "text" in keys or "content" in keys:
        return "text"
    return None


def detect_layout(records: Iterable[Mapping[str, Any]]) -> tuple[str | None, Counter]:
    """The majority layout of the records (ties go to the order of `LAYOUTS`), and
    the counts of every key seen, for the error message when nothing matches."""
    votes: Counter[str] = Counter()
    keys_seen: Counter[str] = Counter()
    for record in records:
        keys_seen.update(str(k) for k in record)
        guess = guess_layout(record)
        if guess:
            votes[guess] += 1
    if not votes:
        return None, keys_seen
    return min(votes, key=lambda name: (-votes[name], LAYOUTS.index(name))), keys_seen


def no_layout_message(keys_seen: Counter) -> str:
    # Keys come from the file: cut long ones so the message stays readable.
    keys = ", ".join(k if len(k) <= 40 else k[:40] + "..." for k, _ in keys_seen.most_common(15)) or "(none)"
    return (
        f"cannot tell the dataset's layout from its fields (seen: {keys}); accepted "
        f"layouts: {', '.join(LAYOUTS)}; {LAYOUT_HINT}"
    )


# --------------------------------------------------------------------------- normalising


class _Checker:
    """Collects a record's problems with its location filled in (and the record's
    tool definitions, for the layouts that read them)."""

    def __init__(self, where: Location):
        self.where = where
        self.problems: list[Problem] = []
        self.tools: list[dict] | None = None

    def error(self, field: str | None, message: str) -> None:
        self.problems.append(
            Problem(message, file=self.where.file, line=self.where.line, record=self.where.record, field=field)
        )


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _maybe_json_list(value: str) -> Any:
    """A CSV/Parquet cell holding a JSON list, decoded; anything else (including
    JSON too deep, with a huge integer or a bad surrogate) stays the string it is,
    and the caller then reports it as not being a list."""
    if value.lstrip().startswith("["):
        decoded, message, _ = json_loads(value)
        if message is None and value_problem(decoded) is None:
            return decoded
    return value


def _short(value: Any, limit: int = 60) -> str:
    """repr() of a value from the file, cut short: a 1 MB 'role' must not become a
    1 MB error message."""
    text = repr(value) if not isinstance(value, (list, dict)) else _type_name(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _text(value: Any, field: str, check: _Checker, required: bool = True) -> str | None:
    """A string field: missing/null is allowed only when not required; empty is an error."""
    if value is None:
        if required:
            check.error(field, f"missing required field '{field}'")
        return None
    if not isinstance(value, str):
        check.error(field, f"'{field}' must be a string, got {_type_name(value)}")
        return None
    if required and not value.strip():
        check.error(field, f"empty '{field}'")
        return None
    return value


def _content(value: Any, field: str, check: _Checker) -> str | None:
    """Message content: a string or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and "type" in part:
                check.error(f"{field}[{i}]", f"only text content parts are supported, got {_short(part['type'])}")
                return None
            else:
                check.error(f"{field}[{i}]", 'content part must be {"type": "text", "text": ...}')
                return None
        value = "\n".join(texts)
    if not isinstance(value, str):
        check.error(field, f"content must be a string or a list of text parts, got {_type_name(value)}")
        return None
    if not value.strip():
        check.error(field, "empty content")
        return None
    return value


def _message_list(value: Any, field: str, check: _Checker, sharegpt: bool) -> list[Message] | None:
    """Parse a list of chat turns; every bad turn is reported, then None is returned."""
    if isinstance(value, str):
        text, value = value, _maybe_json_list(value)
        if value is text and text.lstrip().startswith("["):
            decoded, why, _ = json_loads(text)
            why = why or value_problem(decoded)
            check.error(field, f"'{field}' holds text that is not a usable JSON list of messages: {why}")
            return None
    if value is None:
        check.error(field, f"missing required field '{field}'")
        return None
    if not isinstance(value, list):
        check.error(field, f"'{field}' must be a list of messages, got {_type_name(value)}")
        return None
    if not value:
        check.error(field, "no messages")
        return None
    before = len(check.problems)
    out: list[Message] = []
    for i, item in enumerate(value):
        here = f"{field}[{i}]"
        if not isinstance(item, dict):
            check.error(here, f"message must be an object, got {_type_name(item)}")
            continue
        role_key, content_key = ("from", "value") if sharegpt and "from" in item else ("role", "content")
        if content_key == "value" and "value" not in item and "content" in item:
            content_key = "content"  # XML turns: <turn from="human">text</turn>
        raw_role = item.get(role_key)
        if raw_role is None:
            check.error(f"{here}.{role_key}", f"missing '{role_key}'")
            role = None
        elif sharegpt:
            role = SHAREGPT_ROLES.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
            if role is None:
                check.error(
                    f"{here}.{role_key}", f"unknown role {_short(raw_role)}: allowed are " + ", ".join(SHAREGPT_ROLES)
                )
        else:
            role = ROLE_ALIASES.get(raw_role, raw_role) if isinstance(raw_role, str) else None
            if role not in ROLES:
                check.error(f"{here}.{role_key}", f"unknown role {_short(raw_role)}: allowed are " + ", ".join(ROLES))
                role = None
        raw_content = item.get(content_key)
        if role == "assistant" and (_calls_openai(item, sharegpt) or _calls_sharegpt(raw_role, sharegpt)):
            calls = (
                parse_sharegpt_calls(raw_content, f"{here}.{content_key}", i, check.error)
                if sharegpt
                else parse_openai_calls(item, f"{here}.tool_calls", i, check.error)
            )
            # A call turn may carry text beside its calls (OpenAI's), never instead of them.
            text = None if sharegpt or raw_content in (None, "") else _content(raw_content, f"{here}.content", check)
            if calls is not None:
                out.append(Message("assistant", text or "", calls))
            continue
        if content_key not in item and raw_content is None:
            check.error(f"{here}.{content_key}", f"missing '{content_key}'")
            continue
        content = _content(raw_content, f"{here}.{content_key}", check)
        if role is not None and content is not None:
            out.append(_reply(item, content) if role == "tool" else Message(role, content))
    return _linked(out) if len(check.problems) == before else None


def _calls_openai(item: dict, sharegpt: bool) -> bool:
    return not sharegpt and bool(item.get("tool_calls") or item.get("function_call"))


def _calls_sharegpt(raw_role: Any, sharegpt: bool) -> bool:
    return sharegpt and isinstance(raw_role, str) and raw_role.lower() == "function_call"


def _reply(item: dict, content: str) -> Message:
    """A tool's answer, with the call it answers and the tool's name where given."""
    call_id, name = item.get("tool_call_id"), item.get("name")
    return Message(
        "tool",
        content,
        tool_call_id=call_id if isinstance(call_id, str) else None,
        name=name if isinstance(name, str) else None,
    )


def _linked(messages: list[Message]) -> list[Message]:
    """Tool replies without a `tool_call_id` (ShareGPT observations, legacy function
    replies) answer the latest assistant turn's calls in order: give them those ids,
    as OpenAI's format would have them."""
    out: list[Message] = []
    pending: list = []
    for m in messages:
        if m.role == "assistant":
            pending = list(m.tool_calls)
        elif m.role == "tool" and pending:
            call = pending.pop(0)
            if m.tool_call_id is None:
                m = Message("tool", m.content, tool_call_id=call.id, name=m.name or call.name)
        out.append(m)
    return out


def _check_turns(messages: list[Message], field: str, check: _Checker) -> None:
    """A trainable conversation has an assistant turn and ends with one."""
    if not any(m.role == "assistant" for m in messages):
        check.error(field, "no assistant turn: there is nothing to learn from this conversation")
    elif messages[-1].role != "assistant":
        check.error(
            f"{field}[{len(messages) - 1}]", f"last turn must be from the assistant (got '{messages[-1].role}')"
        )


def _field(record: Mapping[str, Any], name: str, columns: Mapping[str, str]) -> tuple[str, Any]:
    """(key as named in the file, value) for a layout field, honouring `columns`."""
    wanted = columns.get(name, name)
    key = _lookup(record, wanted)
    return (key if key is not None else wanted), (record[key] if key is not None else None)


def normalise(
    record: Mapping[str, Any], where: Location, layout: str, columns: Mapping[str, str] | None = None
) -> tuple[Example | None, list[Problem]]:
    """Turn one raw record into an `Example`, or return None and all its problems."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}': accepted are {', '.join(LAYOUTS)}")
    columns = columns or {}
    check = _Checker(where)
    if layout in PREFERENCE_LAYOUTS:
        return normalise_pair(record, where, layout, check), check.problems
    if layout == "text":
        key, value = _field(record, "text", columns)
        if value is None and "text" not in columns and _lookup(record, "content"):
            key, value = _field(record, "content", columns)
        text = _text(value, key, check)
        return (Example(text=text, where=where) if text is not None else None), check.problems
    messages = {
        "messages": _messages_layout,
        "sharegpt": _sharegpt_layout,
        "alpaca": _alpaca_layout,
        "prompt_completion": _prompt_completion_layout,
        "qa": _qa_layout,
    }[layout](record, columns, check)
    if messages is None or check.problems:
        return None, check.problems
    return Example(messages=messages, where=where, tools=check.tools), []


def _tools(record, messages: list[Message], field_of, check: _Checker) -> None:
    """Read the record's tool definitions (`tools`, or OpenAI's legacy `functions`)
    and check every call against them; `field_of(turn, k)` names a call's field."""
    tkey = _lookup(record, "tools") or _lookup(record, "functions")
    tools = parse_tools(record[tkey], tkey, check.error) if tkey else None
    if tkey and tools is None and any(p.field and p.field.startswith(tkey) for p in check.problems):
        return  # the definitions are broken: checking calls against them says nothing more
    check_calls(messages, tools, field_of, check.error)
    check.tools = tools


def _openai_call_field(key: str):
    return lambda i, k: f"{key}[{i}].tool_calls[{k}]"


def _messages_layout(record, columns, check) -> list[Message] | None:
    key, value = _field(record, "messages", columns)
    messages = _message_list(value, key, check, sharegpt=False)
    if messages:
        _check_turns(messages, key, check)
        _tools(record, messages, _openai_call_field(key), check)
    return messages


def _sharegpt_layout(record, columns, check) -> list[Message] | None:
    key, value = _field(record, "conversations", columns)
    if value is None and "conversations" not in columns:
        key, value = _field(record, "messages", columns)
        key = key if value is not None else "conversations"
    messages = _message_list(value, key, check, sharegpt=True)
    skey, system = _field(record, "system", columns)
    system = _text(system, skey, check, required=False)
    if messages is None:
        return None
    _check_turns(messages, key, check)
    _tools(record, messages, lambda i, k: f"{key}[{i}].value", check)  # before a system turn shifts the turns
    if system and system.strip() and not (messages and messages[0].role == "system"):
        messages.insert(0, Message("system", system))
    return messages


def _system_prefix(record, columns, check) -> list[Message]:
    key, value = _field(record, "system", columns)
    system = _text(value, key, check, required=False)
    return [Message("system", system)] if system and system.strip() else []


def _alpaca_layout(record, columns, check) -> list[Message] | None:
    ikey, instruction = _field(record, "instruction", columns)
    nkey, inp = _field(record, "input", columns)
    if inp is None and "input" not in columns and _lookup(record, "context"):
        nkey, inp = _field(record, "context", columns)  # Dolly
    okey, output = _field(record, "output", columns)
    if output is None and "output" not in columns and _lookup(record, "response"):
        okey, output = _field(record, "response", columns)  # Dolly
    if instruction is None:
        check.error(ikey, f"missing required field '{ikey}'")
    instruction = _text(instruction, ikey, check, required=False)
    inp = _text(inp, nkey, check, required=False)
    output = _text(output, okey, check)
    user = "\n\n".join(p for p in (instruction, inp) if p and p.strip())
    if instruction is not None and not user:
        check.error(ikey, f"empty '{ikey}' (and no '{nkey}')")
    messages = _system_prefix(record, columns, check)
    hkey, history = _field(record, "history", columns)
    if history is not None:
        if not isinstance(history, list):
            check.error(hkey, f"'{hkey}' must be a list of [question, answer] pairs, got {_type_name(history)}")
        for i, pair in enumerate(history if isinstance(history, list) else []):
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(isinstance(t, str) and t.strip() for t in pair)
            ):
                check.error(f"{hkey}[{i}]", "history entries must be [question, answer] pairs of non-empty strings")
                continue
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    if check.problems:
        return None
    return messages + [Message("user", user), Message("assistant", output)]


def _prompt_completion_layout(record, columns, check) -> list[Message] | None:
    pkey, prompt = _field(record, "prompt", columns)
    ckey, completion = _field(record, "completion", columns)
    # TRL's conversational form: prompt and completion are message lists.
    if isinstance(prompt, list):
        before = _message_list(prompt, pkey, check, sharegpt=False)
    else:
        text = _text(prompt, pkey, check)
        before = [Message("user", text)] if text is not None else None
    if isinstance(completion, list):
        after = _message_list(completion, ckey, check, sharegpt=False)
    else:
        text = _text(completion, ckey, check)
        after = [Message("assistant", text)] if text is not None else None
    if before is None or after is None:
        return None
    messages = before + after
    _check_turns(messages, ckey, check)
    n = len(before)  # a call's field: in the prompt's list or the completion's
    prompt_field, completion_field = _openai_call_field(pkey), _openai_call_field(ckey)
    _tools(record, messages, lambda i, k: prompt_field(i, k) if i < n else completion_field(i - n, k), check)
    return messages


def _qa_layout(record, columns, check) -> list[Message] | None:
    if "question" in columns or "answer" in columns:
        qkey, question = _field(record, "question", columns)
        akey, answer = _field(record, "answer", columns)
    else:
        found = qa_columns(record)
        if found is None:
            names = [str(k)[:40] for k in list(record)[:15]]
            check.error(
                None,
                "no question/answer columns found (fields: "
                f"{', '.join(names)}{' ...' if len(record) > 15 else ''}); "
                "name them with --columns question=COL,answer=COL",
            )
            return None
        (qkey, akey) = found
        question, answer = record[qkey], record[akey]
    question = _text(question, qkey, check)
    answer = _text(answer, akey, check)
    if "system" in columns:
        skey, system = _field(record, "system", columns)
    else:
        skey = _lookup(record, "system") or _lookup(record, "system_prompt") or "system"
        system = record.get(skey)
    system = _text(system, skey, check, required=False)
    if question is None or answer is None or check.problems:
        return None
    prefix = [Message("system", system)] if system and system.strip() else []
    return prefix + [Message("user", question), Message("assistant", answer)]
