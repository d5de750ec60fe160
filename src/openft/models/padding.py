"""Left padding for batched decoding, shared by evaluation and serving."""

from __future__ import annotations

import torch


def left_pad(
    seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu", width: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (batch, width), prompts
    right-aligned: every prompt's last token sits in the last column, where the
    next token of the whole batch is appended. `width`: at least this many
    columns (more padding in front), e.g. a `shape_bucket` width."""
    width = max(width, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s) :] = 1
    # Real tokens at positions 0..len-1; padding gets 0 (masked anyway).
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)
