"""Every real built-in loads (assembled, sha256-checked and converted on first use:
`make test` installs the packages, nothing is pulled here), is the family it says,
and continues a prompt with sensible text."""

from __future__ import annotations

import re

import pytest
import torch

from openft.models.builtins import BUILTINS, missing_packages
from openft.models.load import load_model

pytestmark = pytest.mark.slow

# (built-in, transformers model_type, class, what greedy decoding of the prompt must contain)
CASES = [
    ("smollm2-135m-instruct", "llama", "LlamaForCausalLM", "Paris"),
    ("qwen2.5-coder-0.5b-instruct", "qwen2", "Qwen2ForCausalLM", "Paris"),
    # The 270M base model says something true and fluent, if not the city itself.
    ("gemma-3-270m", "gemma3_text", "Gemma3ForCausalLM", "France"),
]


@pytest.mark.parametrize("name, model_type, cls, expected", CASES, ids=[c[0] for c in CASES])
def test_builtin_loads_as_its_family_and_generates(name, model_type, cls, expected, session_home):
    builtin = BUILTINS[name]
    missing = missing_packages(builtin)
    if missing:
        pytest.fail(f"{name} needs {', '.join(missing)}: `make test` installs them (or `openft models pull {name}`)")
    loaded = load_model(name)
    model, tok = loaded.model, loaded.tokenizer
    assert model.config.model_type == model_type and type(model).__name__ == cls
    assert model.config.architectures == [cls]  # a text-only causal LM, whatever the GGUF's architecture says
    assert builtin.family in {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}[model_type]
    if name == "gemma-3-270m":
        assert model.config.vocab_size == 262144 and model.config.tie_word_embeddings
        assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert expected in text, text
    assert re.fullmatch(r"[\w\s.,'\-:]+", text), text  # words, not template fragments or byte soup
