"""Tensor side of continuous batching: left-padded prompts, KV-cache merging and
row removal on a KV cache (openft's own decoder's, or a transformers `DynamicCache`), and
per-row sampling.

Layout. Every row of a running batch is left-padded so that all rows end at the
same cache column: the cache holds keys/values of shape (batch, kv_heads, L,
head_dim) per layer and `mask` (batch, L) marks real tokens (1) and padding (0).
Positions are explicit per row (a row's n-th real token is at position n), so
padding never shifts a row's rotary positions.

Joining. New requests are prefilled in their own forward pass (own left
padding), then merged into the running batch at a step boundary: both caches are
left-padded with zero keys/values (masked out) to the same length and
concatenated along the batch axis. Leaving. Finished rows are dropped with an
index select; padding columns that no remaining row needs are trimmed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openft.models.decoder import append_columns as _append

# transformers is imported only when a model that runs on it is served (decoder
# models bring their own cache): its import costs seconds of server start-up.
_HF: tuple | None = None


def _hf_cache_types() -> tuple:
    """(DynamicCache, DynamicLayer, SlackLayer), or three Nones before transformers 4.56."""
    global _HF
    if _HF is None:
        try:  # transformers >= 4.56: caches are lists of layers
            from transformers.cache_utils import DynamicCache, DynamicLayer
        except ImportError:  # pragma: no cover - older transformers
            _HF = (None, None, None)
            return _HF

        class SlackLayer(DynamicLayer):
            """A `DynamicLayer` that appends each step's keys/values into spare columns
            of a buffer instead of concatenating the whole cache anew: `DynamicLayer`
            copies (batch, kv_heads, L, head_dim) per layer per step, which at 16 rows
            and a few hundred tokens moves about half as many bytes as the weights.
            `keys`/`values` stay plain tensors (views of the buffer), so merging and
            row selection below work on them unchanged; a tensor they assign is
            copied into a fresh buffer at the next update."""

            SLACK = 64  # spare columns per (re)allocation
            openft_plain = True

            def __init__(self):
                super().__init__()
                self._kbuf = self._vbuf = None

            def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                self.keys, self._kbuf = _append(self.keys, self._kbuf, key_states, self.SLACK)
                self.values, self._vbuf = _append(self.values, self._vbuf, value_states, self.SLACK)
                return self.keys, self.values

        _HF = (DynamicCache, DynamicLayer, SlackLayer)
    return _HF


def _plain(layer) -> bool:
    """A growing layer (ours or transformers' DynamicLayer) that may be padded,
    concatenated and row-selected; not sliding-window or static layers."""
    if getattr(type(layer), "openft_plain", False):
        return True
    dynamic = _HF[1] if _HF else None
    return dynamic is not None and type(layer) is dynamic


def new_cache(model):
    """An empty cache for a prefill: the model's own (openft.models.decoder), or transformers'
    with plain growing layers replaced by `SlackLayer` (None: let the model make its own)."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    DynamicCache, DynamicLayer, SlackLayer = _hf_cache_types()
    if DynamicCache is None:  # pragma: no cover
        return None
    cache = DynamicCache(config=model.config)
    if not cache.layers:
        return None
    cache.layers = [SlackLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def mergeable(cache) -> bool:
    """Only plain growing layers can be padded and concatenated; sliding-window or
    static caches make new requests wait until the running batch drains (waves)."""
    layers = getattr(cache, "layers", None)  # None on pre-4.56 caches
    return bool(layers) and all(_plain(layer) and layer.is_initialized for layer in layers)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    # t: (batch, heads, L, head_dim) -> (batch, heads, n + L, head_dim), zeros in front
    return F.pad(t, (0, 0, n, 0)) if n else t


def merge_into(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor) -> torch.Tensor:
    """Append `new_cache`'s rows to `cache` in place; return the merged (B+b, L) mask."""
    length, new_length = mask.shape[1], new_mask.shape[1]
    width = max(length, new_length)
    for layer, new in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([_pad_left(layer.keys, width - length), _pad_left(new.keys, width - new_length)], 0)
        layer.values = torch.cat(
            [_pad_left(layer.values, width - length), _pad_left(new.values, width - new_length)], 0
        )
    return torch.cat([F.pad(mask, (width - length, 0)), F.pad(new_mask, (width - new_length, 0))], 0)


def select_rows(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only rows `keep` (in order); return the new mask. On plain caches also
    trim the padding columns that no kept row needs, so a long answer that left
    does not leave every later step attending over its columns."""
    idx = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, idx)
    if not mergeable(cache):  # each layer type knows how to drop its own rows
        cache.batch_select_indices(idx)
        return mask
    # First column any kept row uses; every column before it is padding for all rows.
    start = int((mask.sum(0) > 0).long().argmax())
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
        layer.values = layer.values.index_select(0, idx)[:, :, start:]
    return mask[:, start:]


def sample(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
    top_ks: list[int] | None = None,
) -> list[int]:
    """One token per row. logits: (batch, vocab). Greedy rows (temperature 0) take
    the argmax; the others sample from softmax(logits / T) cut to the k most likely
    tokens (top_k > 0) and to the top-p nucleus, each with its own generator so a
    seeded request is reproducible whatever else shares its batch."""
    logits = logits.float()
    tokens = logits.argmax(-1)  # (batch,)
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if not sampled:
        return tokens.tolist()
    out = tokens.clone()
    for i in sampled:
        scaled = logits[i] / temperatures[i]  # (vocab,)
        if top_ks and 0 < top_ks[i] < scaled.numel():
            scaled = _keep_top_k(scaled, top_ks[i])
        g = generators[i]
        if top_ps[i] < 1.0:
            out[i] = _sample_top_p(scaled, top_ps[i], g)
        else:
            out[i] = _draw(scaled.softmax(-1), g)
    return out.tolist()


def _keep_top_k(scaled: torch.Tensor, k: int) -> torch.Tensor:
    """-inf for every token outside the k most likely (ties at the k-th value are kept
    out by index: exactly k tokens remain)."""
    keep = scaled.topk(k).indices
    out = torch.full_like(scaled, float("-inf"))
    out[keep] = scaled[keep]
    return out


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties for one row: logits[t] -=
    frequency * count[t] + presence * (count[t] > 0). logits, counts: (vocab,), counts
    of the tokens this choice generated so far. Returns a new tensor."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def token_logprob(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under softmax(logits) (one row, (vocab,)), and
    the k most likely tokens with theirs, most likely first."""
    lp = logits.float().log_softmax(-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = lp.topk(min(k, lp.numel()))
        top = list(zip(ids.tolist(), values.tolist()))
    return float(lp[token]), top


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Inverse-CDF draw from a 1-D distribution. torch.multinomial over the 49k
    vocabulary costs 4-30 ms per row on this CPU; cumsum + searchsorted ~0.2 ms."""
    cdf = probs.cumsum(-1)
    u = torch.rand(1, generator=generator) * cdf[-1]
    return int(torch.searchsorted(cdf, u).clamp_(max=probs.numel() - 1)[0])


# The nucleus almost always lies within the top few hundred tokens; sorting only
# those (topk) instead of the whole vocabulary saves 10-35 ms per row. When the
# top-k mass falls short of top_p the full sort still gives the exact nucleus.
_TOP_K_FIRST = 256


def _sample_top_p(scaled: torch.Tensor, top_p: float, generator: torch.Generator | None) -> int:
    probs_all = scaled.softmax(-1)
    k = min(_TOP_K_FIRST, probs_all.numel())
    probs, order = probs_all.topk(k)
    if float(probs.sum()) < top_p and k < probs_all.numel():
        probs, order = probs_all.sort(descending=True)
    # Drop a token when the tokens ranked above it already reach top_p (the most
    # likely token always stays); renormalising is implicit in the CDF draw.
    keep = (probs.cumsum(-1) - probs) < top_p
    return int(order[_draw(probs * keep, generator)])
