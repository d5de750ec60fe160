"""Templates as OpenAI's graders and evals render them: `{{item.answer}}`,
`{{sample.output_text}}`, `{{ sample.output_json.score }}`, `{{item.tags[0]}}`.

A placeholder names a namespace (`item`: the dataset row; `sample`: the model's
answer) and a path of keys and list indexes. A string value is inserted as it is,
anything else as compact JSON. A name the namespaces do not hold is an error (the
grader's `invalid_variable_error`), never an empty string that would let a typo
grade every answer the same.
"""

from __future__ import annotations

import json
import re

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_SEGMENT = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]")
NAMESPACES = ("item", "sample")


class TemplateVariableError(ValueError):
    """A placeholder names nothing in the namespaces it is rendered with."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{{{{{name}}}}}: {reason}")
        self.name = name


def parse_path(name: str) -> list[str | int]:
    """`item.a.b[2]` -> ["item", "a", "b", 2]; raises on anything else."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(name):
        m = _SEGMENT.match(name, pos)
        if not m or (pos == 0 and m.group(0).startswith(".")):
            raise TemplateVariableError(name, "not a variable path (namespace.key.key[index])")
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not parts or parts[0] not in NAMESPACES:
        raise TemplateVariableError(name, f"variables start with {' or '.join(NAMESPACES)}")
    return parts


def lookup(name: str, scope: dict):
    value = scope
    for part in parse_path(name):
        if isinstance(part, int):
            if not isinstance(value, list) or part >= len(value):
                raise TemplateVariableError(name, f"no element [{part}]")
            value = value[part]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise TemplateVariableError(name, f"no field {part!r}")
    return value


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def render(template: str, item: dict | None = None, sample: dict | None = None) -> str:
    """The template with every placeholder replaced; raises TemplateVariableError."""
    scope = {"item": item or {}, "sample": sample if sample is not None else {}}
    return PLACEHOLDER.sub(lambda m: _text(lookup(m.group(1), scope)), template)


def check_template(template: str, namespaces: tuple[str, ...] = NAMESPACES) -> None:
    """Raises TemplateVariableError for a placeholder that can never render: a bad
    path, or a namespace this context does not offer (no `sample` in a prompt)."""
    for m in PLACEHOLDER.finditer(template):
        parts = parse_path(m.group(1))
        if parts[0] not in namespaces:
            raise TemplateVariableError(m.group(1), f"only {', '.join(namespaces)} can be used here")


def sample_namespace(output_text: str, tool_calls: list[dict] | None = None) -> dict:
    """The `sample` a grader sees: the answer, its JSON when it is JSON, its tool calls."""
    try:
        output_json = json.loads(output_text)
    except (ValueError, TypeError):
        output_json = None
    return {
        "output_text": output_text,
        "output_json": output_json,
        "output_tools": tool_calls or [],
        "choices": [{"message": {"role": "assistant", "content": output_text, "tool_calls": tool_calls or []}}],
    }
