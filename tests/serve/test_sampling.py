"""The engine's sampler: draws follow softmax(logits / T) cut to the top-k tokens and
the top-p nucleus; OpenAI's penalties and the reported log-probs follow their formulas.

Frequencies are checked against the exact probabilities within a binomial bound: a
fixed seed makes each test deterministic, and 4.5 standard deviations makes a correct
sampler pass for almost any seed, while a wrong distribution (a missing temperature,
an unrenormalised nucleus) is off by many."""

import math

import torch

from openft.serve.engine_batch import apply_penalties, sample, token_logprob

Z = 4.5  # standard deviations allowed per token


def _counts(logits, temperature, top_p, n=4000, top_k=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.numel())
    for _ in range(n):
        counts[sample(logits[None], [temperature], [top_p], [g], [top_k])[0]] += 1
    return counts


def _assert_binomial(counts: torch.Tensor, want: torch.Tensor) -> None:
    n = float(counts.sum())
    for t, (c, p) in enumerate(zip(counts.tolist(), want.tolist())):
        bound = Z * math.sqrt(n * p * (1 - p)) + 1
        assert abs(c - n * p) <= bound, (t, c, n * p, bound)


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    counts = _counts(logits, 0.7, 1.0)
    _assert_binomial(counts, (logits / 0.7).softmax(-1))
    # The untempered distribution is far outside the bound: the test can tell them apart.
    p = logits.softmax(-1)[0].item()
    assert abs(counts[0].item() - 4000 * p) > Z * math.sqrt(4000 * p * (1 - p)) + 1


def test_top_p_keeps_exactly_the_nucleus_and_renormalises():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    probs = logits.softmax(-1)  # 0.64, 0.23, 0.09, 0.03, 0.01
    counts = _counts(logits, 1.0, 0.8)
    # 0.64 < 0.8, 0.64 + 0.23 >= 0.8: the nucleus is the first two tokens.
    assert counts[2:].sum() == 0
    want = torch.zeros(5)
    want[:2] = probs[:2] / probs[:2].sum()
    _assert_binomial(counts, want)


def test_top_p_beyond_the_top_k_shortcut_excludes_exactly_the_tail():
    # Nearly flat and strictly decreasing: the top-256 mass (~0.13) is short of
    # top_p, so the sampler must sort the whole vocabulary to find the nucleus.
    logits = -torch.arange(2000, dtype=torch.float32) * 1e-4
    probs = logits.softmax(-1)
    size = int((probs.cumsum(-1) - probs < 0.5).sum())  # tokens 0 .. size-1 form the nucleus
    counts = _counts(logits, 1.0, 0.5, n=3000)
    drawn = counts.nonzero().flatten()
    assert int(drawn.max()) < size  # never a tail token
    assert len(drawn) > 600 and int(drawn.max()) > 256  # drawn from ~1000 tokens, not just the top 256


def test_top_k_never_samples_outside_the_k_most_likely():
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, 0.0])
    counts = _counts(logits, 1.0, 1.0, top_k=3)
    top3 = [1, 3, 4]
    assert counts[[0, 2, 5]].sum() == 0
    want = torch.zeros(6)
    want[top3] = logits[top3].softmax(-1)
    _assert_binomial(counts, want)


def test_greedy_rows_and_seeded_rows_are_reproducible():
    logits = torch.randn(3, 500)

    def draw():
        gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
        return sample(logits, [0.0, 1.0, 1.0], [1.0, 0.9, 1.0], gens)

    a, b = draw(), draw()
    assert a == b and a[0] == int(logits[0].argmax())


def test_penalties_follow_openais_formula():
    logits = torch.tensor([1.0, 2.0, 0.5, -0.3])
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])  # token 0 sampled 3 times, token 1 once
    out = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    want = logits - torch.tensor([0.25 * 3 + 0.5, 0.25 * 1 + 0.5, 0.0, 0.0])
    assert torch.equal(out, want)
    # A repeated token loses probability against an unseen one by exactly that factor.
    p, q = logits.softmax(-1), out.softmax(-1)
    assert math.isclose((q[0] / q[2]).item(), (p[0] / p[2]).item() * math.exp(-(0.25 * 3 + 0.5)), rel_tol=1e-5)
    # Negative penalties favour repetition; zero penalties change nothing.
    assert apply_penalties(logits, counts, -0.5, 0.0)[0] > logits[0]
    assert torch.equal(apply_penalties(logits, counts, 0.0, 0.0), logits)


def test_logprobs_are_the_log_softmax_sorted_and_normalised():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, generator=g) * 3
    chosen = int(logits.argmax())
    lp, top = token_logprob(logits, chosen, k=logits.numel())
    assert math.isclose(sum(math.exp(v) for _, v in top), 1.0, rel_tol=1e-4)  # over the whole vocabulary
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    assert top[0] == (chosen, lp)  # under greedy the chosen token is the first entry
    other = int(logits.argmin())
    lp_other, top5 = token_logprob(logits, other, k=5)
    assert math.isclose(lp_other, float(logits.log_softmax(-1)[other]), rel_tol=1e-6)
    assert len(top5) == 5 and [t for t, _ in top5] == logits.topk(5).indices.tolist()
