"""Preference pairs (DPO data) in OpenAI's, TRL's and ShareGPT's layouts, from
JSONL, JSON, CSV and Parquet, with every bad record named by its line or record."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openft.data.load import load_dataset

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


def _openai(i: int, good: str = "Paris.", bad: str = "Lyon, I think.") -> dict:
    return {
        "input": {"messages": PROMPT},
        "preferred_output": [{"role": "assistant", "content": f"{good} ({i})"}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def test_openai_preference_lines_become_pairs(tmp_path):
    r = load_dataset(_jsonl(tmp_path / "p.jsonl", [_openai(i) for i in range(12)]))
    assert r.ok and r.layout == "openai_preference" and len(r.examples) == 12
    e = r.examples[3]
    assert e.is_pair and [m.role for m in e.prompt] == ["system", "user"]
    assert e.messages[-1].content == "Paris. (3)" and e.completion_turns == 1
    assert [m.content for m in e.rejected] == ["Lyon, I think."]


def test_trl_prompt_chosen_rejected_as_strings_and_as_messages(tmp_path):
    rows = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(6)]
    rows += [
        {
            "prompt": [{"role": "user", "content": f"Hi {i}"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        }
        for i in range(6)
    ]
    r = load_dataset(_jsonl(tmp_path / "trl.jsonl", rows))
    assert r.ok and r.layout == "preference" and len(r.examples) == 12
    assert r.examples[0].prompt[0].content == "Say 0" and r.examples[0].rejected[0].content == "not 0"
    assert r.examples[7].messages[-1].content == "Hello!"


def test_the_same_pairs_from_csv_and_parquet(tmp_path):
    rows = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(12)]
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    a, b = load_dataset(str(csv)), load_dataset(str(tmp_path / "p.parquet"))
    assert a.ok and b.ok and a.layout == b.layout == "preference"
    assert [(e.prompt[0].content, e.rejected[0].content) for e in a.examples] == [
        (e.prompt[0].content, e.rejected[0].content) for e in b.examples
    ]


def test_llama_factory_sharegpt_pairs(shared_datasets):
    for name in ("dpo_en_demo.json", "dpo_zh_demo.json"):
        r = load_dataset(str(shared_datasets / name))
        assert r.ok and r.layout == "sharegpt_preference" and len(r.examples) == 300, r.errors[:3]
        e = r.examples[0]
        assert e.prompt[-1].role == "user" and e.messages[-1].role == "assistant" and e.rejected[0].role == "assistant"
        assert e.messages[-1].content != e.rejected[0].content


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ({"non_preferred_output": [{"role": "assistant", "content": "Paris. (2)"}]}, None, "are the same"),
        ({"preferred_output": [{"role": "assistant", "content": "  "}]}, "preferred_output[0].content", "empty"),
        ({"preferred_output": []}, "preferred_output", "no messages"),
        ({"non_preferred_output": [{"role": "user", "content": "x"}]}, "non_preferred_output[0]", "assistant's"),
        (
            {"input": {"messages": PROMPT + [{"role": "assistant", "content": "Hm."}]}},
            None,
            "must end on a user turn",
        ),
        ({"input": "Capital of France?"}, "input", "must be an object"),
    ],
)
def test_a_bad_pair_is_named_by_its_line(tmp_path, bad, field, words):
    rows = [_openai(i) for i in range(12)]
    rows[2] = {**rows[2], **bad}
    r = load_dataset(_jsonl(tmp_path / "p.jsonl", rows))
    assert not r.ok and len(r.errors) == 1, r.errors
    err = r.errors[0]
    assert err.line == 3 and err.field == field and words in err.message, err
    assert len(r.examples) == 11  # the others are kept and counted
