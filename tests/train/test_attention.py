"""Training attention as matmuls (bf16 on a CPU) against torch's SDPA."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from openft.train.attention import MatmulAttention, causal_bias, use
from openft.train.precision import Precision


def _inputs(dtype=torch.float32, b=2, h=6, kv=2, t=7, d=8):
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(b, n, t, d, generator=g, dtype=torch.float32).to(dtype).requires_grad_() for n in (h, kv, kv)
    )
    real = torch.ones(b, t, dtype=torch.bool)
    real[1, :2] = False  # left padding in row 1
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & real[:, None, None, :]  # (B, 1, T, T)
    bias = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return q, k, v, bias, allowed


def _reference(q, k, v, allowed):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allowed)


def _assert_matches_sdpa(**shape):
    q, k, v, bias, allowed = _inputs(**shape)
    out = MatmulAttention.apply(q, k, v, bias, q.shape[-1] ** -0.5)
    # A query with no key allowed (left padding) has no defined output: nothing
    # downstream reads it (training pads on the right, the loss skips padding).
    real_rows = allowed.any(-1, keepdim=True)
    grad = torch.randn_like(out) * real_rows
    ours = torch.autograd.grad(out, (q, k, v), grad)
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = _reference(q2, k2, v2, allowed)
    theirs = torch.autograd.grad(ref, (q2, k2, v2), grad)
    torch.testing.assert_close(out * real_rows, ref * real_rows, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_matches_sdpa_forward_and_backward_in_fp32():
    _assert_matches_sdpa()


def test_long_rows_run_the_compiled_softmax_and_match_sdpa():
    from openft.train import fused

    _assert_matches_sdpa(h=2, kv=1, t=fused.COMPILE_MIN_POSITIONS, d=4)
    if any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        assert fused.softmax_bias.compiled is not None and not fused.softmax_bias.eager
        assert fused.softmax_backward.compiled is not None and not fused.softmax_backward.eager


def test_bf16_under_autocast_stays_close_to_fp32():
    q, k, v, bias, allowed = _inputs()
    grad = torch.randn(q.shape)
    exact = torch.autograd.grad(MatmulAttention.apply(q, k, v, bias, 0.35), (q, k, v), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MatmulAttention.apply(q, k, v, bias, 0.35)
    assert out.dtype == torch.bfloat16
    approx = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    for a, e in zip(approx, exact):
        assert a.dtype == torch.float32  # gradients come back in the inputs' dtype
        assert F.cosine_similarity(a.flatten(), e.flatten(), dim=0) > 0.999


def test_causal_bias_without_a_mask():
    bias = causal_bias(3, 5, "cpu")  # 3 new queries after 2 earlier positions
    assert bias.shape == (1, 1, 3, 5)
    assert torch.equal(
        torch.isinf(bias[0, 0]), torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    )


@pytest.mark.parametrize("padded", [True, False])
def test_model_loss_and_gradients_unchanged_and_undo(tiny_model_dir, padded):
    """The tiny model's training loss (openft's, on a right-padded batch as
    training builds them, or an unpadded one) and every gradient with matmul
    attention equal SDPA's in fp32, and the undo puts SDPA back."""
    from openft.models.load import load_model
    from openft.train.loss import causal_lm_loss

    model = load_model(str(tiny_model_dir)).model
    ids = torch.tensor([[5, 17, 300, 42, 7, 99], [8, 9, 10, 11, 0, 0] if padded else [8, 9, 10, 11, 12, 13]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)

    def loss_and_grads():
        model.zero_grad()
        loss = causal_lm_loss(model, ids, mask, labels).loss_sum
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    before = model.config._attn_implementation
    ref_loss, ref_grads = loss_and_grads()
    undo = use(model)
    assert model.config._attn_implementation == "openft_matmul"
    loss, grads = loss_and_grads()
    undo()
    assert model.config._attn_implementation == before
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_only_bf16_on_a_cpu_switches(tiny_model_dir):
    from openft.models.load import load_model

    model = load_model(str(tiny_model_dir)).model
    before = model.config._attn_implementation
    Precision("fp32", "cpu").use_kernels(model, full=True)()
    assert model.config._attn_implementation == before
    undo = Precision("bf16", "cpu").use_kernels(model, full=False)
    assert model.config._attn_implementation == "openft_matmul"
    undo()
    assert model.config._attn_implementation == before
