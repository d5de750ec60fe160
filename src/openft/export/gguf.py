"""A fine-tuned model as one GGUF file for llama.cpp (and Ollama, which runs it).

The LoRA is merged into the base's unquantised weights (a base that came from a
quantised GGUF was dequantised to fp32 when openft first loaded it: the export
re-quantises from those weights, so a Q4 base exported as q8_0 carries the Q4
rounding plus the q8_0 one). Written with the `gguf` package: tensor names from
its map of the architecture, Q and K rows permuted as llama.cpp's converter does
for Llama-style rotary layouts, the tokenizer's tokens and merges, the chat
template openft trained with, and the stop token as end of turn.

Which quantisations can be written is measured, not listed: a type whose code
the installed `gguf` package lacks (today the K-quants) is named as unavailable
before anything is loaded.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from openft.export import ExportRefused

# The names users type, and the GGML type each writes its matrices in.
QUANT_NAMES = {
    "f32": "F32",
    "f16": "F16",
    "bf16": "BF16",
    "q8_0": "Q8_0",
    "q5_1": "Q5_1",
    "q5_0": "Q5_0",
    "q4_1": "Q4_1",
    "q4_0": "Q4_0",
    "q6_k": "Q6_K",
    "q5_k_m": "Q5_K",
    "q4_k_m": "Q4_K",
    "q3_k_m": "Q3_K",
    "q2_k": "Q2_K",
}
# llama.cpp's file types (LLAMA_FTYPE_*), the header's `general.file_type`.
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # gguf.MODEL_ARCH member
    permute_qk: bool  # HF's rotate-half layout of Q and K rows, turned into llama.cpp's interleaved one
    norm_shift: float = 0.0  # added to every RMSNorm weight: Gemma's norm scales by (1 + w), llama.cpp's by w


ARCHS = {
    "llama": Arch("LLAMA", True),
    "mistral": Arch("LLAMA", True),
    "qwen2": Arch("QWEN2", False),
    "qwen3": Arch("QWEN3", False),  # its q/k norms map to attn_q_norm/attn_k_norm
    "gemma3_text": Arch("GEMMA3", False, norm_shift=1.0),  # the embedding scale llama.cpp applies itself
}
# llama.cpp's Gemma 3 (llama-model.cpp) fixes what the HF config spells out: every
# sixth layer global, the others sliding with a rotary base of 10000.
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0


class ExportError(ExportRefused):
    """An export that cannot be written as asked (an architecture or quantisation it lacks)."""


@cache
def available_quants() -> tuple[str, ...]:
    """The quantisations the installed gguf package can write, by trying each on one block."""
    from gguf import GGMLQuantizationType, quants

    out = []
    sample = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
    for name, ggml in QUANT_NAMES.items():
        try:
            quants.quantize(sample, GGMLQuantizationType[ggml])
        except (NotImplementedError, quants.QuantError, KeyError):
            continue
        out.append(name)
    return tuple(out)


def check_quant(quant: str) -> None:
    if quant not in QUANT_NAMES:
        raise ExportError(f"unknown quantisation {quant!r}; available: {', '.join(available_quants())}")
    if quant not in available_quants():
        raise ExportError(
            f"{quant} needs quantisation code the installed gguf package lacks; "
            f"available: {', '.join(available_quants())}"
        )


def check_arch(model_type: str) -> Arch:
    if model_type not in ARCHS:
        raise ExportError(f"GGUF export of {model_type!r} models is not supported yet; supported: {', '.join(ARCHS)}")
    return ARCHS[model_type]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's Q/K rows (each head's two rotary halves apart) in llama.cpp's order (pairs side by side)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GgufExport:
    path: Path
    quant: str
    n_tensors: int
    bytes: int
    kept_f16: list[str] = field(default_factory=list)  # matrices whose rows do not split into the type's blocks
    notes: list[str] = field(default_factory=list)


def tensor_type(name: str, array: np.ndarray, quant: str):
    """The GGML type of one tensor: vectors (norms, biases) in F32, matrices as asked."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if array.ndim == 1 or quant == "f32":
        return GGMLQuantizationType.F32
    ggml = GGMLQuantizationType[QUANT_NAMES[quant]]
    block = GGML_QUANT_SIZES[ggml][0]
    if array.shape[-1] % block:
        return None  # kept in F16: the row length is not a whole number of blocks
    return ggml


def encode(array: np.ndarray, ggml):
    from gguf import GGMLQuantizationType, quants

    if ggml == GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if ggml == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return quants.quantize(array.astype(np.float32), ggml)


def write_tensors(writer, model, config, arch: Arch, quant: str, result: GgufExport) -> None:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name], config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r} of a {config.model_type} model")
        array = tensor.detach().float().cpu().numpy()
        if arch.permute_qk and hf_name.endswith("q_proj.weight"):
            array = permute(array, config.num_attention_heads)
        elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
            array = permute(array, config.num_key_value_heads)
        if arch.norm_shift and hf_name.endswith("norm.weight"):
            array = array + np.float32(arch.norm_shift)
        ggml = tensor_type(name, array, quant)
        if ggml is None:
            ggml = gguf.GGMLQuantizationType.F16
            result.kept_f16.append(name)
        data = encode(array, ggml)
        writer.add_tensor(name, data, raw_dtype=ggml if data.dtype == np.uint8 else None)
        result.n_tensors += 1
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
        result.n_tensors += 1


def rope_params(config, layer_type: str = "full_attention") -> dict:
    """The rotary settings: transformers 5 keeps them in `rope_parameters` (older
    configs at the top level), per layer type for models with sliding layers (Gemma 3)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    params.setdefault("rope_type", "default")
    params["rope_theta"] = params.get("rope_theta") or getattr(config, "rope_theta", None)
    return params


def rope_theta(config, layer_type: str = "full_attention") -> float:
    """The rotary base. Linear scaling is written as llama.cpp's scaling type and
    factor, Llama 3.1's `llama3` as its per-frequency factors (`rope_freqs`); another
    (YaRN, dynamic) is refused by name rather than written as plain RoPE."""
    params = rope_params(config, layer_type)
    kind = params["rope_type"]
    if kind not in ("default", "linear", "llama3") or (kind == "llama3" and config.model_type != "llama"):
        raise ExportError(f"GGUF export of RoPE scaling {kind!r} is not supported yet")
    if not params["rope_theta"]:
        raise ExportError("the model's config names no rope_theta")
    return float(params["rope_theta"])


def llama3_rope_factors(config) -> np.ndarray | None:
    """Llama 3.1's `llama3` scaling as llama.cpp takes it, one factor per rotary pair
    that its frequency is divided by, computed as its converter does: 1 for short
    wavelengths, `factor` for long ones, a smooth blend between. None without it."""
    params = rope_params(config)
    if params["rope_type"] != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope_theta(config) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = params["factor"], params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    out = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, out))
    return out.astype(np.float32)


def write_gemma3_header(writer, config) -> None:
    """Gemma 3's sliding window; a config whose layout llama.cpp's fixed one would
    compute differently (another pattern of sliding layers, their rotary base, the
    attention scale) is refused rather than written to answer otherwise."""
    from openft.models.load import gemma3_attention_scalar

    n = config.num_hidden_layers
    fixed = [
        "sliding_attention" if i % GEMMA3_SWA_PATTERN < GEMMA3_SWA_PATTERN - 1 else "full_attention" for i in range(n)
    ]
    layer_types = list(getattr(config, "layer_types", None) or fixed)
    problems = []
    if layer_types != fixed:
        problems.append(f"its layers are {layer_types}; llama.cpp runs Gemma 3 as five sliding layers to one global")
    if "sliding_attention" in layer_types and rope_theta(config, "sliding_attention") != GEMMA3_LOCAL_ROPE_THETA:
        problems.append(f"llama.cpp's sliding layers use a rotary base of {GEMMA3_LOCAL_ROPE_THETA:g}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scalar = gemma3_attention_scalar(n, config.hidden_size, config.num_attention_heads, head_dim)
    if getattr(config, "query_pre_attn_scalar", scalar) != scalar:
        problems.append(f"llama.cpp scales its attention by 1/sqrt({scalar}), this model by query_pre_attn_scalar")
    if problems:
        raise ExportError([f"this Gemma 3 model would answer otherwise in llama.cpp: {p}" for p in problems])
    writer.add_sliding_window(int(config.sliding_window))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def write_header(writer, config, name: str, quant: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    rope = rope_params(config)
    if rope["rope_type"] == "linear":  # positions divided by the factor (on Gemma 3's global layers only)
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "gemma3_text":
        write_gemma3_header(writer, config)
    if quant in FILE_TYPES:
        writer.add_file_type(FILE_TYPES[quant])


def source_gguf_metadata(model_dir: Path) -> dict:
    """The tokenizer fields of the GGUF a converted base came from (its `SOURCE`), if any:
    llama.cpp's pre-tokenizer name and token types are kept as the original file had them."""
    source = model_dir / "SOURCE"
    if not source.is_file():
        return {}
    path = Path(source.read_text().strip())
    if not path.is_file():
        return {}
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path))
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.ggml.")}


def token_types(tokenizer, n: int) -> list[int]:
    """llama.cpp's type of each token, as its converter sets them: an added token the
    tokenizer calls special is CONTROL (llama.cpp parses it as one token in a prompt
    and hides it in output), another added token USER_DEFINED, the rest NORMAL.
    Typed NORMAL, `<|im_start|>` would be split into text pieces by llama.cpp."""
    from gguf import TokenType

    types = [int(TokenType.NORMAL)] * n
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < n:
            types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    return types


def vocab_kind(tokenizer, src: dict) -> str:
    """How llama.cpp is to tokenise: `gpt2` (byte-level BPE, written from the
    tokenizer's own tokens and merges) or `spm` (SentencePiece: Gemma, Llama 2,
    Mistral v0.1, whose merge order llama.cpp takes from per-token scores). A
    SentencePiece-style vocabulary is written only from the GGUF its base came from,
    which holds those scores; from a Hugging Face folder it is refused by name."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError("GGUF export needs a fast (tokenizer.json) tokenizer")
    # The model object itself, not tokenizer.to_str(): that serialises the whole
    # vocabulary (seconds for Gemma's 262k tokens) to read two fields.
    model = tokenizer.backend_tokenizer.model
    model_type, byte_fallback = type(model).__name__, bool(getattr(model, "byte_fallback", False))
    if model_type == "BPE" and not byte_fallback:
        return "gpt2"
    if src.get("tokenizer.ggml.model") == "llama" and len(src.get("tokenizer.ggml.scores") or ()) == len(tokenizer):
        return "spm"
    kind = "SentencePiece-style (byte-fallback) BPE" if byte_fallback else model_type
    raise ExportError(
        f"GGUF export of a {kind} tokenizer is supported only for a base converted from a GGUF "
        "(which holds its scores), not from a Hugging Face folder yet; byte-level BPE (Llama 3, Qwen, "
        "SmolLM) is; export format=hf or adapter and convert it with llama.cpp's convert_hf_to_gguf.py"
    )


def write_bpe_vocab(writer, tokenizer, tokenizer_dir: Path, src: dict, notes: list[str]) -> int:
    """Byte-level BPE tokens and types; the merges go in with the special ids."""
    from gguf.vocab import BpeVocab

    tokens = [text for text, _score, _type in BpeVocab(tokenizer_dir).all_tokens()]
    types = token_types(tokenizer, len(tokens))
    pre = src.get("tokenizer.ggml.pre")
    if not pre:
        pre = "default"
        notes.append("the base has no GGUF of origin: llama.cpp's pre-tokenizer is 'default'")
    src_types = src.get("tokenizer.ggml.token_type")
    if isinstance(src_types, list) and len(src_types) == len(types):
        types = [int(t) for t in src_types]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return len(tokens)


def write_spm_vocab(writer, tokenizer, src: dict) -> int:
    """A SentencePiece vocabulary as the base's GGUF had it: the tokenizer's pieces
    (transformers built them from that file, in its order) with the file's scores
    and types, and its space-prefix rule."""
    n = len(tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre(src.get("tokenizer.ggml.pre") or "default")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(n))))
    writer.add_token_scores([float(x) for x in src["tokenizer.ggml.scores"]])
    writer.add_token_types([int(t) for t in src["tokenizer.ggml.token_type"]])
    if "tokenizer.ggml.add_space_prefix" in src:
        writer.add_add_space_prefix(bool(src["tokenizer.ggml.add_space_prefix"]))
    return n


def write_tokenizer(
    writer, tokenizer, tokenizer_dir: Path, src: dict, kind: str, stops: list[int], template: str, add_bos: bool | None
) -> list[str]:
    """The vocabulary (`kind`, from vocab_kind), special ids and chat template; returns
    notes. `src`: the tokenizer fields of the base's GGUF of origin (source_gguf_metadata);
    `add_bos`: whether llama.cpp adds a BOS to a prompt (None: as the base says)."""
    from gguf.vocab import SpecialVocab

    notes = []
    if kind == "gpt2":
        n, merges = write_bpe_vocab(writer, tokenizer, tokenizer_dir, src, notes), True
    else:
        n, merges = write_spm_vocab(writer, tokenizer, src), False
    special = SpecialVocab(tokenizer_dir, load_merges=merges, n_vocab=n)
    special.chat_template = template  # the template openft trained with, not the base's
    if "tokenizer.ggml.add_bos_token" in src:
        special.add_special_token["bos"] = bool(src["tokenizer.ggml.add_bos_token"])
    if add_bos is not None:
        special.add_special_token["bos"] = add_bos
    special.add_to_gguf(writer)
    writer.add_eot_token_id(stops[-1] if len(stops) > 1 else stops[0])
    return notes


def commit(writer, tmp: Path, out: Path) -> None:
    """Write the file at `tmp`, then rename it to `out`: a crash leaves no half file there."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)


def export_gguf(
    run_dir: str | Path,
    out: str | Path,
    *,
    quant: str = "f16",
    name: str | None = None,
    loaded=None,
    add_bos: bool | None = None,
) -> GgufExport:
    """The run's merged model as one GGUF file at `out` (written whole, then renamed);
    `loaded` is that merged model when the caller has it already (load_run(merged=True));
    `add_bos` overrides the base's `tokenizer.ggml.add_bos_token`."""
    import gguf

    from openft.models.stop import stop_token_ids
    from openft.train.export import check_source, default_name, load_run, run_and_adapter

    run_dir, out = Path(run_dir), Path(out)
    check_quant(quant)
    check_source(run_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists")
    lineage = json.loads((run_and_adapter(run_dir)[0] / "lineage.json").read_text())
    loaded = loaded or load_run(run_dir, merged=True)
    config = loaded.model.config
    arch = check_arch(config.model_type)
    tok = loaded.tokenizer
    src = source_gguf_metadata(Path(lineage.get("base_model_path") or run_and_adapter(run_dir)[0]))
    kind = vocab_kind(tok, src)  # refused before anything is written
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    result = GgufExport(out, quant, 0, 0)
    tmp = out.with_name(f".{out.name}.tmp")
    tok_dir = out.with_name(f".{out.name}.tokenizer")
    try:
        tok.save_pretrained(tok_dir)
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
        write_header(writer, config, name or default_name(run_dir), quant)
        result.notes += write_tokenizer(writer, tok, tok_dir, src, kind, stop_token_ids(tok), template, add_bos)
        write_tensors(writer, loaded.model, config, arch, quant, result)
        commit(writer, tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(tok_dir, ignore_errors=True)
    result.bytes = out.stat().st_size
    return result
