"""The Evals API's objects, checked: an eval's data source config and testing
criteria, a run's data source and its items. Every problem is an `EvalSpecError`
naming the field (`testing_criteria[1].operation`, `data_source.source.content[3]`),
which the API answers with a 400 before anything is stored or run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from openft.eval.graders import Grader, GraderError, parse_grader, parse_messages
from openft.eval.render import TemplateVariableError, lookup, parse_path

MAX_ITEMS = 10_000


class EvalSpecError(GraderError):
    """A bad eval or run field; `param` is its path."""


def check_data_source_config(config) -> dict:
    """The stored form of a `custom` data source config: {"type", "schema"}, where
    the schema is {"type": "object", "properties": {"item": item_schema, ...}} as
    OpenAI returns it."""
    if not isinstance(config, dict) or config.get("type") != "custom":
        kind = config.get("type") if isinstance(config, dict) else None
        raise EvalSpecError(
            "data_source_config.type",
            f"{kind!r} is not supported: openft takes 'custom' (items you provide; it stores no chat logs)",
        )
    schema = config.get("item_schema")
    if not isinstance(schema, dict):
        raise EvalSpecError("data_source_config.item_schema", "must be a JSON schema object")
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise EvalSpecError("data_source_config.item_schema", f"is not a valid JSON schema: {e.message}") from None
    properties = {"item": schema}
    required = ["item"]
    if config.get("include_sample_schema"):
        properties["sample"] = {"type": "object"}
        required.append("sample")
    return {"type": "custom", "schema": {"type": "object", "properties": properties, "required": required}}


def parse_criteria(criteria) -> list[Grader]:
    if not isinstance(criteria, list) or not criteria:
        raise EvalSpecError("testing_criteria", "must be a non-empty list of graders")
    parsed = [parse_grader(c, f"testing_criteria[{i}]") for i, c in enumerate(criteria)]
    names = [g.name for g in parsed]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise EvalSpecError(f"testing_criteria[{i}].name", f"{name!r} is used twice: each criterion needs its own")
    return parsed


@dataclass
class RunSource:
    """A run's data source: where its items come from, and for `completions` how
    each item becomes a prompt for the model."""

    kind: str  # completions | jsonl
    source: dict  # {"type": "file_content", "content": [...]} or {"type": "file_id", "id": ...}
    model: str | None = None
    template: tuple[tuple[str, str], ...] | None = None  # (role, content template)
    item_reference: str | None = None  # "item.messages": the item holds the conversation
    sampling: dict = field(default_factory=dict)


def _source(obj, param: str) -> dict:
    if not isinstance(obj, dict) or obj.get("type") not in ("file_content", "file_id"):
        raise EvalSpecError(f"{param}.type", "must be file_content or file_id (openft stores no completions)")
    if obj["type"] == "file_id":
        if not isinstance(obj.get("id"), str):
            raise EvalSpecError(f"{param}.id", "must be a file id")
        return {"type": "file_id", "id": obj["id"]}
    content = obj.get("content")
    if not isinstance(content, list) or not content:
        raise EvalSpecError(f"{param}.content", "must be a non-empty list of {item: {...}} rows")
    if len(content) > MAX_ITEMS:
        raise EvalSpecError(f"{param}.content", f"has {len(content)} rows; at most {MAX_ITEMS}")
    return {"type": "file_content", "content": content}


def _input_messages(obj, param: str) -> tuple[tuple | None, str | None]:
    if not isinstance(obj, dict):
        raise EvalSpecError(param, "a completions run needs input_messages (a template or an item_reference)")
    if obj.get("type") == "template":
        return parse_messages(obj.get("template"), f"{param}.template", namespaces=("item",)), None
    if obj.get("type") == "item_reference":
        ref = obj.get("item_reference")
        try:
            if not isinstance(ref, str) or parse_path(ref)[0] != "item":
                raise TemplateVariableError(str(ref), "must name a field of item")
        except TemplateVariableError as e:
            raise EvalSpecError(f"{param}.item_reference", str(e)) from None
        return None, ref
    raise EvalSpecError(f"{param}.type", "must be template or item_reference")


def parse_run_source(data_source) -> RunSource:
    if not isinstance(data_source, dict) or data_source.get("type") not in ("completions", "jsonl"):
        raise EvalSpecError("data_source.type", "must be completions (sample a model) or jsonl (items with samples)")
    src = _source(data_source.get("source"), "data_source.source")
    if data_source["type"] == "jsonl":
        return RunSource("jsonl", src)
    model = data_source.get("model")
    if not isinstance(model, str) or not model:
        raise EvalSpecError("data_source.model", "a completions run needs the model to sample")
    template, ref = _input_messages(data_source.get("input_messages"), "data_source.input_messages")
    sampling = data_source.get("sampling_params") or {}
    if not isinstance(sampling, dict):
        raise EvalSpecError("data_source.sampling_params", "must be an object")
    return RunSource("completions", src, model, template, ref, sampling)


def rows_from_jsonl(text: str, param: str) -> list:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise EvalSpecError(param, f"line {n} is not JSON: {e}") from None
    if not rows:
        raise EvalSpecError(param, "the file holds no rows")
    if len(rows) > MAX_ITEMS:
        raise EvalSpecError(param, f"has {len(rows)} rows; at most {MAX_ITEMS}")
    return rows


def check_items(rows: list, item_schema: dict, param: str) -> list[dict]:
    """Each row as {"item": ..., "sample": ...?}; a row may be the item itself. Items
    are checked against the eval's item schema, the first bad one named by its index."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(item_schema)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise EvalSpecError(f"{param}[{i}]", "must be an object")
        entry = row if "item" in row and isinstance(row["item"], dict) else {"item": row}
        error = next(iter(validator.iter_errors(entry["item"])), None)
        if error is not None:
            where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            raise EvalSpecError(f"{param}[{i}].item{where}", f"does not match the eval's item_schema: {error.message}")
        out.append(entry)
    return out


def prompt_for(source: RunSource, item: dict) -> list[dict]:
    """The conversation a completions run sends to the model for one item."""
    from openft.eval.render import render

    if source.template is not None:
        return [{"role": role, "content": render(text, item)} for role, text in source.template]
    value = lookup(source.item_reference, {"item": item, "sample": {}})
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m.get("content") or ""} for m in value]
    raise TemplateVariableError(source.item_reference, "must hold a string or a list of messages")
