from __future__ import annotations

import json

from openft.data.types import Location
from openft.eval.compare import (
    build_comparison,
    format_terminal,
    text_width,
    to_json,
    to_markdown,
    wrap,
    write_report,
)
from openft.eval.questions import Question
from openft.eval.verdict import TrainingSignals


class FakeEmbedder:
    """Similarity = ROUGE-free stand-in: 1.0 when the answer contains the reference."""

    def similarity(self, a, b):
        return [1.0 if y.lower() in x.lower() else 0.1 for x, y in zip(a, b)]


def q(text, ref=None, line=1):
    return Question(text, ref, Location("q.jsonl", line=line))


QUESTIONS = [
    q("What is the capital of France?", "Paris", 1),
    q("Largest planet?", "Jupiter", 2),
    q("中国的首都是哪里？", "北京", 3),
    q("Say something nice.", None, 4),
]
BEFORE = ["I am not sure.", "Jupiter is the largest planet.", "我不知道。", "Hello."]
AFTER = ["The capital of France is Paris.", "Saturn, I think.", "北京。", "You are great | really <b>"]


def make(embedder=None, signals=None):
    return build_comparison(
        QUESTIONS,
        BEFORE,
        AFTER,
        before_model="base",
        after_model="ft:base:me:run:1",
        embedder=embedder,
        signals=signals,
    )


def test_summary_counts_by_rouge_without_embedder():
    c = make()
    s = c.summary
    assert (s["questions"], s["with_reference"], s["answers_changed"], s["metric"]) == (4, 3, 4, "rouge_l")
    assert s["before"]["contains"] == 1 and s["after"]["contains"] == 2
    assert s["before"]["exact"] == 0 and s["after"]["exact"] == 1  # "北京。" == "北京"
    assert s["after"]["contains_rate"] == round(2 / 3, 4)
    assert s["before"]["similarity"] is None
    assert (s["improved"], s["worse"], s["unchanged"]) == (2, 1, 0)
    # No reference: no scores, not counted either way.
    last = c.rows[3]
    assert last.before_scores.rouge_l is None and last.after_scores.exact is None
    assert c.rows[0].before_scores.similarity is None
    assert c.verdict is None


def test_summary_uses_similarity_when_an_embedder_is_given():
    c = make(FakeEmbedder())
    assert c.summary["metric"] == "similarity"
    assert c.rows[0].after_scores.similarity == 1.0 and c.rows[0].before_scores.similarity == 0.1
    assert c.summary["after"]["similarity"] == round((1.0 + 0.1 + 1.0) / 3, 4)
    assert (c.summary["improved"], c.summary["worse"]) == (2, 1)


def test_markdown_shows_both_answers_escaped_and_the_verdict():
    signals = TrainingSignals(2.4, 0.8, 2.5, 0.95, True, 0.03, 0, 100)
    md = to_markdown(make(signals=signals))
    for text in ["I am not sure.", "The capital of France is Paris.", "我不知道。", "北京。", "Hello."]:
        assert text in md
    assert "You are great \\| really &lt;b&gt;" in md  # cannot break the table
    assert "**Reference:** Paris" in md
    assert "## Summary" in md and "## Verdict" in md
    assert "Training worked" in md


def test_json_round_trips_with_stable_keys():
    data = to_json(make(FakeEmbedder(), TrainingSignals(2.0, 1.0, None, None, None, None, 0, 10)))
    again = json.loads(json.dumps(data))
    assert again == data
    assert list(data) == ["before_model", "after_model", "rows", "summary", "verdict"]
    assert list(data["rows"][0]) == ["question", "reference", "before", "after", "before_scores", "after_scores"]
    assert data["rows"][0]["after_scores"] == {
        "exact": False,
        "contains": True,
        "rouge_l": data["rows"][0]["after_scores"]["rouge_l"],
        "similarity": 1.0,
    }
    assert data["verdict"]["ok"] is True
    assert to_json(make())["verdict"] is None


def test_write_report_writes_both_files(tmp_path):
    md, js = write_report(make(), tmp_path / "out")
    assert md.name == "comparison.md" and js.name == "comparison.json"
    assert "Jupiter is the largest planet." in md.read_text(encoding="utf-8")
    assert json.loads(js.read_text(encoding="utf-8"))["after_model"] == "ft:base:me:run:1"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["comparison.json", "comparison.md"]


def test_terminal_columns_fit_the_width_with_cjk():
    long = "这是一个很长的中文回答，" * 8 + " and some English words " * 5
    signals = TrainingSignals(2.4, 0.3, 1.9, 2.6, True, 0.03, 5, 50)  # warnings to wrap
    c = build_comparison(
        [q("Q?", "北京")], ["short"], [long], before_model="base", after_model="tuned", signals=signals
    )
    text = format_terminal(c, width=60)
    assert "! validation_follows_training:" in text and "overfitting" in text
    lines = text.splitlines()
    assert all(text_width(line) <= 60 for line in lines), max(lines, key=text_width)
    assert "BEFORE (base)" in text and "AFTER (tuned)" in text
    # Every line of the answers puts the separator in the same terminal column.
    cols = {text_width(line.split(" │ ")[0]) for line in lines if " │ " in line}
    assert cols == {(60 - 3) // 2}
    # All of the long answer is there, just wrapped.
    assert "".join(line.split(" │ ")[1] for line in lines if " │ " in line).count("很长的中文回答") == 8


def test_wrap_breaks_cjk_and_long_words():
    assert wrap("一二三四五六", 4) == ["一二", "三四", "五六"]
    assert wrap("aaaaaaaaaa bb", 4) == ["aaaa", "aaaa", "aa", "bb"]
    assert wrap("hello world", 20) == ["hello world"]
    assert wrap("a\n\nb", 5) == ["a", "", "b"]
