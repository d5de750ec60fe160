"""Step plans and padded micro-batches.

Data order is a pure function of (seed, epoch): resuming at step k replays exactly
the batches an uninterrupted run would have seen, with no sampler state to save.

Within one optimizer step the examples are sorted by length and cut into
micro-batches under a padded-token budget, so padding stays small (a plain padded
batch of Alpaca-style rows is ~40% padding; ~5% this way) without packing
unrelated examples into one attention window (no cross-contamination, no special
attention masks).
The loss is normalised by the step's total number of trained tokens, so how a
step is cut into micro-batches does not change the gradient.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from openft.train.tokenize import IGNORE, Encoded


@dataclass(frozen=True)
class Step:
    epoch: int  # 0-based
    index: int  # 0-based global optimizer step
    examples: tuple[int, ...]  # indices into the encoded training set


def epoch_order(n: int, seed: int, epoch: int, batch_size: int) -> list[list[int]]:
    """The batches of one epoch: a seeded shuffle cut into consecutive batches.

    No grouping of similar lengths across steps: it made some steps all short and
    others all long, so with the loss averaged per step a short example's tokens
    weighed several times a long one's, and on train_bench's 160 Alpaca rows the
    validation loss ended 3.2% worse (1.599 vs 1.549 without grouping). Padding
    stays low anyway: micro_batches sorts each step's examples by length (5.4%
    padding there, against 1.5% grouped)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    return [order[b : b + batch_size] for b in range(0, n, batch_size)]


def plan_steps(lengths: list[int], batch_size: int, epochs: int, seed: int) -> list[Step]:
    steps: list[Step] = []
    for epoch in range(epochs):
        for batch in epoch_order(len(lengths), seed, epoch, batch_size):
            steps.append(Step(epoch=epoch, index=len(steps), examples=tuple(batch)))
    return steps


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, IGNORE where not trained or padding
    n_tokens: int  # real (unpadded) tokens
    n_trained: int


def collate(items: list[Encoded], pad_id: int, width: int | None = None) -> MicroBatch:
    width = max(width or 0, max(len(e) for e in items))
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, e in enumerate(items):
        n = len(e)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return MicroBatch(ids, mask, labels, int(mask.sum()), sum(e.n_trained for e in items))


def micro_batches(
    items: list[Encoded], pad_id: int, token_budget: int, width: Callable[[int], int] | None = None
) -> list[MicroBatch]:
    """Cut `items` (any order) into length-sorted micro-batches whose padded size
    (rows x padded width) stays within `token_budget` (a lone longer row still
    goes). `width` maps the longest row to the padded width (default: itself)."""
    width = width or (lambda n: n)
    items = sorted(items, key=len)
    out: list[MicroBatch] = []
    cur: list[Encoded] = []
    for e in items:
        if cur and (len(cur) + 1) * width(len(e)) > token_budget:
            out.append(collate(cur, pad_id, width(len(cur[-1]))))
            cur = []
        cur.append(e)
    if cur:
        out.append(collate(cur, pad_id, width(len(cur[-1]))))
    return out
