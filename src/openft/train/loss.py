"""Causal-LM loss computed only where labels exist.

The straightforward loss runs the LM head over every position, (B, T, V) logits
with V = 49k for the built-in, and then throws away the positions whose labels are
masked (prompts, padding). Here the decoder's hidden states are gathered at the
trained positions first and the head + cross-entropy run in chunks over those rows
only, so the full logits tensor never exists. `tests/train/test_loss.py` checks
the result equals the straightforward computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openft.train.tokenize import IGNORE

CHUNK_ROWS = 1024  # rows of the head at a time: 1024 x 49152 x 4 B = 200 MB peak


@dataclass
class LossOut:
    loss_sum: torch.Tensor  # scalar, summed over trained tokens (graph attached)
    n_tokens: int
    n_correct: int  # argmax == label, for token accuracy


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.get_decoder(), model.get_output_embeddings()


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> LossOut:
    decoder, head = decoder_and_head(model)
    if bool(attention_mask.all()):
        attention_mask = None  # no padding: lets SDPA take its plain causal path
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
    # Position t predicts token t+1.
    target = labels[:, 1:]
    sel = target != IGNORE  # (B, T-1)
    rows = hidden[:, :-1][sel]  # (N, H)
    y = target[sel]  # (N,)
    loss_sum = hidden.new_zeros(())
    correct = 0
    for s in range(0, rows.shape[0], CHUNK_ROWS):
        logits = head(rows[s : s + CHUNK_ROWS]).float()  # (n, V)
        loss_sum = loss_sum + F.cross_entropy(logits, y[s : s + CHUNK_ROWS], reduction="sum")
        correct += int((logits.detach().argmax(-1) == y[s : s + CHUNK_ROWS]).sum())
    return LossOut(loss_sum, int(y.numel()), correct)


def reference_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain computation (full logits, mean over trained tokens), for tests."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
