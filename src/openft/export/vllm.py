"""A run's LoRA adapter for vLLM: checked against what vLLM's LoRA loader accepts,
copied with the `vllm serve` line that serves it, or refused with the reasons
(`merge=True` writes the merged model instead, which vLLM serves as a plain model).

vLLM's rules (vllm/lora/peft_helper.py and vllm/config/lora.py): the server's
`--max-lora-rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 and must be at
least the adapter's `r`; no DoRA (`use_dora`); no `modules_to_save` (a trained
`lm_head` or embedding would be ignored or refused); `bias` "none" (bias
adapters need a flag newer vLLMs dropped); every tensor named
`base_model.model.<module>.lora_A|lora_B.weight` on a linear layer of the
decoder, A of shape [r, in] and B of [out, r].
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from openft.export import ExportRefused
from openft.fileio import atomic_dir

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's choices of --max-lora-rank
TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.weight")
NOT_LINEAR = ("lm_head", "embed_tokens", "wte", "embed_out")  # vLLM serves LoRA on decoder linears only


class AdapterRefused(ExportRefused):
    """An adapter vLLM would refuse; `problems` says why, one reason each."""

    def __init__(self, problems: list[str]):
        super().__init__(problems)
        self.args = ("vLLM would refuse this adapter: " + "; ".join(self.problems),)


@dataclass
class VllmCheck:
    rank: int
    max_lora_rank: int | None  # the smallest --max-lora-rank that fits; None when r is too large
    modules: list[str] = field(default_factory=list)  # the adapted module names (q_proj, ...)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _config_problems(cfg: dict) -> list[str]:
    out = []
    if cfg.get("peft_type", "LORA") != "LORA":
        out.append(f"peft_type is {cfg.get('peft_type')!r}: vLLM loads LoRA adapters only")
    if cfg.get("use_dora"):
        out.append("use_dora is set: vLLM does not support DoRA")
    if cfg.get("modules_to_save"):
        out.append(f"modules_to_save is {cfg['modules_to_save']!r}: vLLM takes only adapters without it")
    if cfg.get("bias", "none") != "none":
        out.append(f"bias is {cfg['bias']!r}: vLLM serves adapters whose bias is 'none'")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    for t in targets:
        if any(t == n or t.endswith("." + n) for n in NOT_LINEAR):
            out.append(f"target module {t!r} is not a decoder linear layer: vLLM serves no LoRA on it")
    return out


def _tensor_problems(path: Path, rank: int) -> tuple[list[str], list[str]]:
    """(problems, the adapted modules' short names) from the adapter's tensors."""
    problems, modules = [], set()
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            m = TENSOR.fullmatch(name)
            if not m:
                problems.append(f"tensor {name!r} is not named base_model.model.<module>.lora_A|lora_B.weight")
                continue
            short = m["module"].rsplit(".", 1)[-1]
            modules.add(short)
            if short in NOT_LINEAR:
                problems.append(f"tensor {name!r} adapts {short}: vLLM serves no LoRA on it")
            shape = tuple(f.get_slice(name).get_shape())
            want = 0 if m["ab"] == "lora_A" else 1
            if len(shape) != 2 or shape[want] != rank:
                problems.append(f"tensor {name!r} has shape {list(shape)}, not rank {rank} on the {m['ab']} side")
    return problems, sorted(modules)


def check_adapter(adapter_dir: str | Path) -> VllmCheck:
    """What vLLM would say of a PEFT adapter folder, without vLLM."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        missing = [p.name for p in (cfg_path, weights) if not p.is_file()]
        return VllmCheck(0, None, problems=[f"{adapter_dir} has no {' or '.join(missing)}"])
    cfg = json.loads(cfg_path.read_text())
    rank = int(cfg.get("r") or 0)
    fits = [r for r in MAX_LORA_RANKS if r >= rank]
    problems = _config_problems(cfg)
    if rank < 1:
        problems.append(f"r is {cfg.get('r')!r}: a LoRA rank is a positive integer")
    elif not fits:
        problems.append(f"r is {rank}: vLLM's --max-lora-rank goes up to {MAX_LORA_RANKS[-1]}")
    tensor_problems, modules = _tensor_problems(weights, rank)
    return VllmCheck(rank, fits[0] if fits and rank >= 1 else None, modules, problems + tensor_problems)


def serve_command(base: str, name: str, adapter_dir: Path, max_lora_rank: int) -> str:
    return shlex.join(
        [
            "vllm",
            "serve",
            base,
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank),
            "--lora-modules",
            f"{name}={adapter_dir.resolve()}",
        ]  # fmt: skip
    )


@dataclass
class VllmExport:
    out: Path
    command: str  # the line that serves it
    merged: bool
    check: VllmCheck


def export_vllm(run_dir: str | Path, out: str | Path, *, name: str | None = None, merge: bool = False) -> VllmExport:
    """The run's adapter checked and copied to `out` with `vllm-serve.sh`; an adapter
    vLLM would refuse raises AdapterRefused, unless `merge` (then the merged model)."""
    from openft.train.export import ADAPTER_FILES, check_source, default_name, export, run_and_adapter

    run_dir, out = Path(run_dir), Path(out)
    check_source(run_dir)
    run, adapter = run_and_adapter(run_dir)
    lineage = json.loads((run / "lineage.json").read_text())
    check = check_adapter(adapter) if adapter else VllmCheck(0, None, problems=["a full fine-tune"])
    name = name or default_name(run_dir)
    if check.ok:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty")
        command = serve_command(lineage["base_model_path"], name, out, check.max_lora_rank)
        with atomic_dir(out) as tmp:
            for f in ADAPTER_FILES:
                shutil.copy(adapter / f, tmp / f)
            (tmp / "vllm-serve.sh").write_text(f"#!/bin/sh\n# the adapter on its base model, as {name!r}\n{command}\n")
        return VllmExport(out, command, False, check)
    if not merge and adapter:
        raise AdapterRefused(check.problems)
    export(run_dir, out)  # merged weights and tokenizer: vLLM serves the folder as a model
    command = shlex.join(["vllm", "serve", str(out.resolve()), "--served-model-name", name])
    (out / "vllm-serve.sh").write_text(f"#!/bin/sh\n# the merged model, as {name!r}\n{command}\n")
    return VllmExport(out, command, True, check)
