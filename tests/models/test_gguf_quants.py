"""GGUF files in the quantisations real models ship (Q8_0, Q6_K, Q4_K and a
Q4_K_M-like mix of them) convert through openft's loader to the weights they encode,
for llama (q/k rows permuted by llama.cpp), qwen2 (q/k/v biases) and qwen3 (q/k norms,
64-wide heads: transformers' mapping alone would build them 128 wide) and gemma3 (norms
stored as 1 + w, four norms per layer, sliding window)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from openft.models.load import load_model
from openft.models.registry import resolve

from .tiny_gguf import write_tiny_gguf

MIXES = {
    "Q8_0": [T.Q8_0],
    "Q6_K": [T.Q6_K],
    "Q4_K": [T.Q4_K],
    "Q4_K_M-mix": [T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_K],
}


MODEL_TYPE = {"gemma3": "gemma3_text"}


def _quant_tolerance(original: np.ndarray) -> float:
    # Q8_0: per 32-value block, step amax/127, so rounding is at most half a step.
    return float(np.abs(original).max()) / 127 / 2 * 1.01


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_quantised_gguf_converts_to_the_weights_it_encodes(arch, mix, tmp_path, session_home):
    path = tmp_path / f"tiny-{arch}-{mix}.gguf"
    encoded = write_tiny_gguf(path, arch, MIXES[mix])
    loaded = load_model(resolve(str(path)))
    model = loaded.model
    # A Gemma 3 GGUF is the text model: Gemma3ForCausalLM, never the multimodal class.
    assert model.config.model_type == MODEL_TYPE.get(arch, arch) and model.config.tie_word_embeddings
    assert model.config.architectures == [type(model).__name__] and type(model).__name__.endswith("ForCausalLM")
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    for name, want in encoded.items():
        # Converted weights equal what the blocks decode to (fp32 rounding only), q/k rows unpermuted.
        np.testing.assert_allclose(state[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    # The chat template and special tokens came across with the file.
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == loaded.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([ids])).logits).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_weights_are_within_quantisation_error_of_the_originals(arch, tmp_path, session_home):
    """Q8_0 is the one type gguf quantises in Python: the loaded weights are the float
    originals to within half a quantisation step."""
    import gguf

    rng = np.random.default_rng(1)
    original = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    raw = gguf.quants.quantize(original, T.Q8_0)
    decoded = gguf.quants.dequantize(raw, T.Q8_0)
    err = np.abs(decoded - original).max()
    assert 0 < err <= _quant_tolerance(original)
    # And through a whole file: every matrix of a Q8_0 tiny model is within that bound of its floats.
    path = tmp_path / "q8.gguf"
    encoded = write_tiny_gguf(path, arch, [T.Q8_0], seed=2)
    state = load_model(resolve(str(path))).model.state_dict()
    for name, want in encoded.items():
        if want.ndim == 2:
            np.testing.assert_allclose(state[name].numpy(), want, atol=1e-6)
