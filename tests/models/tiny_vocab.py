"""Tiny tokenizers with the special tokens of one model family, trained in milliseconds
(byte-level BPE on a few sentences), and tiny random models around them."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Hello! I am Pip. Who are you? And in Chinese? Be brief. The answer is four.",
    "User: Assistant: system model think reasoning two plus two equals four.",
    "你好，我是 Pip 🙂 Let me think about it. Step one, step two.",
] * 4

FAMILY_SPECIALS = {
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>"),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
    ),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>"),
    # A vocabulary with no chat markers at all (a base model's).
    "bare": (["<s>", "</s>"], "<s>", "</s>"),
}


def make_tokenizer(family: str, *, extra: tuple[str, ...] = (), template: str | None = None):
    """A PreTrainedTokenizerFast whose special tokens are `family`'s (see FAMILY_SPECIALS)
    plus `extra` (e.g. "<think>", "</think>"); BOS is prepended by the tokenizer where
    the family has one, as Gemma's and Llama's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos = FAMILY_SPECIALS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[*specials, *extra],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    fast.chat_template = template
    return fast


def make_model_dir(out: Path, family: str, model_type: str, *, template: str | None = None) -> Path:
    """A tiny random causal LM of `model_type` with `family`'s tokenizer, saved to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer(family, template=template)
    kw = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if model_type.startswith("gemma"):
        kw["head_dim"] = 16
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
