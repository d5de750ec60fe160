"""LoRA on every family: the default targets wrap each decoder layer's seven
projections (never the embedding, the head or a norm), a short real fine-tune moves
the adapter and lowers the loss, and both exports load back in plain transformers
(merged) and PEFT (adapter) with the in-process model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from openft.config import JobSpec
from openft.models.load import load_model
from openft.train.export import export, load_run
from openft.train.lora import PROJECTIONS, LoraParams, apply_lora, default_targets
from openft.train.recipe import finetune

from .families import FAMILIES, build_family_model
from .helpers import write_chat_jsonl


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tiny_tokenizer, tmp_path_factory):
    return request.param, build_family_model(tmp_path_factory.mktemp(request.param), request.param, tiny_tokenizer)


@pytest.fixture(scope="module")
def trained(family_dir, tmp_path_factory):
    family, path = family_dir
    tmp = tmp_path_factory.mktemp(f"run-{family}")
    spec = JobSpec(model=str(path))
    spec.data.path = str(write_chat_jsonl(tmp / "train.jsonl", n=16))
    spec.output_dir = str(tmp / "run")
    spec.train.learning_rate = 1e-2
    spec.train.epochs = 3
    spec.train.batch_size = 4
    spec.train.precision = "fp32"
    spec.train.eval_every = spec.train.save_every = 1000  # no mid-run checkpoints: the final adapter is what counts
    return finetune(spec, progress=False)


def test_default_targets_are_the_projections_of_every_layer(family_dir):
    family, path = family_dir
    model = load_model(str(path)).model
    assert model.config.model_type == family
    targets = default_targets(model)
    assert sorted(targets) == sorted(PROJECTIONS)
    wrapped = apply_lora(model, LoraParams(rank=4, alpha=8.0, dropout=0.0, target_modules=tuple(targets)))
    n_layers = model.config.num_hidden_layers
    expected = {
        f"model.layers.{i}.{block}.{name}"
        for i in range(n_layers)
        for block, names in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:]))
        for name in names
    }
    assert set(wrapped) == expected
    assert not any(w.endswith(("embed_tokens", "lm_head")) or "norm" in w for w in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_training_moves_the_adapter_and_lowers_the_loss(trained):
    adapter = load_file(str(trained.output_dir / "adapter_model.safetensors"))
    b = [v for k, v in adapter.items() if k.endswith("lora_B.weight")]
    assert b and all(float(v.abs().sum()) > 0 for v in b)  # B starts at exactly zero
    losses = [r["train_loss"] for r in trained.history]
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], losses


def test_adapter_keys_name_transformers_modules(family_dir, trained):
    """Every saved key is base_model.model.<a Linear of the plain transformers model>:
    what PEFT and the serving decoder (which keeps transformers' module names) look up."""
    from transformers import AutoModelForCausalLM

    _, path = family_dir
    plain = dict(AutoModelForCausalLM.from_pretrained(path).named_modules())
    keys = load_file(str(trained.output_dir / "adapter_model.safetensors")).keys()
    for key in keys:
        assert key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        assert isinstance(plain.get(module), nn.Linear), key


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_exports_load_back_with_identical_outputs(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = trained.run_dir
    ids = torch.tensor([[1, 17, 230, 4000, 12, 9, 77, 501, 33, 2]])
    expected = _logits(load_run(run).model, ids)  # base + adapter, as trained (not merged)

    merged_dir = export(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)

    adapter_dir = export(run, tmp_path / "adapter", adapter_only=True)
    base = AutoModelForCausalLM.from_pretrained(_base_path(run)).eval()
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=1e-4, atol=1e-4)
    with peft_model.disable_adapter():  # the adapter is what makes them equal
        assert not torch.allclose(_logits(peft_model, ids), expected, atol=1e-4)


def _base_path(run) -> str:
    return json.loads((run / "lineage.json").read_text())["base_model_path"]
