"""load_dataset as a whole: ok/not ok, warnings, to_dict, the --columns parser."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openft.data.load import LoadResult, load_dataset, parse_columns


def chat(i: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def test_good_dataset_is_ok_without_warnings(write):
    r = load_dataset(write("d.jsonl", [chat(i) for i in range(12)]))
    assert r.ok and r.layout == "messages" and r.records == 12 and len(r.examples) == 12
    assert r.errors == [] and r.warnings == []
    d = r.to_dict()
    assert d["examples"] == 12 and d["records"] == 12 and d["layout"] == "messages"
    assert d["errors"] == [] and d["warnings"] == [] and d["files"][0].endswith("d.jsonl")
    json.dumps(d)


def test_fewer_than_10_examples_warns(write):
    r = load_dataset(write("d.jsonl", [chat(i) for i in range(3)]))
    assert r.ok
    [w] = r.warnings
    assert w.message.startswith("only 3 examples: at least 10") and "50-100+" in w.message


def test_duplicates_are_kept_and_reported(write):
    rows = [chat(i) for i in range(10)] + [chat(2), chat(5), chat(2)]
    r = load_dataset(write("d.jsonl", rows))
    assert r.ok and len(r.examples) == 13
    [w] = r.warnings
    assert w.line == 11
    assert "3 duplicate examples" in w.message
    assert "line 11 (same as line 3), line 12 (same as line 6), line 13 (same as line 3)" in w.message


def test_any_error_makes_it_not_ok(write):
    rows = [chat(i) for i in range(20)] + [{"messages": []}]
    r = load_dataset(write("d.jsonl", rows))
    assert not r.ok and len(r.examples) == 20
    assert r.to_dict()["errors"] == [
        {"message": "no messages", "file": str(r.files[0]), "line": 21, "field": "messages"}
    ]


def test_unreadable_or_empty_dataset(write, tmp_path):
    r = load_dataset(tmp_path / "nope.jsonl")
    assert not r.ok and "no such file" in r.errors[0].message
    r = load_dataset(write("d.json", "[]"))
    assert not r.ok and r.errors[0].message == "no records found"
    assert not LoadResult().ok


def test_folder_is_one_dataset(write, tmp_path):
    write("ds/part1.jsonl", [chat(i) for i in range(6)])
    write("ds/part2.json", [chat(i) for i in range(6, 12)])
    r = load_dataset(tmp_path / "ds")
    assert r.ok and len(r.examples) == 12 and len(r.files) == 2
    assert {e.where.file.rsplit("/", 1)[1] for e in r.examples} == {"part1.jsonl", "part2.json"}


def test_folder_errors_name_each_file(write, tmp_path):
    write("ds/a.jsonl", [chat(0), {"messages": [{"role": "user", "content": "q"}]}])
    write("ds/b.jsonl", '{"bad json\n')
    r = load_dataset(tmp_path / "ds")
    assert [(e.file.rsplit("/", 1)[1], e.line) for e in r.errors] == [("a.jsonl", 2), ("b.jsonl", 1)]


def test_parquet_dataset(tmp_path):
    pq.write_table(
        pa.table({"instruction": ["a", "b"], "input": [None, "x"], "output": ["1", "2"]}), tmp_path / "d.parquet"
    )
    r = load_dataset(tmp_path / "d.parquet")
    assert r.layout == "alpaca" and not r.errors
    assert r.examples[1].messages[0].content == "b\n\nx"
    assert r.examples[1].where.record == 1


def test_csv_cell_holding_json_messages(write):
    cell = json.dumps(chat(0)["messages"]).replace('"', '""')
    r = load_dataset(write("d.csv", f'messages\n"{cell}"\n'))
    assert r.layout == "messages" and not r.errors
    assert r.examples[0].messages[1].content == "answer 0"


def test_parse_columns():
    assert parse_columns("question=Q, answer=A") == {"question": "Q", "answer": "A"}
    assert parse_columns("question=Frage,answer=Antwort,system=Sys")["system"] == "Sys"
    for bad in ("question", "question=", "=Q", "", "question=Q,question=R"):
        with pytest.raises(ValueError):
            parse_columns(bad)
    with pytest.raises(ValueError, match="unknown column role 'questoin'"):
        parse_columns("questoin=Q")


def test_xml_chat_dataset_end_to_end(write):
    xml = (
        "<chats>"
        + "".join(
            f'<chat><messages><message role="system">s</message><message role="user">q{i}</message>'
            f'<message role="assistant">a{i}</message></messages></chat>'
            for i in range(3)
        )
        + "</chats>"
    )
    r = load_dataset(write("d.xml", xml))
    assert r.layout == "messages" and not r.errors
    assert [(m.role, m.content) for m in r.examples[2].messages] == [
        ("system", "s"),
        ("user", "q2"),
        ("assistant", "a2"),
    ]


# ---- a folder of XML documents laid out like MedQuAD: one <Document> per file,
# ---- some holding one <QAPair>, some several, with metadata elements around them.


def medquad_doc(doc_id: str, pairs: list[tuple[str, str | None]], *, synonyms: int = 0, wrapper: bool = False) -> str:
    qa = "".join(
        f'<QAPair pid="{i}"><Question qid="{doc_id}-{i}" qtype="information">{q}</Question>'
        + (f"<Answer>{a}</Answer>" if a is not None else "")
        + "</QAPair>"
        for i, (q, a) in enumerate(pairs, 1)
    )
    syn = f"<Synonyms>{'<Synonym>alias</Synonym>' * synonyms}</Synonyms>" if synonyms else ""
    body = f"<QAPairs>{qa}</QAPairs>"
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Document id="{doc_id}" source="Test">'
        f"<Focus>Condition {doc_id}</Focus><FocusAnnotations>{syn}<Category>Disease</Category>"
        "<UMLS><CUIs><CUI>C0001</CUI></CUIs><SemanticGroup>Disorders</SemanticGroup></UMLS></FocusAnnotations>"
        + (f"<Section>{body}</Section>" if wrapper else body)
        + "</Document>\n"
    )


def medquad_folder(write, missing_answer: bool = False) -> None:
    write("mq/0000001.xml", medquad_doc("1", [(f"What is A{i}?", f"A{i} is a condition.") for i in range(3)]))
    # One-record documents: alone, their <Synonyms> (first, as shallow) once won.
    write("mq/0000002.xml", medquad_doc("2", [("What causes B?", "Nobody knows.")], synonyms=2))
    write("mq/0000003.xml", medquad_doc("3", [("Who gets C?", None if missing_answer else "Anyone.")]))
    write("mq/0000004.xml", medquad_doc("4", [("How is D treated?", "With rest.")], wrapper=True))


def test_xml_folder_of_one_and_many_record_documents(write, tmp_path):
    medquad_folder(write)
    r = load_dataset(tmp_path / "mq")
    assert r.errors == [] and r.layout == "qa" and r.records == 6 and len(r.examples) == 6
    assert [(e.where.file.rsplit("/", 1)[1], e.where.record) for e in r.examples] == [
        ("0000001.xml", 0),
        ("0000001.xml", 1),
        ("0000001.xml", 2),
        ("0000002.xml", 0),
        ("0000003.xml", 0),
        ("0000004.xml", 0),
    ]
    assert [m.content for m in r.examples[3].messages] == ["What causes B?", "Nobody knows."]
    assert [m.content for m in r.examples[5].messages] == ["How is D treated?", "With rest."]


def test_a_one_record_xml_file_reads_the_element_holding_question_and_answer(write):
    r = load_dataset(write("one.xml", medquad_doc("2", [("What causes B?", "Nobody knows.")], synonyms=2)))
    assert r.errors == [] and r.layout == "qa" and r.records == 1
    assert [m.content for m in r.examples[0].messages] == ["What causes B?", "Nobody knows."]


def test_xml_folder_errors_name_the_file_and_record(write, tmp_path):
    medquad_folder(write, missing_answer=True)
    r = load_dataset(tmp_path / "mq")
    assert r.layout == "qa" and r.records == 6 and len(r.examples) == 5 and not r.ok
    [e] = r.errors
    assert e.file.endswith("0000003.xml") and e.record == 0 and "question/answer" in e.message


def test_xml_folder_file_without_the_record_element_is_named(write, tmp_path):
    medquad_folder(write)
    write("mq/0000005.xml", "<Document><Focus>E</Focus><Notes><Note>n</Note></Notes></Document>")
    r = load_dataset(tmp_path / "mq")
    assert r.records == 6 and len(r.examples) == 6
    [e] = r.errors
    assert e.file.endswith("0000005.xml") and "no <QAPair> elements found" in e.message
