"""bf16 linear layers over fp32 weights that keep no bf16 weight copy."""

from __future__ import annotations

import torch
from torch import nn

from openft.train import castlinear
from openft.train.precision import Precision


def _grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def test_same_results_as_autocast_and_gradients_in_fp32():
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    x, g = torch.randn(3, 5, 24), torch.randn(3, 5, 40)
    ref = _grads(layer, x, g)
    undo = castlinear.use(layer)
    ours = _grads(layer, x, g)
    undo()
    assert ours[0].dtype == torch.bfloat16  # as autocast's output
    assert ours[1].dtype == ours[2].dtype == ours[3].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0])  # the same bf16 products
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)  # bf16 products, accumulated as autocast does
    assert "forward" not in vars(layer)  # undone: the class's own forward again


def test_keeps_no_bf16_weight_copy_for_backward():
    torch.manual_seed(0)
    layer = nn.Linear(64, 256)
    x = torch.randn(2, 64, requires_grad=True)  # an activation: its gradient needs the weight

    def saved_bf16_weight_elements() -> int:
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer(x)
        return sum(t.numel() for t in saved if t.dtype == torch.bfloat16 and t.numel() >= layer.weight.numel())

    assert saved_bf16_weight_elements() == layer.weight.numel()  # plain autocast keeps one
    undo = castlinear.use(layer)
    assert saved_bf16_weight_elements() == 0
    undo()


def test_frozen_and_outside_autocast_layers_are_plain():
    frozen = nn.Linear(8, 8).requires_grad_(False)
    undo = castlinear.use(frozen)
    assert "forward" not in vars(frozen)  # a frozen (LoRA base) layer is left alone
    undo()
    layer = nn.Linear(8, 8)
    undo = castlinear.use(layer)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))  # fp32 without autocast
    undo()


def test_full_fine_tuning_gradients_match_autocast(tiny_model_dir):
    """The tiny model's loss and every gradient in bf16 full fine-tuning are those
    of plain autocast (the kernels only change what is kept), and fp32 switches nothing."""
    from openft.models.load import load_model
    from openft.train.loss import causal_lm_loss

    model = load_model(str(tiny_model_dir)).model
    model.requires_grad_(True)
    ids = torch.tensor([[5, 17, 300, 42, 7, 99], [8, 9, 10, 11, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(model, ids, mask, labels).loss_sum
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    assert not [m for m in model.modules() if "forward" in vars(m)]
    Precision("fp32", "cpu").use_kernels(model, full=True)()
    ref_loss, ref = loss_and_grads()
    undo = castlinear.use(model)
    assert len([m for m in model.modules() if "forward" in vars(m)]) >= 7  # every projection of the decoder
    loss, ours = loss_and_grads()
    undo()
    assert not [m for m in model.modules() if "forward" in vars(m)]
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-3)
    for a, b in zip(ours, ref):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_precision_uses_it_for_full_fine_tuning_only(tiny_model_dir):
    from openft.models.load import load_model

    model = load_model(str(tiny_model_dir)).model
    model.requires_grad_(True)
    # the linear layers patched (RMSNorm's fused kernels patch the norms on both paths)
    patched = lambda: [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)]  # noqa: E731
    undo = Precision("bf16", "cpu").use_kernels(model, full=False)
    assert patched() == []
    undo()
    undo = Precision("bf16", "cpu").use_kernels(model, full=True)
    assert len(patched()) >= 7
    undo()
    assert patched() == []
