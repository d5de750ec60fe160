from __future__ import annotations

import json

import pytest

from openft.eval.questions import QuestionFileError, load_questions


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_jsonl_with_aliases_and_optional_reference(tmp_path):
    lines = [
        {"question": "What is the capital of France?", "reference": "Paris"},
        {"prompt": "2+2?", "answer": "4"},
        {"question": "Say hi"},
        {"question": "数字?", "answer": 7},
    ]
    p = write(
        tmp_path,
        "q.jsonl",
        "\n".join(json.dumps(x, ensure_ascii=False) for x in lines[:2])
        + "\n\n"
        + "\n".join(json.dumps(x, ensure_ascii=False) for x in lines[2:])
        + "\n",
    )
    qs = load_questions(p)
    assert [q.question for q in qs] == ["What is the capital of France?", "2+2?", "Say hi", "数字?"]
    assert [q.reference for q in qs] == ["Paris", "4", None, "7"]
    # The blank line still counts: line numbers are the file's own.
    assert [str(q.where) for q in qs] == ["q.jsonl:1", "q.jsonl:2", "q.jsonl:4", "q.jsonl:5"]


def test_jsonl_errors_are_gathered_with_line_numbers(tmp_path):
    text = "\n".join(
        [
            '{"question": "ok"}',
            '{"question": ',
            '["not", "an", "object"]',
            '{"reference": "no question here"}',
            '{"question": "  "}',
            '{"question": "q", "reference": ["x"]}',
        ]
    )
    with pytest.raises(QuestionFileError) as e:
        load_questions(write(tmp_path, "questions.jsonl", text))
    problems = e.value.problems
    assert len(problems) == 5
    assert problems[0].startswith("questions.jsonl:2: invalid JSON")
    assert problems[1].startswith("questions.jsonl:3: expected an object")
    assert problems[2] == "questions.jsonl:4: missing 'question'"
    assert problems[3] == "questions.jsonl:5: 'question' must be a non-empty string"
    assert problems[4] == "questions.jsonl:6: 'reference' must be a string"
    assert "questions.jsonl:4: missing 'question'" in str(e.value)


def test_csv_with_multiline_cell_bom_and_blank_reference(tmp_path):
    text = '\ufeffQuestion,Reference\nWhat is 2+2?,4\n"A question\nover two lines",yes\nNo reference here,\n'
    qs = load_questions(write(tmp_path, "q.csv", text))
    assert [q.question for q in qs] == ["What is 2+2?", "A question\nover two lines", "No reference here"]
    assert [q.reference for q in qs] == ["4", "yes", None]
    assert [q.where.line for q in qs] == [2, 3, 5]


def test_csv_errors(tmp_path):
    with pytest.raises(QuestionFileError, match=r"q.csv:1: the header needs a 'question' column"):
        load_questions(write(tmp_path, "q.csv", "prompt_text,ref\nx,y\n"))
    with pytest.raises(QuestionFileError) as e:
        load_questions(write(tmp_path, "q.csv", "question,reference\nok,1\n,2\na,b,c\n"))
    assert e.value.problems == ["q.csv:3: missing 'question'", "q.csv:4: more cells than header columns"]


def test_json_array_and_empty_file(tmp_path):
    qs = load_questions(write(tmp_path, "q.json", '[{"question": "a"}, {"prompt": "b", "answer": "B"}]'))
    assert [(q.question, q.reference, str(q.where)) for q in qs] == [
        ("a", None, "q.json[record 0]"),
        ("b", "B", "q.json[record 1]"),
    ]
    with pytest.raises(QuestionFileError, match="no questions"):
        load_questions(write(tmp_path, "empty.jsonl", "\n\n"))
    with pytest.raises(QuestionFileError, match="no such file"):
        load_questions(tmp_path / "missing.jsonl")
