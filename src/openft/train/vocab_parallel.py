"""The embedding and head (tied or not) split by vocabulary rows across the ranks.

FSDP2 gathers a group's whole weight for its forward and again for its
backward, and reduce-scatters its whole gradient through a buffer of its own:
for a 151k-vocabulary table (Qwen 0.5B, 545 MB in fp32) that is ~1.6 GB alive
at once, at the start of backward (the head, every activation still held) and
at its end (the embedding, the sharded gradients all formed), which kept each
of 2 ranks at 0.695 of one rank's peak. Here each rank keeps only its rows
(a DTensor sharded on dim 0, as FSDP2 shards, so checkpoints, the full state
and gradient clipping treat it like any sharded weight), and what moves between
the ranks is the tokens' ids, hidden rows and gradients, a few MB:

- embedding: every rank looks up the ids of all ranks in its rows, and a
  reduce-scatter sums the pieces into each rank's own rows; backward gathers
  the rows' gradients and adds them into the local rows;
- head + cross-entropy: every rank scores all ranks' rows against its
  vocabulary slice, chunk by chunk as `openft.train.loss` does; the
  log-sum-exp and the label's logit are combined over the slices with two
  all-reduces. Backward recomputes each chunk's logits (one more head matmul)
  rather than keep a gradient from the forward, since each row's weight (its
  rank's loss scale, 0 for a rank's spare batch) is only known then.

Gradients follow FSDP2's convention, the mean over the ranks of each rank's
gradient, so the weights end as on one rank. A tied head reads the embedding's
split weight, and autograd adds both uses' gradients into it.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from openft.train.loss import HEAD_METHOD, chunk_rows


def fits_embedding(emb: nn.Module) -> bool:
    """An nn.Embedding, plain or scaled as Gemma's (its lookup times `embed_scale`);
    any other subclass keeps an FSDP2 group, since its forward is its own."""
    plain = type(emb) is nn.Embedding or (
        isinstance(emb, nn.Embedding)
        and type(emb).__name__.endswith("ScaledWordEmbedding")
        and hasattr(emb, "embed_scale")
    )
    return plain and emb.max_norm is None and not emb.sparse


def fits_head(head: nn.Module) -> bool:
    return type(head) is nn.Linear and head.bias is None


def first_row(vocab: int, world: int, rank: int) -> int:
    """The first row `rank` holds: torch.chunk's split, as DTensor's Shard(0)."""
    return min(vocab, rank * -(-vocab // world))


def _distribute(module: nn.Module, mesh, maps) -> None:
    """The module's weight as this rank's rows only (every rank loaded the same
    weights: no communication), copied out of the model file's mapping."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    w = module.weight
    mine = distribute_tensor(w.detach(), mesh, [Shard(0)], src_data_rank=None)
    local = maps.copy(mine.to_local(), w.dtype)
    param = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=w.shape, stride=w.stride())
    module.weight = nn.Parameter(param, requires_grad=w.requires_grad)


def shard_embedding(emb: nn.Embedding, mesh, maps) -> None:
    _distribute(emb, mesh, maps)
    emb.forward = types.MethodType(_embedding_forward, emb)


def shard_head(head: nn.Linear, mesh, maps, tied_to: nn.Parameter | None = None) -> None:
    """The head's loss over its rows; a head tied to an embedding that
    is split already takes that weight (one parameter, both uses' gradients in it)."""
    if tied_to is not None:
        head.weight = tied_to
    else:
        _distribute(head, mesh, maps)
    setattr(head, HEAD_METHOD, types.MethodType(_head_loss, head))


def _where(weight) -> tuple[int, int, int]:
    world, rank = dist.get_world_size(), dist.get_rank()
    return first_row(weight.shape[0], world, rank), world, rank


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    lo, world, rank = _where(self.weight)
    out = _Lookup.apply(ids, self.weight.to_local(), lo, world, rank, self.padding_idx)
    scale = getattr(self, "embed_scale", None)  # Gemma's: the lookup times sqrt(hidden)
    return out if scale is None else out * scale.to(out.dtype)


def _head_loss(self: nn.Linear, rows: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    lo, world, rank = _where(self.weight)
    loss, correct = _HeadCrossEntropy.apply(rows, self.weight.to_local(), y, lo, world, rank)
    return loss, int(correct)


# ---- collectives over rows of varying count ----------------------------------


def gather_rows(x: torch.Tensor, world: int, sizes: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows (dim 0), concatenated in rank order, and each rank's count
    (exchanged first unless `sizes` already says them)."""
    if sizes is None:
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n)
        sizes = [int(c) for c in counts]
    m = max(sizes)
    padded = x.new_zeros((m, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((world * m, *x.shape[1:]))
    dist.all_gather_into_tensor(out, padded)
    return torch.cat([out[r * m : r * m + s] for r, s in enumerate(sizes)]), sizes


def scatter_sum(x_all: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """The sum over the ranks of `x_all` (all ranks' rows, as `gather_rows` gives
    them), each rank keeping its own rows."""
    m, world = max(sizes), len(sizes)
    padded = x_all.new_zeros((world * m, *x_all.shape[1:]))
    start = 0
    for r, s in enumerate(sizes):
        padded[r * m : r * m + s] = x_all[start : start + s]
        start += s
    out = x_all.new_empty((m, *x_all.shape[1:]))
    dist.reduce_scatter_tensor(out, padded, op=dist.ReduceOp.SUM)
    return out[: sizes[rank]]


# ---- the embedding --------------------------------------------------------------


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, local, lo, world, rank, padding_idx):  # noqa: D401 - autograd API
        all_ids, sizes = gather_rows(ids.reshape(-1), world)
        hit = (all_ids >= lo) & (all_ids < lo + local.shape[0])
        keep = hit if padding_idx is None else hit & (all_ids != padding_idx)  # nn.Embedding: no padding gradient
        out = local.new_zeros((all_ids.numel(), local.shape[1]))
        out[hit] = local[all_ids[hit] - lo]
        mine = scatter_sum(out, sizes, rank)
        ctx.save_for_backward(keep, all_ids[keep] - lo)
        ctx.meta = (local.shape, world, sizes)
        return mine.view(*ids.shape, local.shape[1])

    @staticmethod
    def backward(ctx, grad):
        keep, rows = ctx.saved_tensors
        shape, world, sizes = ctx.meta
        g_all, _ = gather_rows(grad.reshape(-1, shape[1]).float(), world, sizes)
        gw = torch.zeros(shape, dtype=torch.float32, device=grad.device)
        gw.index_add_(0, rows, g_all[keep])
        return None, gw.div_(world), None, None, None, None


# ---- the head and its cross-entropy ----------------------------------------------


def _in_slice(y: torch.Tensor, lo: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each label is in this rank's vocabulary slice, its column there)."""
    local = y - lo
    return (local >= 0) & (local < width), local


def _label_logits(logits: torch.Tensor, y: torch.Tensor, lo: int) -> torch.Tensor:
    """The label's logit where the label is in this slice, else 0."""
    inside, local = _in_slice(y, lo, logits.shape[1])
    if not logits.shape[1]:
        return torch.zeros_like(y, dtype=logits.dtype)
    picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The matmuls' dtype under autocast (the weight is cast once, not per chunk), else None."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class _HeadCrossEntropy(torch.autograd.Function):
    """sum over this rank's rows of CE(head(rows), y), the head split by vocabulary."""

    @staticmethod
    def forward(ctx, rows, local, y, lo, world, rank):  # noqa: D401 - autograd API
        cdt = _compute_dtype(rows)
        rows_all, sizes = gather_rows(rows.float(), world)
        y_all, _ = gather_rows(y, world, sizes)
        n, dev = rows_all.shape[0], rows.device
        lse = torch.full((n,), float("-inf"), device=dev)
        top = torch.full((n,), float("-inf"), device=dev)
        picked = torch.zeros(n, device=dev)
        w = local.detach().to(cdt or local.dtype)
        chunk = chunk_rows(max(1, local.shape[0]))
        with torch.autocast(dev.type, enabled=False):
            for s in range(0, n if local.shape[0] else 0, chunk):
                logits = F.linear(rows_all[s : s + chunk].to(w.dtype), w).float()  # (n, V / world)
                picked[s : s + chunk] = _label_logits(logits, y_all[s : s + chunk], lo)
                mx = top[s : s + chunk] = logits.amax(-1)
                lse[s : s + chunk] = mx + logits.sub_(mx[:, None]).exp_().sum(-1).log()
                del logits
        # Combine the slices: lse = log sum_r exp(lse_r); the label's logit is in one slice.
        peaks = torch.stack([lse, top])
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        sums = torch.stack([(lse - peaks[0]).exp(), picked])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        lse, picked = peaks[0] + sums[0].log(), sums[1]
        start = sum(sizes[:rank])
        own = slice(start, start + sizes[rank])
        ctx.save_for_backward(rows_all, y_all, lse, local)
        ctx.meta = (sizes, lo, world, rank, rows.dtype, cdt)
        correct = (picked[own] >= peaks[1][own]).sum()
        ctx.mark_non_differentiable(correct)
        return (lse[own] - picked[own]).sum(), correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        rows_all, y_all, lse, local = ctx.saved_tensors
        sizes, lo, world, rank, dtype, cdt = ctx.meta
        scales = [torch.zeros(1, device=rows_all.device) for _ in range(world)]
        dist.all_gather(scales, grad_loss.detach().float().reshape(1))
        # d total / d loss_r for every row: each rank's own scale (0 for a spare batch).
        row_scale = torch.cat([s.expand(n) for s, n in zip(scales, sizes)])
        grad_rows = torch.zeros_like(rows_all)
        grad_w = torch.zeros_like(local) if ctx.needs_input_grad[1] else None
        w = local.to(cdt or local.dtype)
        chunk = chunk_rows(max(1, local.shape[0]))
        for s in range(0, rows_all.shape[0] if local.shape[0] else 0, chunk):
            r, t = rows_all[s : s + chunk], y_all[s : s + chunk]
            g = F.linear(r.to(w.dtype), w).float().sub_(lse[s : s + chunk, None]).exp_()  # softmax
            inside, col = _in_slice(t, lo, g.shape[1])
            g[inside.nonzero().squeeze(1), col[inside]] -= 1.0  # - onehot
            g.mul_(row_scale[s : s + chunk, None])
            grad_rows[s : s + chunk] = (g.to(w.dtype) @ w).float()
            if grad_w is not None:  # in the weight's dtype, as the one-rank loss forms it
                grad_w.addmm_(g.t(), r.to(grad_w.dtype))
            del g
        mine = scatter_sum(grad_rows, sizes, rank).to(dtype)
        return mine, None if grad_w is None else grad_w.div_(world), None, None, None, None
