"""Tool definitions and tool calls in datasets: read both formats, check every call.

- OpenAI's fine-tuning format: a top-level `tools` list of
  `{"type": "function", "function": {"name", "description"?, "parameters"?}}`,
  assistant turns with `tool_calls` (`arguments` a JSON string), `tool` replies
  with `tool_call_id`; the legacy `functions` list, assistant `function_call` and
  `function` role replies too.
- ShareGPT (LLaMA-Factory's glaive data): a `tools` column (a list, or a JSON
  string of one) of bare `{"name", "description", "parameters"}` functions,
  `function_call` turns whose value is `{"name", "arguments"}` JSON (or a list of
  them: parallel calls) and `observation` turns with the tool's answer.

A call must name a declared tool, and its arguments must be a JSON object that
matches the tool's `parameters` schema (the JSON Schema subset tool definitions
use: type, properties, required, enum, const, items, additionalProperties,
anyOf/oneOf). A model trained on calls that break their schema learns to break it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from openft.data.types import Message, ToolCall

JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}

Report = Callable[[str, str], None]  # (field, message): the record's checker


# ------------------------------------------------------------------ definitions


def parse_tools(value: Any, field: str, error: Report) -> list[dict] | None:
    """A record's tool definitions in OpenAI's shape, or None (absent, or errors reported)."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            error(field, f"'{field}' is not valid JSON: {e}")
            return None
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        error(field, f"'{field}' must be a list of tool definitions, got {type(value).__name__}")
        return None
    tools: list[dict] = []
    for i, item in enumerate(value):
        tool = _tool(item, f"{field}[{i}]", error)
        if tool is not None:
            tools.append(tool)
    names = [t["function"]["name"] for t in tools]
    for name in sorted({n for n in names if names.count(n) > 1}):
        error(field, f"tool '{name}' is defined more than once")
    return tools if len(tools) == len(value) else None


def _tool(item: Any, field: str, error: Report) -> dict | None:
    """One definition: OpenAI's `{"type": "function", "function": {...}}` or a bare function."""
    if not isinstance(item, dict):
        error(field, f"a tool definition must be an object, got {type(item).__name__}")
        return None
    if "function" in item and isinstance(item["function"], dict):
        if item.get("type", "function") != "function":
            error(f"{field}.type", f"only function tools are supported, got {str(item.get('type'))[:40]!r}")
            return None
        fn, field = item["function"], f"{field}.function"
    else:
        fn = item
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        error(f"{field}.name", "a tool needs a non-empty 'name'")
        return None
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        error(f"{field}.parameters", f"'parameters' must be a JSON schema object, got {type(params).__name__}")
        return None
    out = {"name": name, **({"description": fn["description"]} if isinstance(fn.get("description"), str) else {})}
    if params is not None:
        out["parameters"] = params
    return {"type": "function", "function": out}


# ------------------------------------------------------------------------ calls


def parse_openai_calls(item: dict, field: str, turn: int, error: Report) -> tuple[ToolCall, ...] | None:
    """An assistant message's `tool_calls` (or legacy `function_call`), or None on errors."""
    raw = item.get("tool_calls")
    if raw is None and isinstance(item.get("function_call"), dict):
        raw, field = (
            [{"type": "function", "function": item["function_call"]}],
            field.replace("tool_calls", "function_call"),
        )
    if not isinstance(raw, list):
        error(field, f"'tool_calls' must be a list, got {type(raw).__name__}")
        return None
    calls: list[ToolCall] = []
    for j, c in enumerate(raw):
        here = f"{field}[{j}]" if "tool_calls" in field else field
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            error(here, 'a tool call must be {"type": "function", "function": {"name", "arguments"}}')
            continue
        call = _call(fn.get("name"), fn.get("arguments"), c.get("id") or f"call_{turn}_{j}", f"{here}.function", error)
        if call is not None:
            calls.append(call)
    return tuple(calls) if len(calls) == len(raw) else None


def parse_sharegpt_calls(value: Any, field: str, turn: int, error: Report) -> tuple[ToolCall, ...] | None:
    """A ShareGPT `function_call` turn's value: `{"name", "arguments"}` JSON, or a list of them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            error(field, f"a function_call turn must hold a JSON call, not valid JSON: {e}")
            return None
    items = value if isinstance(value, list) else [value]
    calls: list[ToolCall] = []
    for j, c in enumerate(items):
        if not isinstance(c, dict):
            error(field, 'a function_call turn must hold {"name": ..., "arguments": {...}}')
            return None
        call = _call(c.get("name"), c.get("arguments", {}), f"call_{turn}_{j}", field, error)
        if call is None:
            return None
        calls.append(call)
    return tuple(calls) or None


def _call(name: Any, arguments: Any, call_id: str, field: str, error: Report) -> ToolCall | None:
    """A call with `arguments` kept as JSON text of an object (OpenAI's form)."""
    if not isinstance(name, str) or not name.strip():
        error(f"{field}.name" if field.endswith("function") else field, "a tool call needs a non-empty 'name'")
        return None
    where = f"{field}.arguments" if field.endswith("function") else field
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except (ValueError, RecursionError) as e:
            error(where, f"arguments of the call to '{name}' are not valid JSON: {e}")
            return None
    else:
        decoded, arguments = arguments, json.dumps(arguments, ensure_ascii=False)
    if not isinstance(decoded, dict):
        error(where, f"arguments of the call to '{name}' must be a JSON object, got {type(decoded).__name__}")
        return None
    return ToolCall(id=str(call_id), name=name, arguments=arguments)


# ------------------------------------------------------------------- validation


def check_calls(messages: list[Message], tools: list[dict] | None, field_of: Callable[[int, int], str], error: Report):
    """Every call of every turn names a declared tool and its arguments fit the schema.
    `field_of(turn, k)` names the k-th call of a turn in the record's own field names."""
    declared = {t["function"]["name"]: t["function"] for t in tools or []}
    for i, m in enumerate(messages):
        for k, call in enumerate(m.tool_calls):
            here = field_of(i, k)
            fn = declared.get(call.name)
            if fn is None:
                known = ", ".join(declared) or "none are declared: add a 'tools' list to the record"
                error(here, f"turn {i} calls tool '{call.name[:60]}', which is not declared (declared: {known})")
                continue
            problem = schema_problem(json.loads(call.arguments), fn.get("parameters") or {})
            if problem:
                error(here, f"turn {i}: arguments of the call to '{call.name}' do not match its schema: {problem}")


def schema_problem(value: Any, schema: dict, path: str = "arguments") -> str | None:
    """The first way `value` breaks `schema` (the subset above), or None when it fits."""
    if not isinstance(schema, dict):
        return None
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and not any(schema_problem(value, s, path) is None for s in schema[key]):
            return f"{path} matches none of the {key} choices"
    if "const" in schema and value != schema["const"]:
        return f"{path} must be {json.dumps(schema['const'], ensure_ascii=False)}"
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        return f"{path} is {_short(value)}, not one of {_short(schema['enum'])}"
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    if kinds and not any(_is(value, k) for k in kinds):
        return f"{path} must be {' or '.join(kinds)}, got {_short(value)}"
    if isinstance(value, dict):
        return _object_problem(value, schema, path)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            if problem := schema_problem(v, schema["items"], f"{path}[{i}]"):
                return problem
    return None


def _object_problem(value: dict, schema: dict, path: str) -> str | None:
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    for name in schema.get("required") or []:
        if name not in value:
            return f"{path} lacks the required property '{name}'"
    extra = schema.get("additionalProperties", True)
    for name, v in value.items():
        if name in props:
            if problem := schema_problem(v, props[name], f"{path}.{name}"):
                return problem
        elif extra is False:
            return f"{path} has the property '{name[:60]}', which the schema does not define"
        elif isinstance(extra, dict) and (problem := schema_problem(v, extra, f"{path}.{name}")):
            return problem
    return None


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False  # JSON's true is no number, though Python's bool is an int
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, JSON_TYPES.get(kind, object))


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."
