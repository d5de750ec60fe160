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


def test_inference_forward_equals_the_plain_formula():
    """Inference accumulates B(h) into the base output in place (one addmm): equal
    to the plain formula up to rounding, for 3-D and 2-D inputs and any scaling."""
    from openft.train.lora import add_low_rank

    layer = _layer(1)
    layer.scaling = 1.7  # not a power of two: the rounding of the scaled path shows
    for x in (torch.randn(2, 5, 24), torch.randn(6, 24)):
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                torch.testing.assert_close(layer(x), _plain(layer, x), rtol=1e-5, atol=1e-6)
    # In place only when nothing needs gradients: under autograd the base output is left as it was.
    out = torch.randn(3, 40)
    h, b = torch.randn(3, 4, requires_grad=True), torch.randn(40, 4)
    kept = out.clone()
    res = add_low_rank(out, h, b)
    assert torch.equal(out, kept) and res.requires_grad
    torch.testing.assert_close(res, kept + h @ b.t())


def test_merged_layer_returns_base_output_with_delta_folded_in():
    layer = _layer(2)
    x = torch.randn(4, 24)
    with torch.no_grad():
        before = _plain(layer, x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
