"""The text_similarity metrics: identity and disjointness, hand-counted n-gram
F1s, and agreement with the reference implementations (NLTK's GLEU and BLEU,
rapidfuzz's ratio) on the same tokens."""

from __future__ import annotations

import math

import pytest

from openft.eval.scores import tokenize
from openft.eval.similarity import METRICS, bleu, gleu, meteor, rouge_n, similarity

LEXICAL = [m for m in METRICS if m != "cosine"]


@pytest.mark.parametrize("metric", LEXICAL)
def test_identical_texts_score_one_and_unrelated_texts_low(metric):
    # METEOR keeps its fragmentation penalty even for one whole chunk: 0.5 / len^3
    assert similarity(metric, "alpha beta gamma delta", "alpha beta gamma delta") == pytest.approx(1.0, abs=0.01)
    unrelated = similarity(metric, "alpha beta", "zulu yankee")
    # fuzzy_match works on characters (a, e, l... are shared); BLEU's smoothing keeps a floor
    assert unrelated < 0.35 if metric in ("fuzzy_match", "bleu") else unrelated == 0.0


@pytest.mark.parametrize("metric", [m for m in LEXICAL if m != "fuzzy_match"])
def test_token_metrics_ignore_case_and_punctuation(metric):
    assert similarity(metric, "The cat sat on the mat.", "the cat sat on the mat") == pytest.approx(1.0, abs=0.01)


def test_rouge_n_counts_clipped_ngrams():
    # unigrams: the, cat overlap (2 of 3 each side); bigrams: "the cat" (1 of 2)
    assert rouge_n("the cat sat", "the cat ran", 1) == pytest.approx(2 / 3)
    assert rouge_n("the cat sat", "the cat ran", 2) == pytest.approx(0.5)
    assert rouge_n("the cat sat", "the cat ran", 3) == 0.0
    # clipping: "the the the" shares one "the" with "the cat"
    assert rouge_n("the the the", "the cat", 1) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_gleu_matches_nltk():
    from nltk.translate.gleu_score import sentence_gleu

    for hyp, ref in [
        ("the cat is on the mat", "the cat sat on the mat"),
        ("a quick brown dog", "the quick brown fox jumps"),
        ("北京是中国的首都", "中国的首都是北京"),
    ]:
        assert gleu(hyp, ref) == pytest.approx(sentence_gleu([tokenize(ref)], tokenize(hyp)))


def test_bleu_matches_nltk_where_no_smoothing_is_needed():
    from nltk.translate.bleu_score import sentence_bleu

    hyp, ref = "the cat sat on the red mat today", "the cat sat on the mat today"
    assert bleu(hyp, ref) == pytest.approx(sentence_bleu([tokenize(ref)], tokenize(hyp)))


def test_bleu_is_not_zero_for_a_short_close_answer():
    # No 4-gram in a two-word answer: effective order and smoothing keep a signal.
    assert 0.3 < bleu("Paris", "Paris France") < 1.0
    assert bleu("x y z", "a b c d e") < bleu("a b x", "a b c d e")


def test_meteor_matches_stems():
    # "cats" and "cat" share a Porter stem: METEOR credits them, exact-match ROUGE does not.
    assert meteor("the cats sat", "the cat sat") > 0.9
    assert rouge_n("the cats sat", "the cat sat", 1) < 0.7


def test_fuzzy_match_is_the_character_edit_ratio():
    # InDel distance 1 over 21 characters
    assert similarity("fuzzy_match", "fuzzy wuzzy", "fuzzy wuzy") == pytest.approx(1 - 1 / 21)


def test_cosine_uses_the_embedder(embedder):
    same = similarity("cosine", "The capital of France is Paris.", "Paris is France's capital.", embedder)
    other = similarity("cosine", "The capital of France is Paris.", "Bananas are yellow fruit.", embedder)
    assert 0.7 < same <= 1.0 and other < same


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="rouge_9"):
        similarity("rouge_9", "a", "a")
    assert not math.isnan(similarity("rouge_l", "", ""))
