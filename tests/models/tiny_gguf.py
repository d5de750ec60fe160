"""Write tiny llama / qwen2 / qwen3 / gemma3 GGUF files with the `gguf` package, as llama.cpp lays them
out (tensor names, llama's q/k row permutation, f32 norms and biases), with 2-D
weights in a chosen quantisation, and return the HF-layout weights the file encodes.

gguf 0.19 quantises Q8_0 (and Q4_0/Q5_x) in Python but not the K-quants
(`quants.quantize` raises NotImplementedError for Q4_K/Q6_K). For those, the blocks
are drawn at random (with sane fp16 scales) and the weights the file stands for are
gguf's own dequantisation of them: any block of bytes is a valid K-quant block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# A byte-level BPE vocabulary: the 256 byte symbols, two merges, ChatML's markers.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"
)
SHAPE = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)  # K-quant rows need 256 | in_features


def _byte_symbols() -> list[str]:
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest map above 255.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def vocabulary() -> tuple[list[str], list[str], list[int]]:
    tokens = _byte_symbols() + ["Ġt", "he"] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 NORMAL, 3 CONTROL
    return tokens, ["Ġ t", "h e"], types


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary pairs interleaved differently than HF's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_blocks(qtype, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(2e-3).tobytes(), dtype=np.uint8)
    if qtype == T.Q6_K:  # ql[128] qh[64] scales[16] d
        raw[..., 208:210] = scale
    elif qtype == T.Q4_K:  # d dmin scales[12] qs[128]
        raw[..., 0:2] = scale
        raw[..., 2:4] = np.frombuffer(np.float16(1e-3).tobytes(), dtype=np.uint8)
    else:
        raise ValueError(qtype)
    return raw.reshape(shape[0], -1)


def encode(w: np.ndarray, qtype, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(bytes for the file, the float weights they decode to) for a 2-D GGUF-layout `w`."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype in (T.Q6_K, T.Q4_K):
        raw = _random_k_blocks(qtype, w.shape, rng)
    else:
        raw = quants.quantize(w.astype(np.float32), qtype)
    return raw, quants.dequantize(raw, qtype).astype(np.float32)


def write_tiny_gguf(path: Path, arch: str, qtypes: list, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny `arch` (llama | qwen2 | qwen3 | gemma3) GGUF at `path`; 2-D weights take the types of
    `qtypes` in turn. Returns the HF state dict (name -> float32 array) the file encodes."""
    import gguf

    rng = np.random.default_rng(seed)
    s = SHAPE
    head_dim = s["hidden"] // s["heads"]
    tokens, merges, types = vocabulary()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(512)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["intermediate"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(8)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))  # Gemma's tokenizer class wants one
    w.add_chat_template(CHATML)

    hf: dict[str, np.ndarray] = {}
    matrices = iter(qtypes * 64)

    def matrix(gguf_name: str, hf_name: str, shape: tuple[int, int], n_perm: int | None = None) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        qtype = next(matrices)
        raw, decoded = encode(data, qtype, rng)
        w.add_tensor(gguf_name, raw, raw_dtype=qtype)
        hf[hf_name] = unpermute(decoded, n_perm) if n_perm else decoded

    # Gemma keeps RMSNorm weights as w in (1 + w); llama.cpp writes 1 + w, and the loader
    # takes the 1 back off.
    norm_offset = 1.0 if arch == "gemma3" else 0.0

    def vector(gguf_name: str, hf_name: str, n: int, around: float = 0.0) -> None:
        data = (around + rng.standard_normal(n) * 0.05).astype(np.float32)
        w.add_tensor(gguf_name, data)
        hf[hf_name] = data - norm_offset if gguf_name.endswith("norm.weight") else data

    kv_dim = s["kv_heads"] * head_dim
    perm = arch == "llama"  # llama.cpp permutes llama's q/k rows, not the others'
    matrix("token_embd.weight", "model.embed_tokens.weight", (len(tokens), s["hidden"]))
    for i in range(s["layers"]):
        b, h = f"blk.{i}", f"model.layers.{i}"
        vector(f"{b}.attn_norm.weight", f"{h}.input_layernorm.weight", s["hidden"], 1.0)
        q_perm, k_perm = (s["heads"], s["kv_heads"]) if perm else (None, None)
        matrix(f"{b}.attn_q.weight", f"{h}.self_attn.q_proj.weight", (s["hidden"], s["hidden"]), q_perm)
        matrix(f"{b}.attn_k.weight", f"{h}.self_attn.k_proj.weight", (kv_dim, s["hidden"]), k_perm)
        matrix(f"{b}.attn_v.weight", f"{h}.self_attn.v_proj.weight", (kv_dim, s["hidden"]))
        if arch in ("qwen3", "gemma3"):  # per-head RMSNorm of q and k
            vector(f"{b}.attn_q_norm.weight", f"{h}.self_attn.q_norm.weight", head_dim, 1.0)
            vector(f"{b}.attn_k_norm.weight", f"{h}.self_attn.k_norm.weight", head_dim, 1.0)
        if arch == "qwen2":
            vector(f"{b}.attn_q.bias", f"{h}.self_attn.q_proj.bias", s["hidden"])
            vector(f"{b}.attn_k.bias", f"{h}.self_attn.k_proj.bias", kv_dim)
            vector(f"{b}.attn_v.bias", f"{h}.self_attn.v_proj.bias", kv_dim)
        matrix(f"{b}.attn_output.weight", f"{h}.self_attn.o_proj.weight", (s["hidden"], s["hidden"]))
        if arch == "gemma3":  # a norm after attention, and before and after the MLP
            vector(f"{b}.post_attention_norm.weight", f"{h}.post_attention_layernorm.weight", s["hidden"], 1.0)
            vector(f"{b}.ffn_norm.weight", f"{h}.pre_feedforward_layernorm.weight", s["hidden"], 1.0)
            vector(f"{b}.post_ffw_norm.weight", f"{h}.post_feedforward_layernorm.weight", s["hidden"], 1.0)
        else:
            vector(f"{b}.ffn_norm.weight", f"{h}.post_attention_layernorm.weight", s["hidden"], 1.0)
        matrix(f"{b}.ffn_gate.weight", f"{h}.mlp.gate_proj.weight", (s["intermediate"], s["hidden"]))
        matrix(f"{b}.ffn_up.weight", f"{h}.mlp.up_proj.weight", (s["intermediate"], s["hidden"]))
        matrix(f"{b}.ffn_down.weight", f"{h}.mlp.down_proj.weight", (s["hidden"], s["intermediate"]))
    vector("output_norm.weight", "model.norm.weight", s["hidden"], 1.0)
    # No output.weight: the head is tied to the embedding, as in the small built-ins.
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf
