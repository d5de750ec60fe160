"""The text-similarity metrics of OpenAI's `text_similarity` grader, each in [0, 1].

All but `fuzzy_match` work on the tokens of `openft.eval.scores.tokenize`
(case-folded words, one token per CJK character), so a Chinese answer gets a
meaningful score and "Paris." equals "paris":

- `fuzzy_match`: rapidfuzz's `fuzz.ratio` / 100 on the raw strings, i.e.
  1 - InDel distance / (len(a) + len(b)), a character-level edit similarity.
- `bleu`: sentence BLEU with up to 4-grams, brevity penalty, sacrebleu's "exp"
  smoothing and effective order: a short answer is not zeroed for having no
  4-grams, and an answer equal to its reference scores 1.
- `gleu`: Google-BLEU (Wu et al. 2016): min(precision, recall) over all 1..4-grams.
- `meteor`: METEOR (Banerjee & Lavie) with exact and Porter-stem matches, as
  NLTK computes it; WordNet synonyms are left out (no corpus is downloaded here).
- `rouge_1` .. `rouge_5`: F1 over clipped n-gram counts, as `rouge-score` does.
- `rouge_l`: F1 over the longest common subsequence.
- `cosine`: cosine similarity of all-MiniLM-L6-v2 embeddings (the model the
  before/after comparison already ships), clipped below at 0.
"""

from __future__ import annotations

import math
from collections import Counter

from openft.eval.scores import Embedder, rouge_l, tokenize

METRICS = (
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)


def fuzzy_match(text: str, reference: str) -> float:
    from rapidfuzz import fuzz

    if not text and not reference:
        return 1.0
    return fuzz.ratio(text, reference) / 100.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(text: str, reference: str, max_n: int = 4) -> float:
    hyp, ref = tokenize(text), tokenize(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    order = min(max_n, len(hyp))  # effective order: only n-grams the answer can have
    log_sum, smooth = 0.0, 1.0
    for n in range(1, order + 1):
        h = _ngrams(hyp, n)
        total = sum(h.values())
        matches = sum((h & _ngrams(ref, n)).values())
        if matches == 0:
            smooth *= 2.0  # sacrebleu "exp": 1 / (2^k * total) for the k-th zero precision
            log_sum += math.log(1.0 / (smooth * total))
        else:
            log_sum += math.log(matches / total)
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1.0 - len(ref) / len(hyp))
    return brevity * math.exp(log_sum / order)


def gleu(text: str, reference: str, max_n: int = 4) -> float:
    hyp, ref = tokenize(text), tokenize(reference)
    h_all, r_all = Counter(), Counter()
    for n in range(1, max_n + 1):
        h_all += _ngrams(hyp, n)
        r_all += _ngrams(ref, n)
    h_total, r_total = sum(h_all.values()), sum(r_all.values())
    if not h_total or not r_total:
        return float(hyp == ref)
    matches = sum((h_all & r_all).values())
    return min(matches / h_total, matches / r_total)


class _NoSynonyms:
    """Stands in for NLTK's WordNet reader: METEOR's synonym stage finds nothing."""

    def synsets(self, *args, **kwargs) -> list:
        return []


def meteor(text: str, reference: str) -> float:
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import meteor_score

    hyp, ref = tokenize(text), tokenize(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    return float(meteor_score([ref], hyp, stemmer=PorterStemmer(), wordnet=_NoSynonyms()))


def rouge_n(text: str, reference: str, n: int) -> float:
    h, r = _ngrams(tokenize(text), n), _ngrams(tokenize(reference), n)
    h_total, r_total = sum(h.values()), sum(r.values())
    if not h_total or not r_total:
        return float(h_total == r_total and tokenize(text) == tokenize(reference))
    overlap = sum((h & r).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / h_total, overlap / r_total
    return 2 * precision * recall / (precision + recall)


def similarity(metric: str, text: str, reference: str, embedder: Embedder | None = None) -> float:
    """The score of `text` against `reference` by one of METRICS."""
    if metric == "fuzzy_match":
        return fuzzy_match(text, reference)
    if metric == "bleu":
        return bleu(text, reference)
    if metric == "gleu":
        return gleu(text, reference)
    if metric == "meteor":
        return meteor(text, reference)
    if metric == "rouge_l":
        return rouge_l(text, reference)
    if metric.startswith("rouge_") and metric[6:].isdigit() and 1 <= int(metric[6:]) <= 5:
        return rouge_n(text, reference, int(metric[6:]))
    if metric == "cosine":
        return max(0.0, (embedder or Embedder()).similarity([text], [reference])[0])
    raise ValueError(f"unknown evaluation_metric {metric!r}: one of {', '.join(METRICS)}")
