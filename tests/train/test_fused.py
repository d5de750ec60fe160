"""The compiled kernels of bf16 training on a CPU (openft.train.fused) against the
eager transformers modules they replace, and their fallback to eager."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from openft.train import fused
from tests.train.families import FAMILIES, tiny_config

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _family_model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=96, bos=1, eos=2, pad=0))


def _norms(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def _run(norm, x, dy):
    y = norm(x)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), dy)
    return y, gx, gw


@pytest.mark.parametrize("family", FAMILIES)
def test_rmsnorm_of_each_family_matches_its_module(family):
    model = _family_model(family)
    norms = _norms(model)
    assert norms and all(type(m).__name__ in fused.RMS_CLASSES for m in norms)  # every norm is covered
    norm = norms[0]
    with torch.no_grad():
        norm.weight.normal_()  # not the init's ones/zeros, where the two forms coincide
    width = fused.COMPILE_MIN_POSITIONS  # rows this long take the compiled kernels
    x = torch.randn(2, width, norm.weight.shape[0], requires_grad=True)
    dy = torch.randn(2, width, norm.weight.shape[0])
    expected = _run(norm, x, dy)
    undo = fused.use(model)
    got = _run(norm, x, dy)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    undo()
    assert "forward" not in vars(norm)  # the module's own forward again
    form = fused.RMS_CLASSES[type(norm).__name__][0]
    if HAS_COMPILER:
        assert not any(k.eager for k in fused.RMS_FORMS[form])  # these ran compiled


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_rmsnorm_in_bf16_stays_within_rounding(family):
    norm = _norms(_family_model(family))[0].to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(1, fused.COMPILE_MIN_POSITIONS, norm.weight.shape[0]).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(1, fused.COMPILE_MIN_POSITIONS, norm.weight.shape[0]).to(torch.bfloat16)
    y0 = norm(x)
    (g0,) = torch.autograd.grad(y0, x, dy)
    fused.use(norm)
    y1 = norm(x)
    (g1,) = torch.autograd.grad(y1, x, dy)
    assert y1.dtype == y0.dtype == torch.bfloat16
    assert norm.weight.grad is None  # a frozen weight gets no gradient
    for a, b in ((y1, y0), (g1, g0)):
        assert F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.9999


def test_only_long_rows_take_the_compiled_kernels():
    short, long = fused.COMPILE_MIN_POSITIONS - 1, fused.COMPILE_MIN_POSITIONS
    assert fused.for_width(fused.softmax, short) is fused.softmax.fn  # eager: no compiler stack loaded
    assert fused.for_width(fused.softmax, long) is fused.softmax


def test_softmax_kernels_match_eager():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 2, 3, 9, 9, generator=g).to(torch.bfloat16)
    bias = torch.zeros(1, 1, 1, 9, 9).masked_fill_(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    dp = torch.randn(scores.shape, generator=g).to(torch.bfloat16)
    p = fused.softmax_bias(scores, bias, 0.25)
    assert p.dtype == torch.bfloat16 and float(p[..., 0, 1:].abs().max()) == 0.0  # masked keys get nothing
    for kernel, args in (
        (fused.softmax, (scores, 0.25)),
        (fused.softmax_bias, (scores, bias, 0.25)),
        (fused.softmax_backward, (p, dp, 0.25)),
    ):
        torch.testing.assert_close(kernel(*args).float(), kernel.fn(*args).float(), atol=8e-3, rtol=1e-2)
        if HAS_COMPILER:
            assert not kernel.eager


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the kernels run eagerly here anyway")
def test_a_failing_compiler_falls_back_to_eager_once(caplog):
    import torch._inductor.config as inductor_config

    scale = 3.0 + torch.rand(()).item()  # a graph no earlier run compiled (no cached code to load)

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * scale + 1.0

    kernel = fused.Kernel(scaled)
    x = torch.randn(4, 8)
    missing = {"cpp.cxx": ("/nonexistent/openft-test-c++",)}  # inductor's own config override, undone on exit
    with inductor_config.patch(missing), caplog.at_level(logging.WARNING, logger="openft.train.fused"):
        y = kernel(x)
        y2 = kernel(x)
    assert kernel.eager
    torch.testing.assert_close(y, scaled(x))
    torch.testing.assert_close(y2, y)
    assert sum("compiling scaled failed" in r.getMessage() for r in caplog.records) == 1  # one warning, not one a call


def test_compile_off_runs_eagerly(monkeypatch):
    monkeypatch.setenv(fused.COMPILE_ENV, "0")
    kernel = fused.Kernel(torch.neg)
    x = torch.randn(3)
    torch.testing.assert_close(kernel(x), -x)
    assert kernel.eager and kernel.compiled is None  # never handed to torch.compile


def test_loaded_models_keep_the_fused_norms_through_train_and_eval(tiny_model_dir):
    """transformers "kernelizes" a model loaded with its default use_kernels=True on
    every train()/eval(), resetting each RMSNorm's forward to its class's: the
    loader turns that off, so the fused kernels stay in for the whole run."""
    from openft.models.load import load_model

    model = load_model(str(tiny_model_dir)).model
    fused.use(model)
    model.train()
    model.eval()
    model.train()
    norms = _norms(model)
    assert norms and all(m.forward.__func__ is fused._rms_forward for m in norms)
