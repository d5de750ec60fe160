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


def test_the_head_trains_where_the_data_teaches_a_control_token(tiny_tokenizer):
    """`<filename>` (an added token of the built-in's vocabulary, as `<tool_call>` is of
    Qwen's) in a trained answer asks for the head; turn ends and plain text do not."""
    from openft.data.types import Example, Message
    from openft.train.lora import needs_head
    from openft.train.tokenize import encode

    def labels(answer: str) -> list[int]:
        return encode(
            tiny_tokenizer, Example(messages=[Message("user", "q"), Message("assistant", answer)]), 512
        ).labels

    assert needs_head(tiny_tokenizer, [labels("plain words")]) == []  # its <|im_end|> is a turn end
    filename = tiny_tokenizer.convert_tokens_to_ids("<filename>")
    assert needs_head(tiny_tokenizer, [labels("plain"), labels("see <filename> a.py")]) == [filename]
    prompt_only = encode(
        tiny_tokenizer, Example(messages=[Message("user", "<filename> x"), Message("assistant", "ok")]), 512
    )
    assert needs_head(tiny_tokenizer, [prompt_only.labels]) == []  # in the prompt: read, never written


def test_merging_a_lora_on_a_tied_head_unties_it_and_keeps_the_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from openft.train.lora import HEAD, LoraParams, apply_lora, default_targets, merge_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    torch.manual_seed(0)
    apply_lora(model, LoraParams(4, 8.0, 0.0, (*default_targets(model), HEAD)))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    ids = torch.tensor([[1, 7, 42, 9, 3]])
    with torch.no_grad():
        want = model(ids).logits
        merge_lora(model)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding is as it was
    assert not torch.equal(model.lm_head.weight, embedding) and not model.config.tie_word_embeddings
