"""Causal-LM loss computed only where labels exist.

The straightforward loss runs the LM head over every position, (B, T, V) logits
with V = 49k for the built-in (262k for Gemma 3: 1 GiB fp32 for 1024 tokens),
and then throws away the positions whose labels are masked (prompts, padding).
Here the decoder's hidden states are gathered at the trained positions first and
the head + cross-entropy run over those rows only, one tile of (rows, vocabulary
slice) at a time, so the full logits tensor never exists; in training the head's
gradient is formed tile by tile in the forward pass (`_HeadCrossEntropy`), so no
tile's logits are kept for backward either. A tile takes every row of the call
where it can and cuts the vocabulary instead: each pass over the rows re-reads
the whole (V, H) weight, so row chunks of a large vocabulary ran its products at
a third of the machine's speed. `tests/train/test_loss.py` checks loss and
gradients equal the straightforward computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openft.train.lora import LoraLinear
from openft.train.tokenize import IGNORE

# The logits alive at a time: one tile of (rows, vocabulary slice), 6.3M values (24 MiB in
# fp32, half as much again for its bf16 product and probabilities).
TILE_ELEMENTS = 128 * 49152
# A tile has as many rows as share one pass over the head's weight: the products
# re-read the whole (V, H) weight once per block of rows, so few rows leave them bound
# by that read (the 152k head at 82 rows ran at 0.8 TFLOP/s on AMX, against 1.5-2.5
# at 400-512; benchmarks/RESULTS.md, "The LM head in tiles").
TILE_ROWS = 512  # rows per tile of a large vocabulary: a micro-batch's trained rows at once
# Where the head trains (full fine-tuning) a block's tiles are kept for the second pass:
# 128 MiB in bf16 at most (256 rows of Gemma's 262k vocabulary). Autocast's cached bf16
# copy of the whole head weight, which the row chunks held, was 335 MB there.
KEPT_ELEMENTS = 64 * 2**20
# Kept for openft.train.vocab_parallel, which chunks its vocabulary slice by rows.
CHUNK_ELEMENTS = 256 * 49152
MIN_CHUNK_ROWS = 8  # below this the head's matmul runs too far under the kernels' speed


def chunk_rows(vocab: int) -> int:
    """Rows of the head per chunk for a `vocab`-wide head: (rows, vocab) within CHUNK_ELEMENTS."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, vocab))


def tile_shape(n_rows: int, vocab: int, keep: bool = False) -> tuple[int, int]:
    """(rows, vocabulary columns) of one tile of logits. The slice width depends on the
    vocabulary alone (TILE_ROWS rows' share of the budget), so every
    call allocates tiles of the same few sizes, which the allocator reuses; a block
    then has as many of the call's rows as the budget allows. `keep`: a block's tiles
    are all kept for the head's own gradients, so at most KEPT_ELEMENTS // vocab rows."""
    cols = max(1, min(vocab, TILE_ELEMENTS // TILE_ROWS))
    cap = max(MIN_CHUNK_ROWS, KEPT_ELEMENTS // max(1, vocab)) if keep else n_rows
    return max(1, min(n_rows, cap, TILE_ELEMENTS // cols)), cols


@dataclass
class LossOut:
    loss_sum: torch.Tensor  # scalar, summed over trained tokens (graph attached)
    n_tokens: int
    n_correct: int  # argmax == label, for token accuracy


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.get_decoder(), model.get_output_embeddings()


@dataclass
class _Head:
    """The head's tensors for one call: logits = rows W^T + b (+ low lora_b^T, a LoRA on it)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    low: torch.Tensor | None  # (N, r) = scaling * A(rows), or None
    lora_b: torch.Tensor | None  # (V, r), or None

    @property
    def dtype(self) -> torch.dtype:
        """The products' dtype: autocast's where it is on (bf16 training), else the weight's."""
        device = self.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype

    def rows_of(self, s0: int, s1: int) -> torch.Tensor:
        """The weight's vocabulary rows s0:s1 in the products' dtype, cast once for a tile's
        two products (a slice is not the leaf autocast caches casts of)."""
        return self.weight[s0:s1].to(self.dtype)

    def logits(self, r: torch.Tensor, lo: int, hi: int, s0: int, w: torch.Tensor) -> torch.Tensor:
        """Logits of rows lo:hi (already `r`) over the vocabulary rows `w` (from s0), in
        the products' dtype (bf16 under autocast: the product rounds them anyway); a new buffer."""
        s1 = s0 + w.shape[0]
        out = F.linear(r.to(w.dtype), w, None if self.bias is None else self.bias[s0:s1].to(w.dtype))
        if self.low is not None:
            out.addmm_(self.low[lo:hi].to(out.dtype), self.lora_b[s0:s1].t().to(out.dtype))
        return out


def _exp_shifted(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(logits - m) in place, in the logits' dtype. In bf16 too: m is one of the
    logits (exact in bf16), so the shift rounds once, and what the head's backward
    products take is bf16 anyway; the sums over it run in fp32 (`.sum(dtype=)`)."""
    return logits.sub_(m.to(logits.dtype)[:, None]).exp_()


@dataclass
class _Scan:
    """A block of rows scanned over the vocabulary: log-sum-exp, the label's logit, and
    either (online, as flash attention accumulates its output) sum_v softmax_v W_v,
    whose difference from the label's row W_y is d CE / d rows, or each tile's
    exp(logits - its running max), kept for the head's own gradients."""

    lse: torch.Tensor  # (R,) fp32
    picked: torch.Tensor  # (R,) fp32: the label's logit
    top: torch.Tensor  # (R,) fp32: the largest logit
    z: torch.Tensor  # (R,) fp32: sum_v exp(logit_v - top)
    d_rows: torch.Tensor | None = None  # (R, H) fp32 (online), or None
    d_low: torch.Tensor | None = None  # (R, r) fp32 (online), or None
    tiles: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None  # (s0, exp, its max), kept


def _label_cols(t: torch.Tensor, s0: int, s1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, column in the slice) of the rows whose label falls in s0:s1."""
    hit = ((t >= s0) & (t < s1)).nonzero().squeeze(1)
    return hit, t[hit] - s0


def _scan(head: _Head, r: torch.Tensor, t: torch.Tensor, lo: int, cols: int, need: tuple, keep: bool) -> _Scan:
    """One pass over the vocabulary for rows `r` (the call's rows lo:lo+R). `need` =
    (d rows, d low) accumulated online; `keep` keeps every tile's exp instead."""
    n, vocab = r.shape[0], head.weight.shape[0]
    m = torch.full((n,), float("-inf"), device=r.device)
    z, picked = torch.zeros(n, device=r.device), torch.zeros(n, device=r.device)
    acc = torch.zeros(n, r.shape[1], device=r.device) if need[0] else None
    acc_low = torch.zeros(n, head.low.shape[1], device=r.device) if need[1] else None
    tiles = [] if keep else None
    for s0 in range(0, vocab, cols):
        s1 = min(vocab, s0 + cols)
        w = head.rows_of(s0, s1)
        p = head.logits(r, lo, lo + n, s0, w)  # (n, cols): the one big buffer
        hit, col = _label_cols(t, s0, s1)
        picked[hit] = p[hit, col].float()
        m_new = torch.maximum(m, p.amax(1).float())
        alpha = (m - m_new).exp()  # rescales what was summed against the old maximum
        _exp_shifted(p, m_new)  # in place: no second (n, cols) buffer
        z.mul_(alpha).add_(p.sum(1, dtype=torch.float32))
        m = m_new
        if acc is not None:
            acc.mul_(alpha[:, None]).add_(p @ w)
        if acc_low is not None:
            acc_low.mul_(alpha[:, None]).add_(p @ head.lora_b[s0:s1].to(p.dtype))
        if tiles is not None:
            tiles.append((s0, p, m_new))
        del p, w  # unless kept, freed before the next slice's logits exist: one tile at a time
    lse = m + z.log()
    d_rows = None if acc is None else acc.div_(z[:, None]).sub_(head.weight[t].float())
    d_low = None if acc_low is None else acc_low.div_(z[:, None]).sub_(head.lora_b[t].float())
    return _Scan(lse, picked, m, z, d_rows, d_low, tiles)


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(head(rows_i), y_i) with the gradient computed in the forward pass, one
    tile of (rows, vocabulary slice) at a time (a "fused linear cross-entropy").

    Autograd through plain chunks would keep every chunk's (n, V) log-softmax alive
    until backward: 196 KB per trained token for a 49k vocabulary, more than the
    whole decoder's activations for that token. Here only one tile's logits exist at
    a time; what is kept for backward is d loss / d rows (N x H) and, when the head
    itself trains (full fine-tuning), d loss / d weight. With a frozen head d loss /
    d rows comes from one pass over the vocabulary (online softmax); the head's own
    gradients need the final log-sum-exp, so a block's tiles are kept (bounded by
    KEPT_ELEMENTS) for a second pass over them.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, low, lora_b, y):  # noqa: D401 - autograd API
        """`low` (N, r) and `lora_b` (V, r), or both None: a LoRA on the head adds
        low @ lora_b.T to the logits (low = scaling * A(rows), computed by autograd)."""
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
            low is not None and ctx.needs_input_grad[3],
            low is not None and ctx.needs_input_grad[4],
        )
        head = _Head(weight, bias, low, lora_b)
        grads = [torch.empty_like(rows) if need[0] else None]
        grads += [torch.zeros_like(x) if flag else None for x, flag in zip((weight, bias), need[1:3])]
        grads += [torch.empty_like(low) if need[3] else None, torch.zeros_like(lora_b) if need[4] else None]
        loss = torch.zeros((), dtype=torch.float32, device=rows.device)
        correct = torch.zeros((), dtype=torch.long, device=rows.device)
        # The head's own gradients need the final log-sum-exp: each tile's exp is kept
        # for a second pass (R x V in bf16, in place of recomputing its product).
        keep = need[1] or need[2] or need[4]
        block, cols = tile_shape(rows.shape[0], weight.shape[0], keep=keep)
        for lo in range(0, rows.shape[0], block):
            r, t = rows[lo : lo + block], y[lo : lo + block]
            sc = _scan(head, r, t, lo, cols, (need[0] and not keep, need[3] and not keep), keep)
            loss += (sc.lse - sc.picked).sum()
            # A hit is the label's logit being the largest; the max is the softmax's anyway.
            correct += (sc.picked >= sc.top).sum()
            if keep:
                _tile_grads(head, r, t, lo, sc, grads)
            if sc.d_rows is not None:
                grads[0][lo : lo + r.shape[0]] = sc.d_rows
            if sc.d_low is not None:
                grads[3][lo : lo + r.shape[0]] = sc.d_low
        ctx.save_for_backward(*(x for x in grads if x is not None))
        ctx.which = need
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = iter(ctx.saved_tensors)
        # In place: a second head-sized buffer here was 545 MB for the 0.5B built-in's
        # head. Each saved gradient is used once (no retain_graph in training).
        out = [next(saved).mul_(grad_loss) if need else None for need in ctx.which]  # 0-dim: keeps the grad's dtype
        return *out, None


def _tile_grads(head: _Head, r, t, lo: int, sc: _Scan, grads: list) -> None:
    """The second pass over a block's kept tiles: d CE / d logits = softmax - onehot,
    then this block's share of every gradient allocated in `grads` (None: not asked for)."""
    n = r.shape[0]
    rows_acc = torch.zeros(n, r.shape[1], device=r.device) if grads[0] is not None else None
    low_acc = torch.zeros(n, head.low.shape[1], device=r.device) if grads[3] is not None else None
    low = None if head.low is None else head.low[lo : lo + n]
    while sc.tiles:
        s0, g, m = sc.tiles.pop(0)  # popped: each tile is freed once used
        s1 = s0 + g.shape[1]
        g.mul_(((m - sc.top).exp() / sc.z)[:, None])  # exp(l - m) -> softmax, one rounding
        hit, col = _label_cols(t, s0, s1)
        g[hit, col] -= 1.0
        if rows_acc is not None:
            rows_acc += g @ head.rows_of(s0, s1)
        if low_acc is not None:
            low_acc += g @ head.lora_b[s0:s1].to(g.dtype)
        if grads[1] is not None:  # in the logits' dtype, as autocast runs every linear's backward
            grads[1][s0:s1] += g.t() @ r.to(g.dtype)
        if grads[2] is not None:
            grads[2][s0:s1] += g.sum(0, dtype=torch.float32)
        if grads[4] is not None:
            grads[4][s0:s1] += g.t() @ low.to(g.dtype)
        del g
    if rows_acc is not None:
        grads[0][lo : lo + n] = rows_acc
    if low_acc is not None:
        grads[3][lo : lo + n] = low_acc


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
    trains = torch.is_grad_enabled() and (
        rows.requires_grad
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or (low is not None and (low.requires_grad or lora_b.requires_grad))
    )
    if trains:
        loss, correct = _HeadCrossEntropy.apply(rows, weight, bias, low, lora_b, y)
        return loss, int(correct)
    with torch.no_grad():  # evaluation: the forward pass alone, tile by tile
        parts, loss_sum, correct = _Head(weight, bias, low, lora_b), rows.new_zeros((), dtype=torch.float32), 0
        block, cols = tile_shape(rows.shape[0], weight.shape[0])
        for lo in range(0, rows.shape[0], block):
            sc = _scan(parts, rows[lo : lo + block], y[lo : lo + block], lo, cols, (False, False), keep=False)
            loss_sum = loss_sum + (sc.lse - sc.picked).sum()
            correct += int((sc.picked >= sc.top).sum())
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
