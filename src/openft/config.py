"""Typed configuration: one dataclass per concern, composed into a `JobSpec`.

The CLI flags and a YAML file parse into these dataclasses, and every value is
checked against its field's type by one rule (`field_type`): the CLI reads text
with `FieldType.from_text`, YAML and JSON values go through `FieldType.check`.
Each field's `help` metadata is the help text. A value of "auto" means: decided
from the data and the model by the rule in `openft.train.hparams`, and the
resolved value is recorded in the run's config.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union

Auto = Literal["auto"]
AUTO: Auto = "auto"
IntOrAuto = Union[int, Auto]  # noqa: UP007 (the CLI reads these aliases at run time)
FloatOrAuto = Union[float, Auto]  # noqa: UP007

# YAML 1.1 (PyYAML) reads `1e-4` as a string: a float needs a dot there. A user
# writing a learning rate that way means the number, so float fields take it.
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_SCALAR_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _shown(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return f"{value!r} ({kind.get(type(value), type(value).__name__)})"


@dataclass(frozen=True)
class FieldType:
    """The values one config field accepts, read from its type hint: a scalar
    (int, float, str, bool), a list of a scalar, literal strings ("auto", or the
    choices of a `Literal`), and None where the hint is optional."""

    scalar: type | None = None
    item: type | None = None  # list[item]
    literals: tuple[str, ...] = ()
    optional: bool = False

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The literals, when they are the only values (a `Literal` field)."""
        return self.literals if self.literals and not (self.scalar or self.item) else None

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            parts = [_SCALAR_NAMES[self.scalar]] if self.scalar else []
            parts += [f"a list of {_SCALAR_NAMES[self.item].split()[-1]}s"] if self.item else []
            parts += [repr(c) for c in self.literals]
            text = " or ".join(parts)
        return text + (" or null" if self.optional else "")

    def _error(self, value: Any, text: bool = False) -> ValueError:
        # Command-line text is always a string: its type says nothing there.
        return ValueError(f"expected {self.describe()}, got {repr(value) if text else _shown(value)}")

    def from_text(self, text: str) -> Any:
        """A value from command-line text ("8", "auto", "q_proj,v_proj", "true")."""
        if text in self.literals:
            return text
        if self.scalar is bool and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        if self.scalar in (int, float):
            try:
                return self.check(self.scalar(text))
            except ValueError:
                pass
        if self.scalar is str:
            return text
        if self.item is str:
            names = [x.strip() for x in text.split(",") if x.strip()]
            if names:
                return names
        raise self._error(text, text=True)

    def check(self, value: Any) -> Any:
        """A value from YAML or JSON, returned as the field holds it (an int in a
        float field becomes a float); anything of another type raises `ValueError`."""
        if value is None and self.optional or isinstance(value, str) and value in self.literals:
            return value
        if isinstance(value, bool):  # bool is an int to Python, never to a config
            if self.scalar is bool:
                return value
        elif self.scalar is int and isinstance(value, int):
            return value
        elif self.scalar is float and (
            isinstance(value, (int, float)) or isinstance(value, str) and _FLOAT_TEXT.fullmatch(value)
        ):
            if math.isfinite(float(value)):
                return float(value)
        elif self.scalar is str and isinstance(value, str):
            return value
        elif self.item is not None and isinstance(value, list) and value:
            if all(isinstance(v, self.item) and not isinstance(v, bool) for v in value):
                return list(value)
        raise self._error(value)


def field_type(hint: Any) -> FieldType:
    """What a type hint (as `typing.get_type_hints` returns it) accepts; the one
    rule the CLI flags, the YAML check and the job body mapping share."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    scalar, item, literals, optional = None, None, [], False
    for m in members:
        origin = typing.get_origin(m)
        if m is type(None):
            optional = True
        elif origin is Literal:
            literals += typing.get_args(m)
        elif origin is list and typing.get_args(m) and typing.get_args(m)[0] in _SCALAR_NAMES:
            item = typing.get_args(m)[0]
        elif m in _SCALAR_NAMES and scalar is None:
            scalar = m
        else:
            raise TypeError(f"config fields cannot have the type {m!r}")
    return FieldType(scalar=scalar, item=item, literals=tuple(literals), optional=optional)


def config_fields(cls: type) -> list[tuple[Any, Any]]:
    """(field, resolved type hint) for each field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in fields(cls)]


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    path: str = _f("", "training data: a JSON/JSONL/CSV/XML/Parquet file or a folder of them")
    validation_path: str | None = _f(None, "validation data file; without it a split is held out")
    validation_split: float = _f(0.1, "fraction held out for validation when no file is given (10-20% advised)")
    layout: str | None = _f(None, "force a layout: messages, sharegpt, alpaca, prompt_completion, qa, text")
    columns: str | None = _f(None, "map columns for the qa layout: question=COL,answer=COL[,system=COL]")
    record_element: str | None = _f(None, "XML: the element that holds one record")
    train_on_prompt: bool = _f(False, "also train on prompt (system/user) tokens, not only assistant tokens")


@dataclass
class LoraConfig:
    rank: int = _f(16, "LoRA rank r")
    alpha: FloatOrAuto = _f(AUTO, "LoRA alpha; auto = 2 x rank")
    dropout: FloatOrAuto = _f(AUTO, "LoRA dropout; auto = 0 (dropout costs ~35% of a CPU step)")
    target_modules: list[str] | Auto = _f(AUTO, "module names to adapt; auto = every linear layer of the blocks")


@dataclass
class TrainConfig:
    method: Literal["lora", "full"] = _f("lora", "lora or full fine-tuning")
    objective: Literal["sft", "dpo"] = _f(
        "sft",
        "sft: learn the answers; dpo: prefer each pair's preferred answer over its rejected one (preference data)",
    )
    beta: FloatOrAuto = _f(AUTO, "DPO: how far the model may move from the reference; auto: 0.1")
    rpo_alpha: float = _f(0.0, "DPO: weight of an added SFT loss on the preferred answers (RPO; 0 = none)")
    epochs: IntOrAuto = _f(AUTO, "passes over the data; auto: 3, raised for tiny sets, lowered for big ones")
    learning_rate: FloatOrAuto = _f(AUTO, "peak learning rate; auto: 5e-4 for LoRA, 2e-5 for full")
    batch_size: IntOrAuto = _f(AUTO, "examples per optimizer step; auto: 8 (fewer for tiny sets)")
    micro_batch_tokens: IntOrAuto = _f(
        AUTO,
        "padded tokens per forward pass (gradient accumulation splits a batch into these); auto: on a CPU as many as keep the activations under 768 MiB (128 to 512), 4096 on a GPU",
    )
    max_seq_length: IntOrAuto = _f(
        AUTO,
        "longest example in tokens; longer ones are truncated; auto: longest example rounded up to 64, at most 2048 and the model's context",
    )
    warmup_ratio: FloatOrAuto = _f(AUTO, "fraction of steps spent warming up the learning rate; auto: 0.05")
    scheduler: Literal["auto", "cosine", "linear", "constant"] = _f(
        AUTO, "learning-rate schedule after warmup; auto: cosine"
    )
    weight_decay: FloatOrAuto = _f(AUTO, "AdamW weight decay; auto: 0 for LoRA, 0.01 for full")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    seed: int = _f(0, "seed for the split, the data order, initialisation and dropout")
    eval_every: IntOrAuto = _f(AUTO, "steps between validation passes; auto: about 8 per run")
    save_every: IntOrAuto = _f(AUTO, "steps between checkpoints; auto: same as eval_every")
    early_stopping_patience: int = _f(0, "stop after this many validations without improvement (0 = off)")
    keep_checkpoints: int = _f(3, "how many of the latest checkpoints to keep (older ones are deleted)")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = no limit; for smoke runs)")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        AUTO,
        "matmul precision; auto: bf16 (mixed, fp32 adapter weights and loss) where it measured >=1.2x fp32's matmul rate on this machine (cached; OPENFT_PRECISION=fp32|bf16 forces one), else fp32",
    )


@dataclass
class EvalConfig:
    questions: str | None = _f(None, "question set (JSONL/CSV: question, optional reference) answered before and after")
    max_new_tokens: int = _f(64, "answer length for the before/after comparison")
    score_checkpoints: bool = _f(True, "answer the questions at every checkpoint and score each (needs references)")
    select: Literal["last", "best"] = _f(
        "last", "the model a job ends with: last (the final weights) or best (the best-scoring checkpoint)"
    )


@dataclass
class JobSpec:
    model: str = _f("smollm2-135m-instruct", "base model: built-in name, HF directory, .gguf file or hub id")
    chat_template: str | None = _f(
        None,
        "a Jinja chat template file used instead of the model's own (or its family's); CLI and YAML only, "
        "the HTTP API takes no server paths",
    )
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str | None = _f(None, "run folder; default OPENFT_HOME/runs/<name>")
    suffix: str | None = _f(None, "a name for the fine-tuned model")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> JobSpec:
        """A spec from a YAML/JSON mapping: unknown keys and values of the wrong
        type raise `ValueError` naming the key (`train.epochs`) and what it takes."""
        return _from_dict(cls, d, "")


def _from_dict(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{f'config key {where!r}' if where else 'a job spec'}: expected a mapping, got {_shown(d)}")
    known = [f.name for f in fields(cls)]
    unknown = [str(k) for k in d if k not in known]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(repr(prefix + k) for k in unknown)} "
            f"(known{f' in {where!r}' if where else ''}: {', '.join(sorted(known))})"
        )
    kwargs: dict[str, Any] = {}
    for f, hint in config_fields(cls):
        if f.name not in d:
            continue
        key = f"{where}.{f.name}" if where else f.name
        if is_dataclass(hint):
            kwargs[f.name] = _from_dict(hint, d[f.name], key)
            continue
        try:
            kwargs[f.name] = field_type(hint).check(d[f.name])
        except ValueError as e:
            raise ValueError(f"config key {key!r}: {e}") from None
    return cls(**kwargs)
