"""LoRA layers: the training fast path computes what the plain formula computes."""

import torch
from torch import nn

from openft.train.lora import LoraLinear


def _layer(seed: int = 0) -> LoraLinear:
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(24, 40, bias=True), rank=4, alpha=8.0, dropout=0.0)
    for p in layer.base.parameters():
        p.requires_grad_(False)
    nn.init.normal_(layer.lora_B.weight)  # B starts at zero; give it a value so the path counts
    return layer


def _plain(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    return layer.base(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling


def test_training_forward_and_gradients_equal_plain_formula():
    layer = _layer()
    x = torch.randn(3, 7, 24, requires_grad=True)
    upstream = torch.randn(3, 7, 40)

    fast = layer(x)
    fast.backward(upstream)
    got = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    x.grad = None
    layer.zero_grad()
    ref = _plain(layer, x)
    ref.backward(upstream)

    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got, (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert layer.base.weight.grad is None  # the frozen base gets no gradient


def test_inference_forward_is_bitwise_the_plain_formula():
    """Serving (engine_lora) uses the plain op order; evaluation here must agree exactly."""
    layer = _layer(1)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        assert torch.equal(layer(x), _plain(layer, x))
    with torch.inference_mode():
        assert torch.equal(layer(x), _plain(layer, x))


def test_merged_layer_returns_base_output_with_delta_folded_in():
    layer = _layer(2)
    x = torch.randn(4, 24)
    with torch.no_grad():
        before = _plain(layer, x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
