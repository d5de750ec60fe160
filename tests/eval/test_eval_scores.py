from __future__ import annotations

import pytest

from openft.eval.scores import contains, exact_match, rouge_l, tokenize


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5
    # P = 5/6, R = 5/6 -> F1 = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # Different lengths: answer 4 tokens, reference 2, LCS 2 -> P=1/2, R=1 -> F1=2/3
    assert rouge_l("Paris, of course, France", "Paris France") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "something") == 0.0


def test_rouge_l_chinese_is_scored_per_character():
    assert tokenize("今天天气很好。") == ["今", "天", "天", "气", "很", "好"]
    # LCS(今天天气很好, 今天天气不错) = 今天天气 = 4 of 6 each -> F1 = 2/3
    assert rouge_l("今天天气很好", "今天天气不错") == pytest.approx(2 / 3)
    # Mixed scripts: words for Latin, characters for CJK.
    assert tokenize("我爱Python编程") == ["我", "爱", "python", "编", "程"]
    assert rouge_l("我爱Python", "我爱Python编程") == pytest.approx(2 * 1 * 0.6 / 1.6)


def test_exact_match_normalises_case_punctuation_and_space():
    assert exact_match("  Paris!", "paris")
    assert exact_match("The Answer:  42.", "the answer 42")
    assert exact_match("北京。", "北 京")
    assert exact_match("ＡＢＣ", "abc")  # full-width forms
    assert not exact_match("Paris, France", "Paris")
    assert not exact_match("2+2", "22")  # symbols are kept


def test_contains_matches_whole_tokens():
    assert contains("I believe the capital is Paris.", "paris")
    assert contains("答案是北京。", "北京")
    assert contains("It was New York City", "new york")
    assert not contains("concatenate", "cat")
    assert not contains("York New", "new york")
    assert not contains("anything", "?!")  # an empty reference is evidence of nothing


def test_embedder_ranks_similar_above_unrelated(embedder):
    sims = embedder.similarity(
        ["A man is eating food.", "A man is eating food.", "猫坐在垫子上。", "same"],
        ["A man is eating a meal.", "The stock market fell sharply today.", "The sky is blue.", "same"],
    )
    assert len(sims) == 4
    assert sims[0] > 0.7
    assert sims[0] > sims[1] + 0.4
    assert sims[3] == pytest.approx(1.0, abs=1e-5)
    assert all(-1.0 <= s <= 1.0 for s in sims)
    assert embedder.similarity([], []) == []
    with pytest.raises(ValueError):
        embedder.similarity(["a"], [])
