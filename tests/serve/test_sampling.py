"""The engine's sampler draws from softmax(logits / T) cut to the top-p nucleus."""

import torch

from openft.serve.engine_batch import sample


def _frequencies(logits, temperature, top_p, n=4000):
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(logits.numel())
    for _ in range(n):
        counts[sample(logits[None], [temperature], [top_p], [g])[0]] += 1
    return counts / n


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    want = (logits / 0.7).softmax(-1)
    got = _frequencies(logits, 0.7, 1.0)
    assert torch.allclose(got, want, atol=0.03), (got, want)


def test_top_p_keeps_exactly_the_nucleus_and_renormalises():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    probs = logits.softmax(-1)  # 0.64, 0.23, 0.09, 0.03, 0.01
    got = _frequencies(logits, 1.0, 0.8)
    # 0.64 < 0.8, 0.64 + 0.23 >= 0.8: the nucleus is the first two tokens.
    assert got[2:].sum() == 0
    want = probs[:2] / probs[:2].sum()
    assert torch.allclose(got[:2], want, atol=0.03), (got, want)


def test_flat_distribution_beyond_the_top_k_shortcut_still_samples_the_nucleus():
    logits = torch.zeros(2000)  # top-256 mass 0.128 < top_p: the full sort is needed
    got = _frequencies(logits, 1.0, 0.5, n=3000)
    assert (got > 0).sum() > 600  # drawn from ~1000 tokens, not just the top 256
    assert got.sum() == 1.0


def test_greedy_rows_and_seeded_rows_are_reproducible():
    logits = torch.randn(3, 500)
    a = sample(
        logits,
        [0.0, 1.0, 1.0],
        [1.0, 0.9, 1.0],
        [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
    )
    b = sample(
        logits,
        [0.0, 1.0, 1.0],
        [1.0, 0.9, 1.0],
        [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
    )
    assert a == b and a[0] == int(logits[0].argmax())
