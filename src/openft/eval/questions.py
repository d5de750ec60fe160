"""Read the fixed question set that the before/after comparison asks both models.

A question file is JSONL (one `{"question": ..., "reference": ...}` object a line;
`prompt`/`answer` are accepted as aliases because that is how many datasets spell
them), CSV with a `question` header (optional `reference`), or a JSON array of the
same objects. The reference answer is optional: without one a question is still
asked and shown side by side, just not scored.

A tool question (JSON only) also carries `tools` (OpenAI definitions, offered to
the model through its template) and the call it expects, `tool_call`:
`{"name": ..., "arguments": {...}?}`; answers are then scored on the call (right
tool, arguments valid for its schema, equal to the expected ones when given).

Every problem is reported with its file and line (or record), and all of them are
gathered into one error, so a user fixes the whole file in one pass instead of one
line per run.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from openft.data.tools import parse_tools
from openft.data.types import Location

# First name wins when a record carries more than one of them.
QUESTION_KEYS = ("question", "prompt")
REFERENCE_KEYS = ("reference", "answer")


class QuestionFileError(ValueError):
    """A question file that cannot be used; `problems` lists every `file:line: why`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class Question:
    question: str
    reference: str | None
    where: Location
    tools: list[dict] | None = None  # OpenAI tool definitions offered with the question
    tool_call: dict | None = None  # the expected call: {"name", "arguments": dict | None}


def load_questions(path: str | Path) -> list[Question]:
    """Parse a JSONL, JSON-array or CSV question file. Raises `QuestionFileError`."""
    path = Path(path)
    name = path.name
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which
        # would otherwise become part of the first header or the first JSON line.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise QuestionFileError([f"{path}: no such file"]) from None
    except UnicodeDecodeError as e:
        raise QuestionFileError([f"{name}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None

    problems: list[str] = []
    fmt = _detect_format(path, text)
    if fmt == "csv":
        questions = _parse_csv(text, name, problems)
    elif fmt == "json":
        questions = _parse_json_array(text, name, problems)
    else:
        questions = _parse_jsonl(text, name, problems)
    if not questions and not problems:
        problems.append(f"{name}: no questions found")
    if problems:
        raise QuestionFileError(problems)
    return questions


def _detect_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    head = text.lstrip()[:1]
    if head == "[":
        return "json"  # a JSON array, whatever the extension says
    if suffix in (".jsonl", ".json", ".ndjson") or head == "{":
        return "jsonl"
    return "csv"


def _from_record(obj: object, where: Location, problems: list[str]) -> Question | None:
    """One question from a JSON object or a CSV row (a dict either way)."""
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object with a 'question', got {type(obj).__name__}")
        return None
    q_key = next((k for k in QUESTION_KEYS if k in obj), None)
    if q_key is None:
        problems.append(f"{where}: missing 'question'")
        return None
    question = obj[q_key]
    if not isinstance(question, str) or not question.strip():
        problems.append(f"{where}: '{q_key}' must be a non-empty string")
        return None
    r_key = next((k for k in REFERENCE_KEYS if k in obj), None)
    reference = obj[r_key] if r_key else None
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = str(reference)  # "answer": 42 is a fair reference
    if reference is not None and not isinstance(reference, str):
        problems.append(f"{where}: '{r_key}' must be a string")
        return None
    # An empty reference (a blank CSV cell) means "no reference", not "the answer is ''".
    if reference is not None and not reference.strip():
        reference = None
    before = len(problems)
    tools, call = _tool_fields(obj, where, problems)
    if len(problems) > before:
        return None
    return Question(
        question=question.strip(),
        reference=reference.strip() if reference else None,
        where=where,
        tools=tools,
        tool_call=call,
    )


def _tool_fields(obj: dict, where: Location, problems: list[str]) -> tuple[list[dict] | None, dict | None]:
    """A question's `tools` and expected `tool_call`, checked against each other."""
    tools = parse_tools(obj.get("tools"), "tools", lambda field, msg: problems.append(f"{where}: {msg}"))
    call = obj.get("tool_call")
    if call is None:
        return tools, None
    args = call.get("arguments") if isinstance(call, dict) else None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            args = None  # reported below as not an object
    names = {t["function"]["name"] for t in tools or []}
    if not isinstance(call, dict) or call.get("name") not in names:
        problems.append(f"{where}: 'tool_call' must name one of the question's tools ({', '.join(names) or 'none'})")
    elif "arguments" in call and not isinstance(args, dict):
        problems.append(f"{where}: 'tool_call.arguments' must be a JSON object")
    else:
        return tools, {"name": call["name"], "arguments": args}
    return tools, None


def _parse_jsonl(text: str, name: str, problems: list[str]) -> list[Question]:
    out: list[Question] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = Location(name, line=lineno)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        q = _from_record(obj, where, problems)
        if q is not None:
            out.append(q)
    return out


def _parse_json_array(text: str, name: str, problems: list[str]) -> list[Question]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{name}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})")
        return []
    out: list[Question] = []
    for i, obj in enumerate(data):
        q = _from_record(obj, Location(name, record=i), problems)
        if q is not None:
            out.append(q)
    return out


def _parse_csv(text: str, name: str, problems: list[str]) -> list[Question]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if not any(k in fields for k in QUESTION_KEYS):
        problems.append(f"{name}:1: the header needs a 'question' column (found: {', '.join(fields) or 'nothing'})")
        return []
    reader.fieldnames = fields  # match headers case- and space-insensitively
    out: list[Question] = []
    # A quoted cell may span lines, so a row starts one line after the previous
    # row ended (reader.line_num is the line where the last row ended).
    start = reader.line_num + 1
    for row in reader:
        where = Location(name, line=start)
        start = reader.line_num + 1
        if not any((v or "").strip() for k, v in row.items() if k is not None):
            continue  # blank row
        if None in row:
            problems.append(f"{where}: more cells than header columns")
            continue
        record = {k: v for k, v in row.items() if v is not None}
        # CSV has no null: a blank question cell is "missing", as in JSONL.
        if all(not (record.get(k) or "").strip() for k in QUESTION_KEYS):
            problems.append(f"{where}: missing 'question'")
            continue
        q = _from_record(record, where, problems)
        if q is not None:
            out.append(q)
    return out
