"""Tiny random models of each architecture family openft supports, built from
transformers' own config classes (2 layers, 64 wide), saved with the built-in's
tokenizer so the whole training path (template, loss mask, packing) runs on them."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")


def tiny_config(family: str, *, vocab_size: int, bos: int | None, eos: int | None, pad: int | None):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # Larger than the default 0.02, as models/tiny.py explains: the loss can fall.
        initializer_range=0.1,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "qwen2":  # q/k/v biases
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norms, explicit head_dim
        return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if family == "mistral":  # untied head, sliding window
        return MistralConfig(**common, sliding_window=4096, tie_word_embeddings=False)
    if family == "gemma3_text":  # (1+w) RMSNorm, scaled embedding, one sliding layer then one global
        return Gemma3TextConfig(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=True,
        )
    raise ValueError(family)


def build_family_model(out: Path, family: str, tokenizer, *, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `family` model plus `tokenizer` into `out`; returns `out`.
    `overrides`: config fields to set otherwise (more layers, another layout)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        family,
        vocab_size=len(tokenizer),
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
