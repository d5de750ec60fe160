"""Many LoRA adapters over one shared copy of a base model, chosen per batch row.

The engine keeps one copy of each base in memory. The first time an adapter of
that base is used, its target linear layers are wrapped (once) in
`MultiLoraLinear`, which holds a dict of adapters and, per forward pass, adds
each row's own adapter delta to the plain base output:

    y[rows of a] = W x[rows of a] + scaling_a * B_a (A_a x[rows of a])

Rows without an adapter get `W x` alone. Adapters are never merged into W, so
any mix of adapters (and the bare base) can share one batch, and loading or
evicting an adapter never touches the base weights.

Adapter files are PEFT format and read from safetensors only (never pickle).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from openft.models.registry import pickle_note
from openft.serve.engine_types import EngineError
from openft.train.lora import add_low_rank

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclass
class LoraRouting:
    """Which batch rows use which adapter, for the forward pass about to run.

    Shared by every `MultiLoraLinear` of one base model; the scheduler sets it
    before each forward. Two modes:
      - `single`: one adapter covers the whole batch (or None: no adapter at all);
        the layer adds B(A x) for every row, the same ops as training's LoraLinear.
      - mixed (`single` is None, `keys` non-empty): several adapters and/or bare
        rows. `slots` (B,) holds each row's index into `keys`, -1 for bare rows.
        Each layer runs ONE low-rank matmul pair against its active adapters'
        A's and B's stacked (punica/S-LoRA style), with a per-row column mask
        that zeroes the other adapters' columns and carries each row's scaling.
        Two matmuls per layer whatever the mix, instead of a gather, two small
        matmuls and a scatter per adapter."""

    single: str | None = None
    keys: tuple[str, ...] = ()
    slots: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)  # per-pass masks by stacked layout (see mask())

    def set_rows(self, row_adapters: list[str | None], device: torch.device) -> None:
        self._masks = {}
        keys = sorted({k for k in row_adapters if k is not None})
        if len(keys) <= 1 and (not keys or None not in row_adapters):
            self.single, self.keys, self.slots = (keys[0] if keys else None), (), None
            return
        self.single, self.keys = None, tuple(keys)
        index = {k: i for i, k in enumerate(keys)}
        self.slots = torch.tensor(
            [index[a] if a is not None else -1 for a in row_adapters], dtype=torch.long, device=device
        )

    def clear(self) -> None:
        self.single, self.keys, self.slots, self._masks = None, (), None, {}

    def mask(self, owners: torch.Tensor, scales: torch.Tensor, layout: tuple) -> torch.Tensor:
        """(B, R): row b's weight on stacked column c: its adapter's scaling where
        column c belongs to it, else 0. Layers with the same stacked layout share one."""
        m = self._masks.get(layout)
        if m is None:
            m = (self.slots[:, None] == owners[None, :]).to(scales.dtype) * scales[None, :]
            self._masks[layout] = m
        return m


class MultiLoraLinear(nn.Module):
    """A base `nn.Linear` plus any number of LoRA adapters, applied per row."""

    def __init__(self, base: nn.Linear, routing: LoraRouting):
        super().__init__()
        self.base = base
        self.routing = routing
        # adapter key -> (A: (r, in), B: (out, r), scaling). Plain tensors, not
        # parameters: they are not part of the base's state dict.
        self.adapters: dict[str, tuple] = {}  # A, B: tensors or Int8PerRank
        # Stacked weights for the current mix of adapters: built once per mix (a
        # running batch keeps its mix for many steps), dropped by release().
        self._stack_keys: tuple[str, ...] | None = None
        self._stack: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple] | None = None
        self._hot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the single-path adapter, widened

    @property
    def weight(self) -> torch.Tensor:  # some model code reads proj.weight.dtype
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def release(self) -> None:
        self._stack_keys, self._stack, self._hot = None, None, {}

    def _weights(self, key: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """An adapter's (A, B, scaling) in the compute dtype (widened once, kept until release())."""
        adapter = self.adapters.get(key)
        if adapter is None:
            return None
        a, b, scaling = adapter
        dtype = self.base.weight.dtype
        if a.dtype == dtype:
            return adapter
        hot = self._hot.get(key)
        if hot is None:
            # Only the adapter of the pass at hand: a batch that never drains
            # under steady traffic must not collect widened copies of every adapter.
            hot = (a.to(dtype), b.to(dtype))
            self._hot = {key: hot}
        return hot[0], hot[1], scaling

    def _stacked(self, keys: tuple[str, ...]):
        if self._stack_keys != keys:
            present = [(slot, self.adapters[k]) for slot, k in enumerate(keys) if k in self.adapters]
            if not present:
                self._stack = None
            else:
                dtype = self.base.weight.dtype
                a = torch.cat([ab[0].to(dtype) for _, ab in present])  # (R, in), R = sum of ranks
                b = torch.cat([ab[1].to(dtype) for _, ab in present], 1)  # (out, R)
                owners = torch.cat(
                    [torch.full((ab[0].shape[0],), slot, dtype=torch.long, device=a.device) for slot, ab in present]
                )
                scales = torch.cat(
                    [torch.full((ab[0].shape[0],), ab[2], dtype=a.dtype, device=a.device) for _, ab in present]
                )
                layout = tuple((slot, ab[0].shape[0], ab[2]) for slot, ab in present)
                self._stack = (a, b, owners, scales, layout)
            self._stack_keys = keys
        return self._stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, seq, in) -> out: (batch, seq, out)
        out = self.base(x)
        routing = self.routing
        if routing.single is not None:
            adapter = self._weights(routing.single)
            if adapter is not None:  # None: this adapter does not target this layer
                a, b, scaling = adapter
                # Same ops as train.lora.LoraLinear, so outputs match it bit for bit.
                out = add_low_rank(out, F.linear(x, a) * scaling, b)
            return out
        if not routing.keys:
            return out
        stack = self._stacked(routing.keys)
        if stack is None:
            return out
        a, b, owners, scales, layout = stack
        h = F.linear(x, a)  # (batch, seq, R)
        h = h * routing.mask(owners, scales, layout)[:, None, :].to(h.dtype)
        return add_low_rank(out, h, b)


def release_stacks(model: nn.Module) -> None:
    """Free every layer's stacked weights (the running batch drained or its mix changed)."""
    for module in model.modules():
        if isinstance(module, MultiLoraLinear):
            module.release()


@dataclass(frozen=True)
class Int8PerRank:
    """A LoRA factor kept as int8 with one fp32 scale per rank component: A (r,
    in) scaled per row, B (out, r) per column (`axis` is the dimension each scale
    covers). Behaves as far as the engine needs like the tensor it stands for:
    `.to(dtype)` gives the dequantized matrix, `.shape` its shape."""

    q: torch.Tensor  # int8, the factor's shape
    scale: torch.Tensor  # fp32, (r, 1) for A, (1, r) for B

    @classmethod
    def of(cls, t: torch.Tensor, axis: int) -> Int8PerRank:
        scale = t.float().abs().amax(axis, keepdim=True) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero component stays zero
        return cls(torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8).contiguous(), scale)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.q.float() * self.scale).to(dtype)


@dataclass
class AdapterWeights:
    """A validated adapter, read from disk, not yet installed in a model."""

    layers: dict[str, tuple]  # module path -> (A, B, scaling); A, B: tensors or Int8PerRank
    nbytes: int


def storage_dtype(compute: torch.dtype) -> torch.dtype:
    """How loaded adapters are kept at rest; the running batch's adapters are
    widened back to the compute dtype once per batch (`MultiLoraLinear._weights`).

    - fp32 models: fp16. Half the memory (an r=16 adapter of the 135M model:
      9.8 MB, not 19.5), and fp16's 11-bit significand keeps the weights to
      about 5e-4 relative (LoRA weights are far from fp16's range limits).
    - bf16 models: int8 with a scale per rank component (`Int8PerRank`, 4.9 MB).
      A bf16 base halves the base's memory, so adapters stored in bf16 would
      weigh twice as much next to it: 8 of them +14% of the server's memory
      (benchmarks/serve_bench.py), int8 +7%. The rounding (at most half a step
      of 1/127 of a component's largest entry) changes a layer's output less
      than bf16 arithmetic on the base weights already does (tests/serve/
      test_engine.py::test_int8_adapters_*).
    - fp16 models keep them in fp16."""
    return {torch.float32: torch.float16, torch.bfloat16: torch.int8}.get(compute, compute)


def _store(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, device: torch.device) -> tuple:
    if dtype == torch.int8:
        return Int8PerRank.of(a.to(device), axis=1), Int8PerRank.of(b.to(device), axis=0)
    return a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous()


def _nbytes(t) -> int:
    return t.nbytes if isinstance(t, Int8PerRank) else t.numel() * t.element_size()


def read_adapter(adapter_dir: Path, model: nn.Module, dtype: torch.dtype | None = None) -> AdapterWeights:
    """Read and validate a PEFT LoRA adapter against `model`; clear EngineErrors otherwise.
    `dtype`: how to store it (default: `storage_dtype` of the model's dtype)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise EngineError(f"adapter directory {d} does not exist", "adapter_not_found")
    if not (d / CONFIG_FILE).is_file():
        raise EngineError(f"{d} is not a LoRA adapter: it has no {CONFIG_FILE}", "adapter_invalid")
    if not (d / WEIGHTS_FILE).is_file():
        raise EngineError(f"{d} has no {WEIGHTS_FILE}{pickle_note(d)}", "adapter_invalid")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EngineError(f"{d / CONFIG_FILE} is unreadable or lacks r/lora_alpha: {e}", "adapter_invalid") from e
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise EngineError(
            f"{d}: only plain LoRA adapters are supported (not DoRA or other PEFT types)", "adapter_invalid"
        )
    if config.get("fan_in_fan_out"):
        raise EngineError(f"{d}: fan_in_fan_out adapters (Conv1D layers) are not supported", "adapter_invalid")
    try:
        state = load_file(str(d / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise EngineError(f"{d / WEIGHTS_FILE} is not a valid safetensors file: {e}", "adapter_invalid") from e

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        path = key.removeprefix("base_model.model.")
        for which in ("lora_A", "lora_B"):
            suffix = f".{which}.weight"
            if path.endswith(suffix):
                pairs.setdefault(path[: -len(suffix)], {})[which] = value
                break
        else:
            raise EngineError(
                f"{d}: unsupported adapter weight {key} (only lora_A/lora_B of linear layers)", "adapter_invalid"
            )
    if not pairs:
        raise EngineError(f"{d}: the adapter holds no weights", "adapter_invalid")

    modules = dict(model.named_modules())
    ref = next(model.parameters())
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    nbytes = 0
    for path, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise EngineError(f"{d}: layer {path} lacks lora_A or lora_B", "adapter_invalid")
        module = modules.get(path)
        base = module.base if isinstance(module, MultiLoraLinear) else module
        if not isinstance(base, nn.Linear):
            raise EngineError(
                f"{d}: adapter layer {path} is not a linear layer of this base model (was it trained on another base?)",
                "adapter_incompatible",
            )
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != base.in_features or b.shape != (base.out_features, r):
            raise EngineError(
                f"{d}: {path} has A {tuple(a.shape)}, B {tuple(b.shape)}, which do not fit the "
                f"base layer ({base.out_features}x{base.in_features}); was it trained on another base?",
                "adapter_incompatible",
            )
        r_cfg, alpha_cfg = (
            _pattern(config.get("rank_pattern"), path, rank),
            _pattern(config.get("alpha_pattern"), path, alpha),
        )
        scaling = alpha_cfg / math.sqrt(r_cfg) if config.get("use_rslora") else alpha_cfg / r_cfg
        a, b = _store(a, b, dtype or storage_dtype(ref.dtype), ref.device)
        layers[path] = (a, b, scaling)
        nbytes += _nbytes(a) + _nbytes(b)
    return AdapterWeights(layers=layers, nbytes=nbytes)


def _pattern(patterns: dict | None, path: str, default: float) -> float:
    # PEFT's per-module overrides: a key matches a module path by its dotted suffix.
    for key, value in (patterns or {}).items():
        if path == key or path.endswith("." + key):
            return float(value)
    return float(default)


def install_adapter(model: nn.Module, routing: LoraRouting, key: str, weights: AdapterWeights) -> None:
    """Wrap the adapter's target layers (first use only) and register its weights under `key`."""
    for path, abs_ in weights.layers.items():
        module = model.get_submodule(path)
        if not isinstance(module, MultiLoraLinear):
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = MultiLoraLinear(module, routing)
            setattr(parent, child, module)
        module.adapters[key] = abs_


def remove_adapter(model: nn.Module, key: str) -> None:
    """Drop an adapter's weights; the wrappers stay (with no adapters they cost one dict lookup)."""
    for module in model.modules():
        if isinstance(module, MultiLoraLinear):
            module.adapters.pop(key, None)
            module.release()  # a stack may hold a copy of it
