"""Read dataset files into raw records, each with the place it came from.

Supported: JSON (an array of objects, or an object holding one list of objects
such as `{"data": [...]}`), JSONL, CSV/TSV, XML and Parquet, or a folder of such
files read as one dataset. Nothing here knows about layouts: a record is just a
`dict`, and `layouts.py` decides what it means.

Readers never raise on bad data. Every problem becomes a `Problem` naming the
file and the line (and column where the parser tells us) or the record, and
reading goes on where it can: one bad JSONL line costs one error, not the file.
A user fixing a file wants the whole list at once. Hostile files end the same
way: JSON nested past `MAX_DEPTH` or with integers too long to convert, text
that is not valid Unicode, XML with a DOCTYPE (entity bombs, external entities)
or nested past `MAX_XML_DEPTH`, FIFOs and devices named like datasets.
tests/data/test_data_fuzz.py holds them to it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

from openft.data.types import Location, Problem

# Extension -> format. `.ndjson` is JSONL under another name; `.tsv` is CSV with tabs.
FORMATS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".xml": "xml",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class RawRecord:
    """One record as read from the file, before any layout is applied."""

    data: dict[str, Any]
    where: Location


@dataclass
class ReadResult:
    records: list[RawRecord] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def extend(self, other: ReadResult) -> None:
        self.records += other.records
        self.errors += other.errors
        self.warnings += other.warnings
        self.files += other.files


def display_path(path: str | Path) -> str:
    """A path as problems name it: a file name that is not valid UTF-8 (Linux
    hands it over with surrogates) is shown with escapes, so that printing or
    storing the problem cannot fail."""
    try:
        return os.fsencode(str(path)).decode("utf-8", "backslashreplace")  # caf\xe9.jsonl
    except UnicodeEncodeError:  # a surrogate that did not come from the file system
        return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


# Whether an XML element's fields look like one record of a known layout
# (question/answer, messages ...): `load.py` passes the layouts' test in.
RecordTest = Callable[[dict[str, Any]], bool]


def read_path(
    path: str | Path, record_element: str | None = None, looks_like_record: RecordTest | None = None
) -> ReadResult:
    """Read a file, or every supported file in a folder (sorted by name, not
    recursive, hidden files skipped), into one `ReadResult`. The XML files of a
    folder share one record element (`choose_record_tag`)."""
    p = Path(path)
    if p.is_dir():
        result = ReadResult()
        entries = sorted(e for e in p.iterdir() if e.is_file() and not e.name.startswith("."))
        supported = [e for e in entries if e.suffix.lower() in FORMATS]
        skipped = [e.name for e in entries if e.suffix.lower() not in FORMATS]
        if skipped:
            result.warnings.append(
                Problem(
                    f"skipped {len(skipped)} file(s) that are not datasets: {', '.join(skipped[:5])}"
                    + (" ..." if len(skipped) > 5 else "")
                    + f" (supported: {', '.join(sorted(FORMATS))})",
                    file=display_path(p),
                )
            )
        if not supported:
            result.errors.append(
                Problem(
                    f"folder holds no dataset files (supported: {', '.join(sorted(FORMATS))})", file=display_path(p)
                )
            )
        xml = [e for e in supported if FORMATS[e.suffix.lower()] == "xml"]
        read_xml = dict(zip(xml, read_xml_files(xml, record_element, looks_like_record)))
        for e in supported:
            result.extend(read_xml[e] if e in read_xml else read_file(e))
        return result
    return read_file(p, record_element, looks_like_record)


def _check_file(p: Path, name: str, result: ReadResult) -> str | None:
    """The file's format, or None with the reason in `result.errors`."""
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        result.errors.append(
            Problem(
                f"unknown file type '{p.suffix or '(no extension)'}': supported are {', '.join(sorted(FORMATS))}",
                file=name,
            )
        )
    elif not p.exists():
        result.errors.append(Problem("no such file or folder", file=name))
    elif not p.is_file():
        # A FIFO or device would block or never end (`/dev/zero` named x.jsonl).
        result.errors.append(Problem("not a regular file", file=name))
    else:
        return fmt
    return None


def _read_bytes(p: Path, name: str, result: ReadResult) -> bytes | None:
    try:
        return p.read_bytes()
    except OSError as e:
        result.errors.append(Problem(f"cannot read file: {e.strerror or e}", file=name))
        return None


def read_file(
    path: str | Path, record_element: str | None = None, looks_like_record: RecordTest | None = None
) -> ReadResult:
    """Read one file; the format comes from its extension."""
    p = Path(path)
    name = display_path(p)
    result = ReadResult(files=[name])
    fmt = _check_file(p, name, result)
    if fmt == "xml":
        return read_xml_files([p], record_element, looks_like_record)[0]
    if fmt == "parquet":
        _read_parquet(p, result)
    if fmt in (None, "parquet"):
        return result
    raw = _read_bytes(p, name, result)
    if raw is None:
        return result
    text, problem = decode_text(raw, name)
    if problem:
        result.errors.append(problem)
        return result
    if not text.strip():
        result.errors.append(Problem("file is empty", file=name))
        return result
    {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv}[fmt](
        text, name, result, **({"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {})
    )
    return result


# --------------------------------------------------------------------------- text


def decode_text(raw: bytes, file: str) -> tuple[str, Problem | None]:
    """Decode bytes as UTF-8 (a BOM is allowed and dropped); UTF-16 with a BOM is
    also accepted since Windows tools write it. Anything else is an error that
    names the first undecodable byte, so the user can find it in an editor."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    else:
        # UTF-32 first: its little-endian BOM begins with UTF-16's (FF FE 00 00).
        for bom, codec in (
            ((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"), "utf-32"),
            ((b"\xff\xfe", b"\xfe\xff"), "utf-16"),
        ):
            if raw.startswith(bom):
                try:
                    return raw.decode(codec), None
                except UnicodeDecodeError as e:
                    return "", Problem(
                        f"file starts with a {codec.upper()} byte-order mark but is not valid "
                        f"{codec.upper()} (byte offset {e.start}); re-save the file as UTF-8",
                        file=file,
                    )
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1  # 1-based, in bytes
        return "", Problem(
            f"file is not UTF-8: byte 0x{raw[e.start]:02X} at byte offset {e.start} "
            f"(line {line}, column {column}) cannot be decoded; re-save the file as UTF-8 "
            "(it may be Latin-1 or Windows-1252)",
            file=file,
            line=line,
            column=column,
        )


class _Lines:
    """Maps a character offset to a 1-based line number."""

    def __init__(self, text: str):
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line(self, offset: int) -> int:
        return bisect_right(self.starts, offset)


# --------------------------------------------------------------------------- JSON

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _items_with_offsets(text: str, pos: int) -> list[tuple[int, Any]]:
    """Decode the JSON array starting at `text[pos] == '['`, returning each item
    with the offset where it starts (to report line numbers). Only called on text
    that `json.loads` already accepted, so no error handling is needed."""
    items: list[tuple[int, Any]] = []
    pos = _WS.match(text, pos + 1).end()
    if text[pos] == "]":
        return items
    while True:
        value, end = _DECODER.raw_decode(text, pos)
        items.append((pos, value))
        pos = _WS.match(text, end).end()
        if text[pos] == "]":
            return items
        pos = _WS.match(text, pos + 1).end()  # skip the comma


def _object_member_offsets(text: str, pos: int) -> dict[str, int]:
    """Offsets of each member value of the JSON object at `text[pos] == '{'`."""
    out: dict[str, int] = {}
    pos = _WS.match(text, pos + 1).end()
    while text[pos] != "}":
        key, end = _DECODER.raw_decode(text, pos)
        pos = _WS.match(text, end).end() + 1  # past ':'
        pos = _WS.match(text, pos).end()
        out[key] = pos
        _, end = _DECODER.raw_decode(text, pos)
        pos = _WS.match(text, end).end()
        if text[pos] == ",":
            pos = _WS.match(text, pos + 1).end()
    return out


# How deep containers may nest inside one record. Chat records need about 5
# (record > messages > turn > content parts > part); the cap keeps every later
# step (layouts, repr in messages, json.dumps of tool calls) far from Python's
# recursion limit, whatever the caller's stack depth.
MAX_DEPTH = 100
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


def value_problem(value: Any) -> str | None:
    """Why a decoded record cannot be used as is, or None: containers nested past
    `MAX_DEPTH`, or a string with an unpaired surrogate (JSON's `\\ud800` escape
    lets one through; it cannot be encoded, so tokenising or saving would crash
    far from the file). Iterative, so it cannot itself hit the recursion limit."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    return (
                        f"text holds an unpaired surrogate \\u{ord(v[e.start]):04x} (at "
                        f"character {e.start} of a string): not valid Unicode"
                    )
        elif isinstance(v, (dict, list)):
            if depth >= MAX_DEPTH:
                return f"values nest deeper than {MAX_DEPTH} levels"
            if isinstance(v, dict):
                stack += [(k, depth + 1) for k in v]
                stack += [(x, depth + 1) for x in v.values()]
            else:
                stack += [(x, depth + 1) for x in v]
    return None


def _deep_offset(text: str, limit: int) -> int | None:
    """Offset of the first bracket nested deeper than `limit` (strings skipped)."""
    depth = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return m.start()
        elif c in "]}":
            depth -= 1
    return None


def json_loads(text: str) -> tuple[Any, str | None, int | None]:
    """`json.loads` that never raises: (value, None, None) or (None, message,
    offset of the problem or None). Besides syntax errors, Python's parser raises
    RecursionError on deep nesting (`[[[[...`) and ValueError on integers over
    `sys.get_int_max_str_digits()` digits; both become ordinary errors here."""
    try:
        return json.loads(text), None, None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg}", e.pos
    except RecursionError:
        return (
            None,
            (f"invalid JSON: nested too deeply (records may nest at most {MAX_DEPTH} levels)"),
            _deep_offset(text, MAX_DEPTH),
        )
    except ValueError as e:  # only the integer digit limit reaches here
        limit = sys.get_int_max_str_digits()
        m = re.search(rf"\d{{{limit + 1},}}", text)
        if m is None:
            return None, f"invalid JSON: {e}", None
        return None, f"invalid JSON: a number has more than {limit} digits", m.start()


def shown(name: Any, limit: int = 40) -> str:
    """A name from the file (or the command line) as it may appear in a message:
    short, and encodable (a JSON key can hold an unpaired surrogate)."""
    text = str(name).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


def _looks_like_single_conversation(obj: dict) -> bool:
    return any(isinstance(obj.get(k), list) for k in ("messages", "conversations"))


def _read_json(text: str, file: str, result: ReadResult) -> None:
    data, message, offset = json_loads(text)
    lines = _Lines(text)
    if message is not None:
        if message == "invalid JSON: Extra data":
            # Several top-level values: this is JSONL saved as .json. Read it as such
            # rather than failing on line 2 of an otherwise fine file.
            result.warnings.append(
                Problem("file holds one JSON value per line (JSONL) but is named .json; reading it as JSONL", file=file)
            )
            _read_jsonl(text, file, result)
            return
        line = column = None
        if offset is not None:
            line = lines.line(offset)
            column = offset - lines.starts[line - 1] + 1
        result.errors.append(Problem(message, file=file, line=line, column=column))
        return
    start = _WS.match(text).end()
    if isinstance(data, list):
        items = _items_with_offsets(text, start)
    elif isinstance(data, dict) and not _looks_like_single_conversation(data):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            result.errors.append(
                Problem(
                    "a JSON file must hold an array of records, or an object with exactly one "
                    f'list of records (like {{"data": [...]}}); found an object with '
                    f"{len(lists)} list fields"
                    + (f": {', '.join(shown(k) for k in lists[:10])}" if lists else "")
                    + (" ..." if len(lists) > 10 else ""),
                    file=file,
                )
            )
            return
        offset = _object_member_offsets(text, start)[lists[0]]
        items = _items_with_offsets(text, offset)
    elif isinstance(data, dict):
        items = [(start, data)]  # a single conversation object: one record
    else:
        result.errors.append(
            Problem(f"a JSON file must hold an array of records, got a {type(data).__name__}", file=file)
        )
        return
    for index, (offset, item) in enumerate(items):
        where = Location(file, line=lines.line(offset), record=index)
        if isinstance(item, dict):
            problem = value_problem(item)
            if problem:
                result.errors.append(Problem(problem, file=file, line=where.line, record=index))
                continue
            result.records.append(RawRecord(item, where))
        else:
            result.errors.append(
                Problem(
                    f"record must be a JSON object, got {_json_type(item)}", file=file, line=where.line, record=index
                )
            )


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), "a value")


def _read_jsonl(text: str, file: str, result: ReadResult) -> None:
    # split("\n") rather than splitlines(): line numbers must match an editor's,
    # and splitlines() also breaks on characters like U+2028 inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        item, message, offset = json_loads(line)
        if message is not None:
            result.errors.append(
                Problem(message, file=file, line=number, column=None if offset is None else offset + 1)
            )
            continue
        if isinstance(item, dict):
            problem = value_problem(item)
            if problem:
                result.errors.append(Problem(problem, file=file, line=number))
                continue
            result.records.append(RawRecord(item, Location(file, line=number)))
        else:
            result.errors.append(
                Problem(f"each JSONL line must be a JSON object, got {_json_type(item)}", file=file, line=number)
            )


# --------------------------------------------------------------------------- CSV


def _read_csv(text: str, file: str, result: ReadResult, delimiter: str = ",") -> None:
    # Long answers overflow csv's default 128 KiB field limit; raise it (process-wide,
    # but a larger limit cannot break another reader).
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    start = 1  # physical line where the next row begins (rows may span lines)
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = [h.strip() for h in row]
                dupes = [h for h, n in Counter(header).items() if n > 1]
                if dupes:
                    result.errors.append(Problem(f"header repeats column(s) {', '.join(dupes)}", file=file, line=line))
                    return
                continue
            if len(row) != len(header):
                missing = header[len(row) :]
                result.errors.append(
                    Problem(
                        f"row has {len(row)} value(s) but the header has {len(header)} columns"
                        + (
                            f" (missing: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''})"
                            if missing
                            else ""
                        ),
                        file=file,
                        line=line,
                        field=missing[0] if missing else None,
                    )
                )
                continue
            result.records.append(RawRecord(dict(zip(header, row)), Location(file, line=line)))
    except csv.Error as e:
        result.errors.append(Problem(f"invalid CSV: {e}", file=file, line=reader.line_num))
    if header is None:
        result.errors.append(Problem("CSV file has no header row", file=file))


# --------------------------------------------------------------------------- XML

_XML_DECL_ENCODING = re.compile(rb"^\s*<\?xml[^>]*encoding=[\"']([A-Za-z0-9._-]+)[\"']")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _is_leaf(el: ET.Element) -> bool:
    return len(el) == 0


def _is_list_wrapper(el: ET.Element) -> bool:
    """`<messages><message/>...</messages>`: leaf children sharing one tag, two or
    more of them or carrying attributes. The same test `_element_value` uses to
    make a list: `<item><text>x</text></item>` is a record with one field, not a
    list, so a file holding one such item must not make its root the record."""
    return (
        len(el) > 0
        and all(_is_leaf(c) for c in el)
        and len({c.tag for c in el}) == 1
        and (len(el) > 1 or bool(el[0].attrib))
    )


def _leaf_value(el: ET.Element, in_list: bool) -> Any:
    # Indentation around text is layout, not content: strip it.
    text = (el.text or "").strip()
    if in_list and el.attrib:  # <message role="user">hi</message> -> {"role": "user", "content": "hi"}
        return {**{_local(k): v for k, v in el.attrib.items()}, "content": text}
    return text  # a field's own attributes (<Answer lang="en">) are metadata: dropped


def _element_value(el: ET.Element, in_list: bool = False) -> Any:
    if _is_leaf(el):
        return _leaf_value(el, in_list)
    if len({c.tag for c in el}) == 1 and (len(el) > 1 or _is_leaf(el[0]) and el[0].attrib):
        return [_element_value(c, in_list=True) for c in el]  # a wrapper: <messages><message/>...
    return _record_fields(el)


def _record_fields(el: ET.Element) -> dict[str, Any]:
    """A record's fields: its attributes, then its children by tag; a tag that
    repeats inside the record becomes a list."""
    fields: dict[str, Any] = {_local(k): v for k, v in el.attrib.items()}
    counts = Counter(c.tag for c in el)
    for child in el:
        key = _local(child.tag)
        if counts[child.tag] > 1:
            fields.setdefault(key, []).append(_element_value(child, in_list=True))
        else:
            fields[key] = _element_value(child)
    return fields


@dataclass
class _TagStats:
    """How one element name occurs across a folder's XML files, as a record
    candidate: an element whose children are all fields (text-only leaves, or
    lists of leaves like a `<messages>` wrapper)."""

    files: int = 0  # files holding it
    repeated: bool = False  # more than once in some file
    record_like: int = 0  # files where its first one has a known layout's fields
    total: int = 0
    depth: int = 0  # shallowest, in any file
    order: int = 0  # first seen, in file order then document order

    def rank(self) -> tuple:
        return (self.repeated, self.record_like, self.files, self.total, -self.depth, -self.order)


def _candidates(root: ET.Element) -> dict[str, tuple[int, int, ET.Element]]:
    """Local tag -> (count, shallowest depth, first element) of the candidates in one document."""
    found: dict[str, tuple[int, int, ET.Element]] = {}

    def walk(el: ET.Element, d: int) -> None:
        if len(el) and all(_is_leaf(c) or _is_list_wrapper(c) for c in el):
            tag = _local(el.tag)
            count, depth, first = found.get(tag, (0, d, el))
            found[tag] = (count + 1, min(depth, d), first)
        for c in el:
            walk(c, d + 1)

    walk(root, 0)
    return found


def choose_record_tag(roots: list[ET.Element], looks_like_record: RecordTest | None = None) -> str | None:
    """The record element of a set of XML documents (a folder's files), decided
    once for all of them: the element repeated in some document, then the one
    whose fields look like a record (`looks_like_record`: question/answer ...),
    then the one in the most documents, the most often, the shallowest, the
    first. A folder where most documents hold one `<QAPair>` and some several
    thus reads `<QAPair>` everywhere, not a one-off metadata element that
    happens to come first in a one-record document. Ties within one document go
    to the shallower element, so a `<conversation>` wins over its `<messages>`."""
    stats: dict[str, _TagStats] = {}
    for root in roots:
        for tag, (count, depth, first) in _candidates(root).items():
            st = stats.setdefault(tag, _TagStats(depth=depth, order=len(stats)))
            st.files += 1
            st.repeated = st.repeated or count > 1
            st.total += count
            st.depth = min(st.depth, depth)
            if looks_like_record is not None and looks_like_record(_record_fields(first)):
                st.record_like += 1
    return max(stats, key=lambda t: stats[t].rank()) if stats else None


MAX_XML_DEPTH = 100  # element nesting; dataset files need about 5


class _XMLRefused(Exception):
    """Raised from inside the parser's callbacks to stop at a refused construct."""


def _qname(name: str) -> str:
    # expat reports namespaced names as "uri}local"; ElementTree spells them "{uri}local".
    return "{" + name if "}" in name else name


def parse_xml(source: str | bytes) -> ET.Element:
    """Parse XML with expat directly, refusing what a dataset never needs and an
    attacker always does: any DOCTYPE (so no entity declarations, no "billion
    laughs", no external entities or DTDs fetched from file:// or http://) and
    nesting past `MAX_XML_DEPTH`. The refusal happens in the parser itself, at the
    declaration, whatever the file's encoding (a pre-scan of the text misses a
    DOCTYPE spelled in UTF-16). Raises `expat.ExpatError` or `_XMLRefused`."""
    parser = expat.ParserCreate(namespace_separator="}")
    builder = ET.TreeBuilder()
    depth = 0

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_XML_DEPTH:
            raise _XMLRefused(f"elements nest deeper than {MAX_XML_DEPTH} levels")
        builder.start(_qname(name), {_qname(k): v for k, v in attrs.items()})

    def end(name: str) -> None:
        nonlocal depth
        depth -= 1
        builder.end(_qname(name))

    def refuse(*_: Any) -> None:
        raise _XMLRefused(
            "XML DOCTYPE declarations are not allowed (they declare entities "
            "that can expand without bound or read other files); remove the "
            "declaration"
        )

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    parser.StartDoctypeDeclHandler = refuse
    # Belt and braces: entities can only be declared inside a DOCTYPE, which is
    # refused above, but never resolve or load one either way.
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(source, True)
    except _XMLRefused as e:
        raise _XMLRefused(str(e), parser.CurrentLineNumber, parser.CurrentColumnNumber + 1) from None
    return builder.close()


def read_xml_files(
    paths: list[Path], record_element: str | None = None, looks_like_record: RecordTest | None = None
) -> list[ReadResult]:
    """Read XML files as one dataset: every file is parsed first, then the record
    element is chosen across all of them (unless `record_element` names it) and
    read from each. One `ReadResult` per path, in order."""
    parsed = [_parse_xml_file(p) for p in paths]
    tag = record_element or choose_record_tag([root for _, root in parsed if root is not None], looks_like_record)
    for result, root in parsed:
        if root is not None:
            _xml_records(root, result, tag, named=record_element is not None, among=len(paths))
    return [result for result, _ in parsed]


def _parse_xml_file(p: Path) -> tuple[ReadResult, ET.Element | None]:
    name = display_path(p)
    result = ReadResult(files=[name])
    raw = _read_bytes(p, name, result) if _check_file(p, name, result) else None
    return result, (None if raw is None else _parse_xml(raw, name, result))


def _parse_xml(raw: bytes, file: str, result: ReadResult) -> ET.Element | None:
    declared = _XML_DECL_ENCODING.match(raw)
    encoding = declared.group(1).decode().lower() if declared else "utf-8"
    source: str | bytes
    if raw.startswith((b"<\x00", b"\x00<")) or (encoding.replace("-", "").replace("_", "") not in ("utf8", "utf16")):
        # UTF-16 without a byte-order mark, or a declared legacy encoding
        # (ISO-8859-1 ...): valid XML that expat decodes itself.
        source = raw
    else:
        text, problem = decode_text(raw, file)
        if problem:
            result.errors.append(problem)
            return None
        source = text
    try:
        return parse_xml(source)
    except _XMLRefused as e:
        message, line, column = e.args
        result.errors.append(Problem(message, file=file, line=line, column=column))
    except expat.ExpatError as e:
        result.errors.append(
            Problem(f"invalid XML: {expat.ErrorString(e.code)}", file=file, line=e.lineno, column=e.offset + 1)
        )
    return None


def _xml_records(root: ET.Element, result: ReadResult, tag: str | None, named: bool, among: int) -> None:
    """The records of one parsed file: every `<tag>` element, wherever it sits."""
    file = result.files[0]
    elements = [el for el in root.iter() if _local(el.tag) == tag] if tag else []
    if elements:
        for index, el in enumerate(elements):
            result.records.append(RawRecord(_record_fields(el), Location(file, record=index)))
    elif named or tag and among > 1:
        tags = sorted({_local(el.tag) for el in root.iter()})
        why = "" if named else " (the element that holds the records in this folder's other XML files)"
        result.errors.append(
            Problem(
                f"no <{shown(tag)}> elements found{why}; elements in the file: "
                f"{', '.join(shown(t) for t in tags[:20])}"
                + ("" if named else "; name the record element with --record-element"),
                file=file,
            )
        )
    else:
        result.errors.append(
            Problem(
                "no records found: expected a repeated element whose children hold the "
                "fields (like <item><question>..</question><answer>..</answer></item>)",
                file=file,
            )
        )


# --------------------------------------------------------------------------- Parquet


# What one column chunk may decompress to. Reading decodes a chunk's pages whole,
# so a few KB of zstd or snappy can claim gigabytes (a decompression bomb); the
# sizes are in the footer, which pyarrow holds each page to, so refusing on them
# bounds memory before anything is decoded. Real dataset files stay far below.
MAX_PARQUET_CHUNK_BYTES = 512 << 20


def _parquet_bomb(pf) -> str | None:
    md = pf.metadata
    for g in range(md.num_row_groups):
        group = md.row_group(g)
        for c in range(group.num_columns):
            col = group.column(c)
            if col.total_uncompressed_size > MAX_PARQUET_CHUNK_BYTES:
                return (
                    f"column '{col.path_in_schema}' of row group {g} decompresses to "
                    f"{col.total_uncompressed_size / 2**20:.0f} MB (from {col.total_compressed_size / 2**20:.1f} MB), "
                    f"over the {MAX_PARQUET_CHUNK_BYTES >> 20} MB a column chunk may take: "
                    f"rewrite the file with smaller row groups"
                )
    return None


def _is_text(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _dictionary_bytes(batch) -> int:
    """Bytes the dictionary-encoded columns of `batch` take once decoded."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for col in batch.columns:
        if pa.types.is_dictionary(col.type) and len(col):
            lengths = pc.binary_length(col.dictionary)
            total += pc.sum(pc.take(lengths, col.indices)).as_py() or 0
    return total


def _read_parquet(p: Path, result: ReadResult) -> None:
    import pyarrow.parquet as pq

    name = display_path(p)
    index = 0
    try:
        pf = pq.ParquetFile(p)
        bomb = _parquet_bomb(pf)
        if bomb:
            result.errors.append(Problem(f"cannot read Parquet file: {bomb}", file=name))
            return
        # Text columns are read as dictionaries (values + indices) so that their
        # decoded size can be checked before it exists: one large dictionary value
        # referenced by every row would otherwise expand to rows x value bytes.
        text = [f.name for f in pf.schema_arrow if _is_text(f.type)]
        if text:
            pf = pq.ParquetFile(p, read_dictionary=text)
        # Batches keep memory bounded on large files; to_pylist turns list and
        # struct columns into Python lists and dicts.
        for batch in pf.iter_batches(batch_size=1024):
            expanded = _dictionary_bytes(batch)
            if expanded > MAX_PARQUET_CHUNK_BYTES:
                result.errors.append(
                    Problem(
                        f"cannot read Parquet file (at record {index}): its next {batch.num_rows} rows expand to "
                        f"{expanded / 2**20:.0f} MB of text, over the {MAX_PARQUET_CHUNK_BYTES >> 20} MB limit "
                        f"(repeated dictionary values)",
                        file=name,
                    )
                )
                return
            rows = batch.to_pylist()
            for row in rows:
                problem = value_problem(row)  # list columns can nest without bound
                if problem:
                    result.errors.append(Problem(problem, file=name, record=index))
                else:
                    result.records.append(RawRecord(row, Location(name, record=index)))
                index += 1
    except Exception as e:  # noqa: BLE001
        # pyarrow decodes untrusted bytes in C++ and Cython, and what a damaged
        # file raises is open-ended: ArrowException subclasses, OSError, but also
        # UnicodeDecodeError for a column name that is not UTF-8 (found by
        # atheris) or MemoryError for a footer claiming a huge size. Any of them
        # means the file cannot be read; the loop around them is only appends.
        where = f" (at record {index})" if index else ""
        result.errors.append(
            Problem(f"cannot read Parquet file{where}: {type(e).__name__}: {shown(e, 300)}", file=name)
        )
