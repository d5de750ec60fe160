"""A short fine-tune of each family whose GGUF layout the export writes, shared by
the export tests (built once per session per family)."""

from __future__ import annotations

import pytest

FAMILIES = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="session", params=FAMILIES)
def run(request, tiny_tokenizer, tmp_path_factory):
    from train.families import build_family_model
    from train.helpers import write_chat_jsonl

    from openft.config import JobSpec
    from openft.train.recipe import finetune

    tmp = tmp_path_factory.mktemp(f"gguf-{request.param}")
    spec = JobSpec(model=str(build_family_model(tmp / "base", request.param, tiny_tokenizer)))
    spec.data.path = str(write_chat_jsonl(tmp / "train.jsonl", n=8))
    spec.output_dir = str(tmp / "run")
    spec.train.max_steps = 2
    spec.train.learning_rate = 1e-2  # the adapter moves: the merge is visible in the logits
    spec.train.precision = "fp32"
    return finetune(spec, progress=False).run_dir


