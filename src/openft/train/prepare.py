"""The data a run trains on: load and check the dataset, split it, tokenise it
(SFT examples, or DPO pairs), with every problem reported with its place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from openft.config import JobSpec
from openft.data.load import LoadResult, load_dataset, parse_columns
from openft.data.split import split_examples
from openft.data.types import Example
from openft.fileio import sha256_files
from openft.models.load import LoadedModel
from openft.models.templates import ChatTemplate, check_template
from openft.train import dpo
from openft.train.hparams import auto_max_seq_length
from openft.train.tokenize import Encoded, encode_all


class DataError(Exception):
    """The dataset has errors; `.result` holds the full report."""

    def __init__(self, result: LoadResult, what: str = "training data"):
        self.result = result
        lines = [str(p) for p in result.errors[:20]]
        more = f"\n... and {len(result.errors) - 20} more" if len(result.errors) > 20 else ""
        super().__init__(f"{what} has {len(result.errors)} error(s):\n" + "\n".join(lines) + more)


@dataclass
class Prepared:
    train: list[Example]
    valid: list[Example]
    train_enc: list[Encoded]
    valid_enc: list[Encoded]
    max_len: int
    truncated: int
    fully_masked: int  # training examples with no trained token left (dropped)
    data_hash: str


def file_hash(path: str | Path) -> str:
    """sha256 of a dataset file, or of a folder's files with their names (lineage)."""
    p = Path(path)
    return sha256_files(sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p], names=True)


def load_checked(path: str, spec: JobSpec) -> LoadResult:
    d = spec.data
    result = load_dataset(
        path, layout=d.layout, columns=parse_columns(d.columns) if d.columns else None, record_element=d.record_element
    )
    if not result.ok:
        raise DataError(result, what=path)
    return result


def prepare_data(spec: JobSpec, tokenizer, model_context: int, template: ChatTemplate | None = None) -> Prepared:
    """Load, split and tokenise; with `template`, first refuse one that does not fit
    the model or the data (`check_template` raises TemplateError)."""
    train_res = load_checked(spec.data.path, spec)
    if template is not None:
        check_template(tokenizer, template, train_res.examples, train_on_prompt=spec.data.train_on_prompt)
    if spec.train.objective == "dpo":
        return prepare_pairs(spec, tokenizer, model_context, train_res)
    if spec.data.validation_path:
        train, valid = train_res.examples, load_checked(spec.data.validation_path, spec).examples
    else:
        train, valid = split_examples(train_res.examples, spec.data.validation_split, spec.train.seed)
    cap = min(model_context, 2048) if spec.train.max_seq_length == "auto" else int(spec.train.max_seq_length)
    train_enc = encode_all(tokenizer, train, cap, spec.data.train_on_prompt)
    max_len = (
        auto_max_seq_length([len(e) for e in train_enc], model_context) if spec.train.max_seq_length == "auto" else cap
    )
    valid_enc = encode_all(tokenizer, valid, max_len, spec.data.train_on_prompt)
    truncated = sum(e.truncated for e in train_enc)
    kept = [(x, e) for x, e in zip(train, train_enc) if e.n_trained > 0]
    return Prepared(
        train=[x for x, _ in kept],
        valid=[x for x, e in zip(valid, valid_enc) if e.n_trained > 0],
        train_enc=[e for _, e in kept],
        valid_enc=[e for e in valid_enc if e.n_trained > 0],
        max_len=max_len,
        truncated=truncated,
        fully_masked=len(train_enc) - len(kept),
        data_hash=file_hash(spec.data.path),
    )


class NotPairs(ValueError):
    """DPO was asked of a dataset that holds no preference pairs."""


def _only_pairs(result: LoadResult, path: str) -> list[Example]:
    if not all(e.is_pair for e in result.examples):
        raise NotPairs(
            f"DPO trains on preference pairs, and {path} holds '{result.layout}' examples: give it pairs "
            "(layouts openai_preference, preference, sharegpt_preference), or train it with --objective sft"
        )
    return result.examples


def prepare_pairs(spec: JobSpec, tokenizer, model_context: int, train_res: LoadResult) -> Prepared:
    """The DPO counterpart of prepare_data: pairs split by prompt, both sides encoded."""
    examples = _only_pairs(train_res, spec.data.path)
    if spec.data.validation_path:
        train, valid = examples, _only_pairs(load_checked(spec.data.validation_path, spec), spec.data.validation_path)
    else:
        train, valid = split_examples(examples, spec.data.validation_split, spec.train.seed)
    cap = min(model_context, 2048) if spec.train.max_seq_length == "auto" else int(spec.train.max_seq_length)
    train_enc = dpo.encode_pairs(tokenizer, train, cap)
    sides = [max(len(p.chosen), len(p.rejected)) for p in train_enc]
    max_len = auto_max_seq_length(sides, model_context) if spec.train.max_seq_length == "auto" else cap
    valid_enc = dpo.encode_pairs(tokenizer, valid, max_len)

    def kept(xs, encs):  # a side truncated to no answer token teaches nothing; indices made contiguous again
        pairs = [(x, e) for x, e in zip(xs, encs) if e.chosen.n_trained and e.rejected.n_trained]
        return [x for x, _ in pairs], [dpo.PairEncoded(e.chosen, e.rejected, i) for i, (_, e) in enumerate(pairs)]

    train_kept, train_pairs = kept(train, train_enc)
    valid_kept, valid_pairs = kept(valid, valid_enc)
    return Prepared(
        train=train_kept,
        valid=valid_kept,
        train_enc=train_pairs,
        valid_enc=valid_pairs,
        max_len=max_len,
        truncated=sum(e.truncated for e in train_enc),
        fully_masked=len(train_enc) - len(train_pairs),
        data_hash=file_hash(spec.data.path),
    )


def check_data_template(spec: JobSpec, loaded: LoadedModel) -> None:
    """The template check on the training data alone, for callers with work to do
    before training (the base model's answers) that a refused template would waste."""
    if loaded.template is not None:
        examples = load_checked(spec.data.path, spec).examples
        check_template(loaded.tokenizer, loaded.template, examples, train_on_prompt=spec.data.train_on_prompt)
