import pytest
import torch
from transformers import AutoModelForCausalLM

from openft.data.types import Example, Message
from openft.train.batching import collate, micro_batches
from openft.train.loss import causal_lm_loss, reference_loss
from openft.train.tokenize import encode


def test_loss_only_on_labelled_positions_equals_full_logits_loss(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exs = [
        Example(messages=[Message("user", "q" * (i + 1)), Message("assistant", "answer " * (i + 2))]) for i in range(4)
    ]
    items = [encode(tiny_tokenizer, e, 512) for e in exs]
    mb = collate(items, tiny_tokenizer.pad_token_id)
    out = causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels)
    ref = reference_loss(model, mb.input_ids, mb.attention_mask, mb.labels)
    assert out.n_tokens == mb.n_trained  # position 0 (the template start) is never a target
    torch.testing.assert_close(out.loss_sum / out.n_tokens, ref, rtol=1e-5, atol=1e-5)


def test_gradient_is_independent_of_micro_batching(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exs = [
        Example(messages=[Message("user", "hi " * (i + 1)), Message("assistant", "yo " * (5 - i))]) for i in range(5)
    ]
    items = [encode(tiny_tokenizer, e, 512) for e in exs]
    total = sum(e.n_trained for e in items)

    def grads(budget):
        model.zero_grad()
        for mb in micro_batches(items, tiny_tokenizer.pad_token_id, budget):
            (causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels).loss_sum / total).backward()
        return model.lm_head.weight.grad.clone()

    one, many = grads(100_000), grads(40)
    assert len(micro_batches(items, tiny_tokenizer.pad_token_id, 40)) > 1
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-6)


def test_micro_batches_reduce_padding(tiny_tokenizer):
    exs = [Example(messages=[Message("user", "x " * n), Message("assistant", "y")]) for n in (1, 2, 3, 200, 201, 202)]
    items = [encode(tiny_tokenizer, e, 512) for e in exs]
    mbs = micro_batches(items, 0, 500)
    padded = sum(mb.input_ids.numel() for mb in mbs)
    plain = collate(items, 0).input_ids.numel()
    assert padded < 0.7 * plain
    assert sum(mb.n_tokens for mb in mbs) == sum(len(e) for e in items)


def _grads(model, fn, mb):
    model.zero_grad(set_to_none=True)
    fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_head_gradients_equal_full_logits_gradients(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """Full fine-tuning: every parameter, the tied head/embedding included, gets the
    gradient the plain full-logits loss gives; with several head chunks too."""
    import openft.train.loss as loss_mod

    monkeypatch.setattr(
        loss_mod, "tile_shape", lambda rows, vocab, keep=False: (7, 5)
    )  # several chunks, a ragged last one
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exs = [
        Example(messages=[Message("user", "w" * (i + 2)), Message("assistant", "reply " * (i + 3))]) for i in range(3)
    ]
    mb = collate([encode(tiny_tokenizer, e, 512) for e in exs], tiny_tokenizer.pad_token_id)
    n = mb.n_trained
    fused = _grads(model, lambda: causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels).loss_sum / n, mb)
    ref = _grads(model, lambda: reference_loss(model, mb.input_ids, mb.attention_mask, mb.labels), mb)
    assert set(fused) == set(ref) and len(ref) > 5
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("head", [False, True], ids=["decoder", "decoder-and-head"])
def test_fused_head_lora_gradients_and_accuracy(tiny_model_dir, tiny_tokenizer, monkeypatch, head):
    """LoRA's gradients through the fused head loss equal the full-logits loss's; with
    a LoRA on the (tied) head itself too, over several ragged head chunks."""
    import openft.train.loss as loss_mod
    from openft.train.lora import HEAD, LoraParams, apply_lora, default_targets

    monkeypatch.setattr(loss_mod, "tile_shape", lambda rows, vocab, keep=False: (7, 5))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    targets = tuple(default_targets(model)) + ((HEAD,) if head else ())
    apply_lora(model, LoraParams(rank=4, alpha=8.0, dropout=0.0, target_modules=targets))
    assert any(n.startswith("lm_head.lora_B") for n, _ in model.named_parameters()) is head
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 at start would make A's gradient zero
    exs = [Example(messages=[Message("user", "z " * (i + 1)), Message("assistant", "ok " * (4 - i))]) for i in range(4)]
    mb = collate([encode(tiny_tokenizer, e, 512) for e in exs], tiny_tokenizer.pad_token_id)
    out = causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels)
    fused = _grads(
        model, lambda: causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels).loss_sum / mb.n_trained, mb
    )
    ref = _grads(model, lambda: reference_loss(model, mb.input_ids, mb.attention_mask, mb.labels), mb)
    assert set(fused) == set(ref) and all("lora_" in n for n in ref)
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
        target = mb.labels[:, 1:]
        sel = target != -100
        assert out.n_correct == int((logits.argmax(-1)[sel] == target[sel]).sum())
        no_grad = causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels)  # the evaluation path
    torch.testing.assert_close(no_grad.loss_sum, out.loss_sum.detach(), rtol=1e-5, atol=1e-5)


def test_shape_buckets_bound_padding_and_reuse_widths(tiny_model_dir, tiny_tokenizer):
    from openft.hardware import shape_bucket

    widths = [shape_bucket(n) for n in range(1, 2049)]
    assert all(n <= w <= n * 1.125 for n, w in zip(range(1, 2049), widths))
    assert len(set(widths[256:])) <= 8 * 3 + 1  # 8 widths per power of two from 257 to 2048
    exs = [Example(messages=[Message("user", "x " * n), Message("assistant", "y " * 3)]) for n in (30, 31, 45, 60, 90)]
    items = [encode(tiny_tokenizer, e, 512) for e in exs]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total = sum(e.n_trained for e in items)
    losses = {}
    for name, width in (("exact", None), ("bucketed", shape_bucket)):
        mbs = micro_batches(items, tiny_tokenizer.pad_token_id, 200, width)
        for mb in mbs:
            assert mb.input_ids.shape[1] == (width or (lambda n: n))(max(int(r.sum()) for r in mb.attention_mask))
            assert mb.input_ids.numel() <= 200 or mb.input_ids.shape[0] == 1  # the budget counts padded widths
        assert sum(mb.n_tokens for mb in mbs) == sum(len(e) for e in items)
        with torch.no_grad():
            losses[name] = (
                sum(float(causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels).loss_sum) for mb in mbs)
                / total
            )
    # Padding is masked: the wider rows leave the loss as it was.
    assert abs(losses["exact"] - losses["bucketed"]) < 1e-5


@pytest.mark.parametrize("full", [False, True], ids=["frozen-bf16-head", "trained-fp32-head"])
def test_tiled_head_loss_in_bf16_matches_the_full_logits_loss(monkeypatch, full):
    """bf16 training: the head scanned in tiles of rows x vocabulary slices (online
    softmax across slices, exp in bf16) gives the loss, the argmax hits and the
    gradients of cross-entropy over the full bf16 logits, to bf16 rounding."""
    import torch.nn.functional as F

    import openft.train.loss as loss_mod

    monkeypatch.setattr(
        loss_mod, "tile_shape", lambda rows, vocab, keep=False: (16, 96)
    )  # 3 row blocks, 11 ragged slices
    torch.manual_seed(0)
    vocab, hidden, n = 1000, 32, 40
    head = torch.nn.Linear(hidden, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=0.3)
    if not full:  # LoRA's frozen base: stored in bf16
        head.weight.data = head.weight.data.bfloat16()
        head.weight.requires_grad_(False)
    rows0 = torch.randn(n, hidden)
    y = torch.randint(0, vocab, (n,))
    y[:4] = torch.tensor([0, 95, 96, vocab - 1])  # labels on slice edges
    y[n // 2 :] = F.linear(rows0[n // 2 :], head.weight.float()).argmax(-1)  # rows that score a hit

    def run(fn):
        rows = rows0.clone().requires_grad_(True)
        head.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, correct = fn(rows)
        loss.backward()
        return float(loss.detach()), int(correct), rows.grad.clone(), None if not full else head.weight.grad.clone()

    def reference(rows):
        logits = F.linear(rows, head.weight).float()  # bf16 product, fp32 CE
        # A hit is the label's logit being the largest (a bf16 tie counts), as in training.
        return F.cross_entropy(logits, y, reduction="sum"), (
            logits.gather(1, y[:, None])[:, 0] >= logits.amax(-1)
        ).sum()

    got, want = run(lambda rows: loss_mod.chunked_head_loss(head, rows, y)), run(reference)
    assert abs(got[0] - want[0]) <= 2e-3 * abs(want[0])
    assert got[1] == want[1] and want[1] >= n // 4
    torch.testing.assert_close(got[2], want[2], rtol=0.02, atol=0.02 * float(want[2].abs().max()))
    if full:
        torch.testing.assert_close(got[3], want[3], rtol=0.02, atol=0.02 * float(want[3].abs().max()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the evaluation path
        eval_loss, eval_correct = loss_mod.chunked_head_loss(head, rows0, y)
    assert abs(float(eval_loss) - got[0]) <= 1e-4 * abs(got[0]) and eval_correct == got[1]
