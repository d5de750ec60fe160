import torch
from transformers import AutoModelForCausalLM

from openft.data.types import Example, Message
from openft.train.batching import collate, micro_batches
from openft.train.loss import causal_lm_loss, reference_loss
from openft.train.tokenize import encode


def test_loss_only_on_labelled_positions_equals_full_logits_loss(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exs = [Example(messages=[Message("user", "q" * (i + 1)), Message("assistant", "answer " * (i + 2))]) for i in range(4)]
    items = [encode(tiny_tokenizer, e, 512) for e in exs]
    mb = collate(items, tiny_tokenizer.pad_token_id)
    out = causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels)
    ref = reference_loss(model, mb.input_ids, mb.attention_mask, mb.labels)
    assert out.n_tokens == mb.n_trained  # position 0 (the template start) is never a target
    torch.testing.assert_close(out.loss_sum / out.n_tokens, ref, rtol=1e-5, atol=1e-5)


def test_gradient_is_independent_of_micro_batching(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exs = [Example(messages=[Message("user", "hi " * (i + 1)), Message("assistant", "yo " * (5 - i))]) for i in range(5)]
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
