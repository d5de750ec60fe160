"""Reading each file format into raw records with exact locations."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from openft.data.readers import read_path


def test_json_array_records_have_index_and_line(write):
    path = write("d.json", '[\n  {"a": 1},\n  {"a": 2}\n]\n')
    r = read_path(path)
    assert not r.errors
    assert [x.data for x in r.records] == [{"a": 1}, {"a": 2}]
    assert [(x.where.record, x.where.line) for x in r.records] == [(0, 2), (1, 3)]


def test_json_object_with_one_list_field(write):
    path = write("d.json", '{"data": [\n{"a": 1},\n{"a": 2}]}')
    r = read_path(path)
    assert not r.errors
    assert [x.where.record for x in r.records] == [0, 1]
    assert [x.where.line for x in r.records] == [2, 3]


def test_json_object_with_two_lists_is_an_error(write):
    r = read_path(write("d.json", '{"train": [], "test": []}'))
    assert len(r.errors) == 1 and "train, test" in r.errors[0].message


def test_bad_json_reports_line_and_column(write):
    r = read_path(write("d.json", '[\n  {"a": 1},\n  {"a": 2,}\n]'))
    assert len(r.errors) == 1
    e = r.errors[0]
    assert (e.line, e.column) == (3, 11)
    assert "invalid JSON" in e.message and e.file.endswith("d.json")


def test_jsonl_named_json_is_read_as_jsonl(write):
    r = read_path(write("d.json", '{"a": 1}\n{"a": 2}\n'))
    assert not r.errors and len(r.records) == 2
    assert "JSONL" in r.warnings[0].message


def test_json_non_object_record(write):
    r = read_path(write("d.json", '[{"a": 1}, 5]'))
    assert len(r.records) == 1
    assert r.errors[0].record == 1 and "a number" in r.errors[0].message


def test_jsonl_each_bad_line_is_its_own_error(write):
    text = '{"a": 1}\n{"a": 2}\n{"a": 3,, }\n\n[1, 2]\n{"a": 6\n{"a": 7}\n'
    r = read_path(write("d.jsonl", text))
    assert [x.where.line for x in r.records] == [1, 2, 7]
    assert [(e.line, e.column) for e in r.errors] == [(3, 9), (5, None), (6, 8)]
    assert "must be a JSON object" in r.errors[1].message


def test_csv_lines_count_physical_lines(write):
    text = 'question,answer\nq1,a1\n"multi\nline q",a2\n\nq3,a3\n'
    r = read_path(write("d.csv", text))
    assert not r.errors
    assert [x.where.line for x in r.records] == [2, 3, 6]
    assert r.records[1].data == {"question": "multi\nline q", "answer": "a2"}


def test_csv_row_missing_a_column(write):
    r = read_path(write("d.csv", "question,answer\nq1,a1\nq2\nq3,a3\n"))
    assert len(r.records) == 2
    e = r.errors[0]
    assert (e.line, e.field) == (3, "answer") and "missing: answer" in e.message


def test_tsv(write):
    r = read_path(write("d.tsv", "question\tanswer\nq, with comma\ta\n"))
    assert r.records[0].data == {"question": "q, with comma", "answer": "a"}


def test_not_utf8_names_the_byte(write):
    raw = b'[{"text": "caf' + b"\xe9" + b'"}]'
    for name, content in (
        ("d.json", raw),
        ("d.jsonl", b'{"text": "ok"}\n' + raw[1:-1]),
        ("d.csv", b"text\nok\ncaf\xe9\n"),
    ):
        r = read_path(write(name, content))
        assert len(r.errors) == 1, name
        e = r.errors[0]
        assert "not UTF-8" in e.message and "0xE9" in e.message and e.file.endswith(name)
    assert "byte offset 14" in read_path(write("e.json", raw)).errors[0].message
    e = read_path(write("f.csv", b"text\nok\ncaf\xe9\n")).errors[0]
    assert (e.line, e.column) == (3, 4)


def test_bom_utf8_and_utf16_are_accepted(write):
    r = read_path(write("a.jsonl", b'\xef\xbb\xbf{"text": "x"}\n'))
    assert not r.errors and r.records[0].data == {"text": "x"}
    r = read_path(write("b.csv", "text\ncafé\n".encode("utf-16")))
    assert not r.errors and r.records[0].data == {"text": "café"}


def test_xml_nested_qapairs_detected(write):
    xml = """<?xml version="1.0" encoding="UTF-8"?>
<docs>
  <doc id="1"><title>T</title>
    <QAPair><Question>What is 1+1?</Question><Answer>2</Answer></QAPair>
    <QAPair><Question>Capital of France?</Question><Answer>
        Paris
    </Answer></QAPair>
  </doc>
  <doc id="2">
    <QAPair><Question>Q3</Question><Answer>A3</Answer></QAPair>
  </doc>
</docs>"""
    r = read_path(write("d.xml", xml))
    assert not r.errors
    assert [x.data for x in r.records] == [
        {"Question": "What is 1+1?", "Answer": "2"},
        {"Question": "Capital of France?", "Answer": "Paris"},
        {"Question": "Q3", "Answer": "A3"},
    ]
    assert [x.where.record for x in r.records] == [0, 1, 2]


def test_xml_explicit_record_element_and_attributes(write):
    xml = '<root><item lang="en"><q>a</q></item><item lang="fr"><q>b</q></item><x><y>1</y></x></root>'
    r = read_path(write("d.xml", xml), record_element="item")
    assert [x.data for x in r.records] == [{"lang": "en", "q": "a"}, {"lang": "fr", "q": "b"}]
    r = read_path(write("d.xml", xml), record_element="nope")
    assert "no <nope> elements" in r.errors[0].message


def test_xml_messages_as_repeated_elements(write):
    xml = """<chats>
  <chat><messages><message role="user">hi</message><message role="assistant">hello</message></messages></chat>
  <chat><messages><message role="user">a</message><message role="assistant">b</message></messages></chat>
</chats>"""
    r = read_path(write("d.xml", xml))
    assert not r.errors
    assert r.records[0].data == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }


def test_xml_rejects_doctype_and_reports_parse_errors(write):
    bomb = '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">]>\n<r><a>&lol;</a></r>'
    e = read_path(write("d.xml", bomb)).errors[0]
    assert "DOCTYPE" in e.message and e.line == 2
    e = read_path(write("e.xml", "<r>\n<a>x</b>\n</r>")).errors[0]
    assert "invalid XML" in e.message and e.line == 2


def test_xml_declared_latin1_is_valid(write):
    raw = '<?xml version="1.0" encoding="ISO-8859-1"?><r><i><t>café</t></i><i><t>b</t></i></r>'.encode("latin-1")
    r = read_path(write("d.xml", raw))
    assert not r.errors and r.records[0].data == {"t": "café"}


def test_parquet_lists_and_structs(tmp_path):
    table = pa.table(
        {
            "messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 2,
            "n": [1, 2],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    r = read_path(tmp_path / "d.parquet")
    assert not r.errors
    assert r.records[1].data == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "n": 2,
    }
    assert [x.where.record for x in r.records] == [0, 1]


def test_parquet_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    """A column that zstd squeezes ~1000x is refused from the footer's sizes, with
    the column and row group named; a small file of the same shape still reads."""
    from openft.data import readers

    monkeypatch.setattr(readers, "MAX_PARQUET_CHUNK_BYTES", 4 << 20)
    big = pa.table({"text": [chr(97 + i) * (1 << 20) for i in range(8)], "id": list(range(8))})  # 8 MB of text
    pq.write_table(big, tmp_path / "bomb.parquet", compression="zstd", use_dictionary=False)
    assert (tmp_path / "bomb.parquet").stat().st_size < 100_000
    r = read_path(tmp_path / "bomb.parquet")
    assert not r.records
    msg = r.errors[0].message
    assert "column 'text' of row group 0 decompresses to 8 MB" in msg and "over the 4 MB" in msg
    pq.write_table(big.slice(0, 2), tmp_path / "ok.parquet", compression="zstd", use_dictionary=False)
    assert len(read_path(tmp_path / "ok.parquet").records) == 2


def test_parquet_dictionary_amplification_is_refused(tmp_path, monkeypatch):
    """One 1 MB dictionary value referenced by 64 rows: 1 MB on disk and in the
    column chunk, 64 MB once expanded. Refused before it is expanded."""
    from openft.data import readers

    monkeypatch.setattr(readers, "MAX_PARQUET_CHUNK_BYTES", 8 << 20)
    table = pa.table({"prompt": ["a" * (1 << 20)] * 64, "completion": ["b"] * 64})
    pq.write_table(table, tmp_path / "d.parquet", compression="zstd")  # dictionary-encoded by default
    r = read_path(tmp_path / "d.parquet")
    assert not r.records
    assert "its next 64 rows expand to 64 MB of text, over the 8 MB limit" in r.errors[0].message
    pq.write_table(table.slice(0, 4), tmp_path / "ok.parquet", compression="zstd")
    ok = read_path(tmp_path / "ok.parquet")
    assert [x.data["completion"] for x in ok.records] == ["b"] * 4 and len(ok.records[0].data["prompt"]) == 1 << 20


def test_corrupt_parquet(write):
    r = read_path(write("d.parquet", b"not parquet"))
    assert "cannot read Parquet" in r.errors[0].message


def test_folder_reads_every_supported_file_sorted(write, tmp_path):
    write("ds/b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write("ds/a.csv", "text\na1\n")
    write("ds/.hidden.json", "not json")
    write("ds/README.md", "# notes")
    r = read_path(tmp_path / "ds")
    assert not r.errors
    assert [(x.data["text"], x.where.file.rsplit("/", 1)[1], x.where.line) for x in r.records] == [
        ("a1", "a.csv", 2),
        ("b1", "b.jsonl", 1),
        ("b2", "b.jsonl", 2),
    ]
    assert [f.rsplit("/", 1)[1] for f in r.files] == ["a.csv", "b.jsonl"]
    assert "README.md" in r.warnings[0].message


def test_unknown_extension_and_missing_file(write, tmp_path):
    e = read_path(write("d.txt", "hello")).errors[0]
    assert "unknown file type '.txt'" in e.message and ".jsonl" in e.message
    assert "no such file" in read_path(tmp_path / "missing.json").errors[0].message
    assert "empty" in read_path(write("e.jsonl", "\n")).errors[0].message


def test_xml_field_attributes_do_not_hide_the_text(write):
    xml = (
        '<qa><pair><Question id="1">q1</Question><Answer lang="en">a1</Answer></pair>'
        '<pair><Question id="2">q2</Question><Answer>a2</Answer></pair></qa>'
    )
    r = read_path(write("d.xml", xml))
    assert [x.data for x in r.records] == [{"Question": "q1", "Answer": "a1"}, {"Question": "q2", "Answer": "a2"}]


def test_xml_flat_repeated_turns_become_a_list(write):
    xml = (
        '<chats><chat><turn from="human">q</turn><turn from="gpt">a</turn></chat>'
        '<chat><turn from="human">q2</turn><turn from="gpt">a2</turn></chat></chats>'
    )
    r = read_path(write("d.xml", xml))
    assert r.records[1].data == {"turn": [{"from": "human", "content": "q2"}, {"from": "gpt", "content": "a2"}]}


def test_xml_folder_shares_one_record_element(write, tmp_path):
    # Read alone, the one-record file would pick <meta> (first, as shallow, as often);
    # with the folder, <pair> (repeated in a.xml) is the record everywhere.
    write("ds/a.xml", "<doc><meta><k>x</k></meta><pairs><pair><q>1</q></pair><pair><q>2</q></pair></pairs></doc>")
    write("ds/b.xml", "<doc><meta><k>y</k></meta><pairs><pair><q>3</q></pair></pairs></doc>")
    write("ds/c.xml", "<doc><meta><k>z</k></meta><extra><pairs><pair><q>4</q></pair></pairs></extra></doc>")
    r = read_path(tmp_path / "ds")
    assert r.errors == []
    assert [(x.data, x.where.file.rsplit("/", 1)[1], x.where.record) for x in r.records] == [
        ({"q": "1"}, "a.xml", 0),
        ({"q": "2"}, "a.xml", 1),
        ({"q": "3"}, "b.xml", 0),
        ({"q": "4"}, "c.xml", 0),
    ]
    # A test of what a record looks like decides where nothing repeats.
    r = read_path(tmp_path / "ds" / "b.xml", looks_like_record=lambda fields: "q" in fields)
    assert [x.data for x in r.records] == [{"q": "3"}]
