"""A run's LoRA adapter alone as a llama.cpp LoRA GGUF (`llama-server -m BASE.gguf
--lora FILE`): no merge, no base weights loaded, a few MiB.

llama.cpp's adapter format (its llama-adapter.cpp and convert_lora_to_gguf.py):
`general.type` "adapter", `adapter.type` "lora", `adapter.lora.alpha`; each adapted
matrix W (GGUF name `blk.N.attn_q.weight`) gets `<name>.lora_a` of shape [r, in] and
`<name>.lora_b` of [out, r], PEFT's own shapes, and llama.cpp scales B·A by
alpha / r as PEFT does. The base's Q and K rows are permuted into llama.cpp's
rotary order by the model export, so B's rows (Q = B·A) are permuted the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from openft.export.gguf import ExportError, check_arch, commit, permute
from openft.models.registry import ModelNotFound

LORA_QUANTS = ("f32", "f16", "bf16")  # A and B rows are r long: too short for block quantisations


def check_lora_quant(quant: str) -> None:
    if quant not in LORA_QUANTS:
        raise ExportError(f"a LoRA GGUF is written in {', '.join(LORA_QUANTS)}, not {quant}")


@dataclass
class GgufLoraExport:
    path: Path
    quant: str
    n_tensors: int
    bytes: int
    base_gguf: Path | None = None  # the GGUF the base was converted from, where there is one
    notes: list[str] = field(default_factory=list)


def lora_pairs(adapter_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HF weight name (`model.layers.0.self_attn.q_proj.weight`) -> (A, B) as float32."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out: dict[str, list] = {}
    for key, value in tensors.items():
        module, ab = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        if ab not in ("lora_A", "lora_B"):
            raise ExportError(f"adapter tensor {key!r} is not a LoRA A or B matrix")
        out.setdefault(f"{module}.weight", [None, None])[ab == "lora_B"] = value.astype(np.float32)
    missing = [name for name, (a, b) in out.items() if a is None or b is None]
    if missing:
        raise ExportError(f"adapter has A without B (or B without A) for {missing[0]}")
    return {name: (a, b) for name, (a, b) in out.items()}


def encode(array: np.ndarray, quant: str):
    import gguf

    if quant == "f32":
        return array, None
    if quant == "f16":
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def export_gguf_lora(
    run_dir: str | Path, out: str | Path, *, quant: str = "f16", name: str | None = None
) -> GgufLoraExport:
    """The run's (or checkpoint's) adapter as one LoRA GGUF at `out` (written whole, then renamed)."""
    import gguf

    from openft.train.export import check_source, default_name, run_and_adapter

    run_dir, out = Path(run_dir), Path(out)
    check_lora_quant(quant)
    check_source(run_dir)
    run, adapter = run_and_adapter(run_dir)
    if adapter is None:
        raise ExportError("this run is a full fine-tune: it has no adapter; export it as --format gguf")
    if out.exists():
        raise FileExistsError(f"{out} exists")
    base = Path(json.loads((run / "lineage.json").read_text())["base_model_path"])
    if not (base / "config.json").is_file():  # as the model loader says of a base that is gone
        raise ModelNotFound(f"the base model this run was trained on is gone ({base})")
    config = json.loads((base / "config.json").read_text())
    arch = check_arch(config["model_type"])
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    gguf_arch = gguf.MODEL_ARCH[arch.gguf_name]
    names = gguf.get_tensor_name_map(gguf_arch, config["num_hidden_layers"])
    result = GgufLoraExport(out, quant, 0, 0)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf_arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter_cfg["lora_alpha"]))
        writer.add_name(name or default_name(run_dir))
        pairs = lora_pairs(adapter)
        if "lm_head.weight" in pairs and config.get("tie_word_embeddings", False):
            raise ExportError(
                "this adapter trains the output head (openft does so where the data teaches control tokens such "
                "as <tool_call>), and this base's head is its embedding (tied): the base GGUF has no output "
                "tensor for llama.cpp to apply it to; export the merged model instead (--format gguf)"
            )
        for hf_name, (a, b) in sorted(pairs.items()):
            target = names.get_name(hf_name, try_suffixes=(".weight",))
            if target is None:
                raise ExportError(f"no GGUF name for adapted weight {hf_name!r} of a {config['model_type']} model")
            if arch.permute_qk and hf_name.endswith("q_proj.weight"):
                b = permute(b, config["num_attention_heads"])
            elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
                b = permute(b, config.get("num_key_value_heads") or config["num_attention_heads"])
            for suffix, array in ((".lora_a", a), (".lora_b", b)):
                data, raw = encode(np.ascontiguousarray(array), quant)
                writer.add_tensor(target + suffix, data, raw_dtype=raw)
                result.n_tensors += 1
        commit(writer, tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    result.bytes = out.stat().st_size
    source = base / "SOURCE"
    if source.is_file() and Path(source.read_text().strip()).is_file():
        result.base_gguf = Path(source.read_text().strip())  # the file openft converted the base from
    else:
        result.notes.append("llama.cpp needs the base as a GGUF too; this base came from no GGUF file")
    return result
