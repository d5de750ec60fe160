"""A tiny random model of the built-in's architecture, for tests and examples.

Same Llama architecture and the built-in's real tokenizer and chat template, but a
few small layers, so a training step takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_model(out: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny LlamaForCausalLM (safetensors) + the built-in tokenizer to `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from openft.models.load import load_builtin_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_builtin_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # Larger than the default 0.02: with a 64-wide hidden state and norms that
        # LoRA does not train, 0.02 caps how far the loss can fall at ~1 nat.
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def redraw_weights(model: torch.nn.Module, *, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Re-draw every 2-D non-embedding matrix at `std`. A freshly built tiny model's
    near-zero weights make it repeat the prompt's last token forever; larger
    random weights give varied text, which generation and streaming tests need."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.copy_(torch.randn(w.shape, generator=g) * std)
    return model
