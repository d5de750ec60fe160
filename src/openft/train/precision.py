"""Training precision: fp32, or bf16 matmuls where the hardware has fast bf16.

`auto` resolves to bf16 where it measured at least 1.2x fp32's matmul rate on
this machine (`openft.autoprecision`: a CPU with AMX or AVX512-BF16, a GPU
with bf16) and to fp32 elsewhere;
`benchmarks/train_bench.py --configs openft,openft_fp32` compares whole runs.

bf16 here means mixed precision, the usual recipe:
- LoRA: the frozen base weights are stored in bf16 (half the memory, no cast
  per step); the adapter's A/B weights, their gradients and AdamW's moments
  stay fp32, and autocast runs each matmul in bf16 with fp32 accumulation.
- full fine-tuning: every weight stays fp32 (the optimizer updates fp32
  masters) and is cast for each matmul, in backward again rather than kept
  (`openft.train.castlinear`).
The loss and its softmax are computed in fp32 (`openft.train.loss`).
After training, `restore` puts the base weights back exactly as loaded, so the
in-process model (the before/after comparison) is the one that gets served.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from openft.hardware import shape_bucket
from openft.heap import release_free_memory
from openft.mapped import FileMaps

RELEASE_EVERY = 256 << 20  # bytes of bf16 weights freed by `restore` between heap releases


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" or "bf16"
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def widths(self) -> Callable[[int], int] | None:
        """How micro-batches pad their rows: oneDNN (bf16 on a CPU) compiles a
        kernel per matmul shape, so there rows go to a few bucketed widths."""
        return shape_bucket if self.name == "bf16" and self.device_type == "cpu" else None

    def use_kernels(self, model: nn.Module, *, full: bool) -> Callable[[], None]:
        """bf16's training kernels; returns the undo of all of them.
        - on a CPU, attention as matmuls with a hand-written backward
          (`openft.train.attention`; torch's CPU flash kernel is slow backward
          in bf16), and RMSNorm as compiled kernels (`openft.train.fused`);
        - full fine-tuning: the fp32 weights are cast per use and not kept in
          bf16 between forward and backward (`openft.train.castlinear`; LoRA's
          adapters are too small for it to matter)."""
        if self.name != "bf16":
            return lambda: None
        from openft.train import attention, castlinear, fused

        undos = [castlinear.use(model)] if full else []
        if self.device_type == "cpu":
            undos += [attention.use(model), fused.use(model)]

        def undo() -> None:
            for u in reversed(undos):
                u()

        return undo

    def prepare(self, model: nn.Module) -> list[str]:
        """Store the frozen fp32 weights in bf16 (LoRA's base); trainable ones stay
        fp32. Returns the names of the parameters converted, for `restore`."""
        if self.name != "bf16":
            return []
        names = []
        maps = FileMaps()  # a loaded base is a view of its file: read it without keeping its pages
        for name, p in model.named_parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = maps.copy(p.data, torch.bfloat16)
                names.append(name)
        return names

    def restore(self, model: nn.Module, names: list[str], original: Callable[[str], torch.Tensor | None]) -> None:
        """Put the converted weights back in fp32: the tensor as loaded where
        `original(name)` has it, else the upcast bf16 value. A tensor of a file
        mapping goes back as that view, as the model was loaded: nothing of it is
        resident until read, and its pages are the file's (clean, droppable), not
        a second fp32 copy of the base made at the end of training."""
        # Training's freed activations are still held by the heap (openft.heap):
        # return them first, so the fp32 weights do not stack on top of them.
        release_free_memory()
        params = dict(model.named_parameters())
        maps: FileMaps | None = None
        freed = 0
        for name in names:
            p = params[name]
            src = original(name)
            if src is None:
                p.data = p.data.float()
                continue
            maps = maps or FileMaps()  # once `original` has mapped its files
            freed += p.data.nbytes
            if src.dtype == torch.float32 and p.device.type == "cpu" and maps.covers(src):
                p.data = src
            else:  # an owned copy, whose source pages are handed back as it is read
                p.data = maps.copy(src, torch.float32).to(p.device)
            if freed >= RELEASE_EVERY:  # the bf16 copies freed so far: back to the OS, not held for reuse
                release_free_memory()
                freed = 0
        release_free_memory()


def weights_on_disk(path: Path) -> Callable[[str], torch.Tensor | None]:
    """Look up a parameter's tensor, by its name in the (possibly LoRA-wrapped)
    model, in the safetensors files of the directory it was loaded from; each
    tensor is read on its own (no second copy of the model in memory)."""
    from safetensors import safe_open

    where = {}  # tensor name -> the open file holding it
    for f in sorted(Path(path).glob("*.safetensors")):
        h = safe_open(str(f), "pt")
        where.update({k: h for k in h.keys()})

    def lookup(name: str) -> torch.Tensor | None:
        key = name.replace(".base.", ".")  # LoraLinear keeps the wrapped layer as .base
        return where[key].get_tensor(key) if key in where else None

    return lookup
