"""A short fine-tune of each family whose GGUF layout the export writes, shared by
the export tests (built once per session per family)."""

from __future__ import annotations

import json

import pytest

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")
# Gemma 3 as llama.cpp runs it: five sliding layers to one global (the family's
# tiny default has two layers, one of each).
LAYERS = {"gemma3_text": {"num_hidden_layers": 6, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}}


def tiny_run(tmp, family: str, tokenizer, **overrides):
    """A two-step LoRA fine-tune of a tiny random `family` model under `tmp`."""
    from train.families import build_family_model
    from train.helpers import write_chat_jsonl

    from openft.config import JobSpec
    from openft.train.recipe import finetune

    base = build_family_model(tmp / "base", family, tokenizer, **overrides)
    # Not the default rotary base (SmolLM2's is 1e5): an export that wrote the
    # default instead would give other logits from the third position on.
    config = json.loads((base / "config.json").read_text())
    rope = config.setdefault("rope_parameters", {"rope_type": "default"})
    (rope.get("full_attention") or rope)["rope_theta"] = 50_000.0
    (base / "config.json").write_text(json.dumps(config))
    spec = JobSpec(model=str(base))
    spec.data.path = str(write_chat_jsonl(tmp / "train.jsonl", n=8))
    spec.output_dir = str(tmp / "run")
    spec.train.max_steps = 2
    spec.train.learning_rate = 1e-2  # the adapter moves: the merge is visible in the logits
    spec.train.precision = "fp32"
    return finetune(spec, progress=False).run_dir


@pytest.fixture(scope="session", params=FAMILIES)
def run(request, tiny_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"gguf-{request.param}")
    return tiny_run(tmp, request.param, tiny_tokenizer, **LAYERS.get(request.param, {}))
