"""Token statistics of a dataset for a model's tokenizer, and a time estimate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from openft.data.types import Example, Problem
from openft.train.hparams import auto_epochs, auto_max_seq_length, estimate_seconds
from openft.train.tokenize import encode_all


@dataclass
class TokenStats:
    examples: int
    turns: int  # messages across all conversations
    total_tokens: int
    supervised_tokens: int  # tokens that are trained (assistant turns by default)
    length_p50: int
    length_p90: int
    length_p99: int
    length_max: int
    max_seq_length: int
    over_max_length: int
    fully_masked: int
    epochs: int
    estimated_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(sorted_xs: list[int], q: float) -> int:
    if not sorted_xs:
        return 0
    return sorted_xs[min(len(sorted_xs) - 1, math.ceil(q * len(sorted_xs)) - 1)]


def token_stats(
    tokenizer,
    examples: list[Example],
    *,
    max_seq_length: int | None,
    n_params: int,
    context: int = 2048,
    epochs: int | None = None,
    method: str = "lora",
    train_on_prompt: bool = False,
) -> tuple[TokenStats, list[Problem]]:
    """`max_seq_length=None` applies the auto rule (longest example, capped by `context`)."""
    # Encode without truncation first to see how many examples exceed the limit.
    enc = encode_all(tokenizer, examples, 1 << 30, train_on_prompt)
    if max_seq_length is None:
        max_seq_length = auto_max_seq_length([len(e) for e in enc], context)
    lengths = sorted(len(e) for e in enc)
    over = [ex for ex, e in zip(examples, enc) if len(e) > max_seq_length]
    trunc = encode_all(tokenizer, examples, max_seq_length, train_on_prompt)
    masked = [ex for ex, e in zip(examples, trunc) if e.n_trained == 0]
    supervised = sum(e.n_trained for e in trunc)
    n_epochs = epochs or auto_epochs(len(examples))
    tokens = sum(len(e) for e in trunc)
    stats = TokenStats(
        examples=len(examples),
        turns=sum(len(x.messages or []) for x in examples),
        total_tokens=sum(lengths),
        supervised_tokens=supervised,
        length_p50=_pct(lengths, 0.5),
        length_p90=_pct(lengths, 0.9),
        length_p99=_pct(lengths, 0.99),
        length_max=lengths[-1] if lengths else 0,
        max_seq_length=max_seq_length,
        over_max_length=len(over),
        fully_masked=len(masked),
        epochs=n_epochs,
        estimated_seconds=estimate_seconds(n_params, tokens, n_epochs, method),
    )
    warnings: list[Problem] = []
    if over:
        first = ", ".join(str(x.where) for x in over[:3])
        warnings.append(
            Problem(
                f"{len(over)} example(s) are longer than the maximum sequence length {max_seq_length} tokens "
                f"(e.g. {first}); they will be truncated to {max_seq_length} tokens"
                + (f", and {len(masked)} of them lose every trained token and are skipped" if masked else "")
            )
        )
    return stats, warnings
