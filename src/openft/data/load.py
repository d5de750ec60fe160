"""Load a dataset: read → detect layout → normalise → validate, in one call.

`load_dataset` never raises on bad data; it returns a `LoadResult` listing every
error and warning with its file and line or record. Bad arguments (an unknown
layout name, a malformed column mapping) raise `ValueError`, since they are the
caller's mistake rather than the file's.

Usability: a dataset is `ok` only with no errors at all and at least one
example. Records with errors are dropped from `examples`, but one bad record
still makes the dataset not ok (the CLI exits 1): the user asked us to check the
file, and training on a silently shrunk dataset hides the mistake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from openft.data.layouts import (
    FIELDS,
    LAYOUTS,
    check_columns,
    detect_layout,
    guess_layout,
    layout_for_columns,
    no_layout_message,
    normalise,
)
from openft.data.readers import display_path, read_path
from openft.data.types import Example, Problem

MIN_EXAMPLES = 10  # below this a fine-tune mostly memorises noise
DUPLICATES_NAMED = 5  # how many duplicate places a warning spells out


@dataclass
class LoadResult:
    examples: list[Example] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    layout: str | None = None  # detected or forced
    files: list[str] = field(default_factory=list)
    records: int = 0  # raw records seen, before normalising

    @property
    def ok(self) -> bool:
        """Usable for training: no errors and at least one example."""
        return not self.errors and bool(self.examples)

    def to_dict(self) -> dict:
        return {
            "layout": self.layout,
            "files": list(self.files),
            "records": self.records,
            "examples": len(self.examples),
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
        }


def parse_columns(spec: str) -> dict[str, str]:
    """Parse the CLI's `--columns question=Q,answer=A[,system=S]` into a mapping."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"bad column mapping '{part}': expected FIELD=COLUMN, like question=Q,answer=A")
        if key in out:
            raise ValueError(f"column mapping names '{key}' twice")
        out[key] = value
    if not out:
        raise ValueError("empty column mapping: expected FIELD=COLUMN, like question=Q,answer=A")
    check_columns(out)
    return out


def _record_test(columns: dict[str, str] | None):
    """What an XML record looks like, for choosing the record element: the
    columns named by a mapping, else the fields of a known layout."""
    if columns:
        return lambda fields: set(columns.values()) <= set(fields)
    return lambda fields: guess_layout(fields) is not None


def load_dataset(
    path: str | Path,
    layout: str | None = None,
    columns: dict[str, str] | None = None,
    record_element: str | None = None,
) -> LoadResult:
    """Read, normalise and validate the dataset at `path` (a file or a folder).

    `layout` forces one of `LAYOUTS` instead of detecting it; `columns` renames
    layout fields (for `qa`: question, answer, system) and implies `qa` when no
    layout is given; `record_element` names the XML element that holds a record.
    The result is usable when `.ok`: no errors and at least one example.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}': accepted are {', '.join(LAYOUTS)}")
    if columns:
        check_columns(columns)
        if layout is None:
            layout = layout_for_columns(columns)
        elif not set(columns) <= set(FIELDS[layout]):
            raise ValueError(
                f"columns {', '.join(columns)} do not apply to layout '{layout}' "
                f"(its fields: {', '.join(FIELDS[layout])})"
            )

    read = read_path(path, record_element, _record_test(columns))
    result = LoadResult(
        errors=list(read.errors), warnings=list(read.warnings), files=read.files, records=len(read.records)
    )
    if not read.records:
        if not read.errors:
            result.errors.append(Problem("no records found", file=display_path(path)))
        return result

    if layout is None:
        layout, keys_seen = detect_layout(r.data for r in read.records)
        if layout is None:
            result.errors.append(Problem(no_layout_message(keys_seen), file=display_path(path)))
            return result
    result.layout = layout

    for raw in read.records:
        example, problems = normalise(raw.data, raw.where, layout, columns)
        result.errors += problems
        if example is not None:
            result.examples.append(example)

    result.warnings += _dataset_warnings(result.examples, display_path(path))
    # Reading errors were collected before layout errors: list them all in file order.
    rank = {f: i for i, f in enumerate(result.files)}
    result.errors.sort(
        key=lambda p: (rank.get(p.file, -1), -1 if p.line is None else p.line, -1 if p.record is None else p.record)
    )
    return result


def example_key(example: Example) -> tuple:
    """What makes two examples exact duplicates."""
    if example.messages is None:
        return ("text", example.text)
    # Two conversations that differ only in a tool call's arguments are not copies,
    # nor two pairs that share a preferred answer but reject different ones.
    turns = tuple((m.role, m.content, m.tool_calls) for m in example.messages)
    if example.rejected is not None:
        return turns + (("rejected",) + tuple((m.role, m.content, m.tool_calls) for m in example.rejected),)
    return turns


def _dataset_warnings(examples: list[Example], path: str) -> list[Problem]:
    warnings: list[Problem] = []
    n = len(examples)
    if 0 < n < MIN_EXAMPLES:
        warnings.append(
            Problem(
                f"only {n} example{'s' if n != 1 else ''}: at least {MIN_EXAMPLES} are needed "
                "for a useful fine-tune, 50-100+ advised",
                file=path,
            )
        )
    # Duplicates are kept (a user may repeat rows on purpose to weight them) but
    # reported, since they usually come from a bad merge and inflate the split.
    first_seen: dict[tuple, Example] = {}
    dupes: list[tuple[Example, Example]] = []
    for ex in examples:
        key = example_key(ex)
        if key in first_seen:
            dupes.append((ex, first_seen[key]))
        else:
            first_seen[key] = ex
    if dupes:
        first = dupes[0][0].where
        named = ", ".join(
            f"{_place(d.where, first.file)} (same as {_place(o.where, first.file)})"
            for d, o in dupes[:DUPLICATES_NAMED]
        )
        more = f" and {len(dupes) - DUPLICATES_NAMED} more" if len(dupes) > DUPLICATES_NAMED else ""
        warnings.append(
            Problem(
                f"{len(dupes)} duplicate example{'s' if len(dupes) != 1 else ''} (exact copies of "
                f"an earlier one, kept): {named}{more}",
                file=first.file,
                line=first.line,
                record=first.record,
            )
        )
    return warnings


def _place(where, file: str) -> str:
    """A location, short when it is in `file` ("line 12", "record 3")."""
    if where.file != file:
        return str(where)
    return f"line {where.line}" if where.line is not None else f"record {where.record}"
