"""Causal-LM loss computed only where labels exist.

The straightforward loss runs the LM head over every position, (B, T, V) logits
with V = 49k for the built-in (262k for Gemma 3: 1 GiB fp32 for 1024 tokens), and then throws away the positions whose labels are
masked (prompts, padding). Here the decoder's hidden states are gathered at the
trained positions first and the head + cross-entropy run in chunks over those rows
only, so the full logits tensor never exists; in training the head's gradient is
formed chunk by chunk in the forward pass (`_HeadCrossEntropy`), so no chunk's
logits are kept for backward either. `tests/train/test_loss.py` checks loss and
gradients equal the straightforward computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openft.train.lora import LoraLinear
from openft.train.tokenize import IGNORE

# The logits alive at a time: 256 rows x 49152 (the built-in's vocabulary) x 4 B = 50 MB.
# A chunk has as many rows as fit that budget, so a 262k vocabulary (Gemma 3) takes 48
# rows (48 MB), not 256 rows (256 MB fp32, and half as much again for its bf16 product).
CHUNK_ELEMENTS = 256 * 49152
MIN_CHUNK_ROWS = 8  # below this the head's matmul runs too far under the kernels' speed


def chunk_rows(vocab: int) -> int:
    """Rows of the head per chunk for a `vocab`-wide head: (rows, vocab) within CHUNK_ELEMENTS."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, vocab))


@dataclass
class LossOut:
    loss_sum: torch.Tensor  # scalar, summed over trained tokens (graph attached)
    n_tokens: int
    n_correct: int  # argmax == label, for token accuracy


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.get_decoder(), model.get_output_embeddings()


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(head(rows_i), y_i) with the gradient computed in the forward pass,
    one chunk of rows at a time (a "fused linear cross-entropy").

    Autograd through plain chunks would keep every chunk's (n, V) log-softmax
    alive until backward: 196 KB per trained token for a 49k vocabulary, more
    than the whole decoder's activations for that token. Here only one chunk's
    logits exist at a time; what is kept for backward is d loss / d rows (N x H)
    and, when the head itself trains (full fine-tuning), d loss / d weight.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, low, lora_b, y, chunk):  # noqa: D401 - autograd API
        """`low` (N, r) and `lora_b` (V, r), or both None: a LoRA on the head adds
        low @ lora_b.T to the logits (low = scaling * A(rows), computed by autograd)."""
        need_rows, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_low, need_lb = low is not None and ctx.needs_input_grad[3], low is not None and ctx.needs_input_grad[4]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        grad_low = torch.empty_like(low) if need_low else None
        grad_lb = torch.zeros_like(lora_b) if need_lb else None
        loss = torch.zeros((), dtype=torch.float32, device=rows.device)
        correct = torch.zeros((), dtype=torch.long, device=rows.device)
        for s in range(0, rows.shape[0], chunk):
            r, t = rows[s : s + chunk], y[s : s + chunk]
            logits = F.linear(r, weight, bias).float()  # (n, V): the one big buffer
            if low is not None:
                logits.addmm_(low[s : s + chunk].float(), lora_b.t().float())
            picked = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(-1, keepdim=True)
            # A hit is the label's logit being the largest: the max is needed for the
            # softmax anyway, so no argmax pass over the (n, V) buffer (1% of a step).
            correct += (picked >= top[:, 0]).sum()
            # Softmax in place (no second (n, V) temporary as logsumexp would make);
            # then d CE / d logits = softmax - onehot, in the same buffer.
            z = logits.sub_(top).exp_().sum(-1, keepdim=True)
            loss += (top + z.log() - picked[:, None]).sum()
            g = logits.div_(z)
            g[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            g = g.to(r.dtype)
            if need_rows:
                grad_rows[s : s + chunk] = g @ weight
            if need_w:
                grad_w.addmm_(g.t(), r)
            if need_b:
                grad_b += g.sum(0)
            if need_low:
                grad_low[s : s + chunk] = g @ lora_b.to(g.dtype)
            if need_lb:
                grad_lb.addmm_(g.t().to(grad_lb.dtype), low[s : s + chunk].to(grad_lb.dtype))
            # Freed before the next chunk's logits exist: otherwise `logits = ...` keeps this
            # chunk alive while the next is built, two chunks at once (measured: 508 vs 254 MiB
            # for 256-row chunks of a 262k vocabulary).
            del logits, g
        grads = (grad_rows, grad_w, grad_b, grad_low, grad_lb)
        ctx.save_for_backward(*(x for x in grads if x is not None))
        ctx.which = (need_rows, need_w, need_b, need_low, need_lb)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = iter(ctx.saved_tensors)
        # In place: a second head-sized buffer here was 545 MB for the 0.5B built-in's
        # head. Each saved gradient is used once (no retain_graph in training).
        out = [next(saved).mul_(grad_loss) if need else None for need in ctx.which]  # 0-dim: keeps the grad's dtype
        return *out, None, None


# Set on a head sharded with FSDP2 in a group of its own (`openft.train.sharded`): the
# loss run as one of its forward methods, so FSDP gathers the weight around it.
HEAD_METHOD = "openft_head_loss"


def head_loss(head: nn.Module, rows: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed CE of head(rows) against y, number of argmax hits), chunked so the
    (N, V) logits never exist at once."""
    sharded = getattr(head, HEAD_METHOD, None)
    if sharded is not None:
        return sharded(rows, y)
    return chunked_head_loss(head, rows, y)


def chunked_head_loss(head: nn.Module, rows: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """head_loss on a head whose weight is whole here (unsharded), or a LoRA on it."""
    low, lora_b = None, None
    if isinstance(head, LoraLinear) and not (head.merged or head.disabled):
        low, lora_b = head.lora_A(head.dropout(rows)) * head.scaling, head.lora_B.weight
    base = head.base if isinstance(head, LoraLinear) else head
    weight, bias = base.weight, getattr(base, "bias", None)
    chunk = chunk_rows(weight.shape[0])
    trains = torch.is_grad_enabled() and (
        rows.requires_grad
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or (low is not None and (low.requires_grad or lora_b.requires_grad))
    )
    if trains:
        loss, correct = _HeadCrossEntropy.apply(rows, weight, bias, low, lora_b, y, chunk)
        return loss, int(correct)
    loss_sum, correct = rows.new_zeros((), dtype=torch.float32), 0
    for s in range(0, rows.shape[0], chunk):
        t = y[s : s + chunk]
        logits = head(rows[s : s + chunk]).float()  # (n, V)
        # CE as in training, in place: F.cross_entropy would add an (n, V) log-softmax beside it.
        picked = logits.gather(1, t[:, None]).squeeze(1)
        top = logits.amax(-1)
        correct += int((picked >= top).sum())
        z = logits.sub_(top[:, None]).exp_().sum(-1)
        loss_sum = loss_sum + (top + z.log() - picked).sum()
        del logits  # as above: one chunk's logits at a time
    return loss_sum, correct


def causal_lm_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> LossOut:
    decoder, head = decoder_and_head(model)
    device = next(head.parameters()).device  # batches are built on the CPU; the model may sit on a GPU
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    if bool(attention_mask.all()):
        attention_mask = None  # no padding: lets SDPA take its plain causal path
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
    # Position t predicts token t+1.
    target = labels[:, 1:]
    sel = target != IGNORE  # (B, T-1)
    rows = hidden[:, :-1][sel]  # (N, H)
    y = target[sel]  # (N,)
    loss_sum, correct = head_loss(head, rows, y)
    return LossOut(loss_sum, int(y.numel()), correct)


def reference_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The plain computation (full logits, mean over trained tokens), for tests."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
