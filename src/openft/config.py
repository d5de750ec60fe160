"""Typed configuration: one dataclass per concern, composed into a `JobSpec`.

The CLI flags, a YAML file and (later) the HTTP job body all parse into these
dataclasses; each field's docstring-style `help` metadata is the help text. A
value of "auto" means: decided from the data and the model by the rule in
`openft.train.hparams`, and the resolved value is recorded in the run's config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Union

Auto = Literal["auto"]
AUTO: Auto = "auto"
IntOrAuto = Union[int, Auto]  # noqa: UP007 (the CLI reads these aliases at run time)
FloatOrAuto = Union[float, Auto]  # noqa: UP007


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
    method: Literal["lora", "full"] = _f("lora", "lora (default) or full fine-tuning")
    epochs: IntOrAuto = _f(AUTO, "passes over the data; auto: 3, raised for tiny sets, lowered for big ones")
    learning_rate: FloatOrAuto = _f(AUTO, "peak learning rate; auto: 5e-4 for LoRA, 2e-5 for full")
    batch_size: IntOrAuto = _f(AUTO, "examples per optimizer step; auto: 8 (fewer for tiny sets)")
    micro_batch_tokens: IntOrAuto = _f(
        AUTO,
        "padded tokens per forward pass (gradient accumulation splits a batch into these); auto: 512 on CPU (bounds activation memory), 4096 on a GPU",
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
        "matmul precision; auto: bf16 (mixed, fp32 adapter weights and loss) on a GPU with bf16 or a CPU with AMX, else fp32",
    )


@dataclass
class EvalConfig:
    questions: str | None = _f(None, "question set (JSONL/CSV: question, optional reference) answered before and after")
    max_new_tokens: int = _f(64, "answer length for the before/after comparison")


@dataclass
class JobSpec:
    model: str = _f("smollm2-135m-instruct", "base model: built-in name, HF directory, .gguf file or hub id")
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str | None = _f(None, "run folder; default OPENFT_HOME/runs/<name>")
    suffix: str | None = _f(None, "a name for the fine-tuned model")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        sub = {"data": DataConfig, "lora": LoraConfig, "train": TrainConfig, "eval": EvalConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        for k, v in d.items():
            if k not in known:
                raise ValueError(f"unknown config key '{k}' (known: {', '.join(sorted(known))})")
            if k in sub:
                sub_known = {f.name for f in fields(sub[k])}
                bad = set(v) - sub_known
                if bad:
                    raise ValueError(
                        f"unknown key(s) in '{k}': {', '.join(sorted(bad))} (known: {', '.join(sorted(sub_known))})"
                    )
                kwargs[k] = sub[k](**v)
            else:
                kwargs[k] = v
        return cls(**kwargs)
