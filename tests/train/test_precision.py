"""bf16 mixed precision: what auto picks, that the loss and gradients stay those
of fp32 within bf16's rounding, and that a run leaves the model as loaded."""

from __future__ import annotations

import json

import pytest
import torch

from openft.autoprecision import decide, resolve_precision
from openft.mapped import FileMaps
from openft.models.load import load_model
from openft.train.lora import LoraParams, apply_lora, lora_layers
from openft.train.loss import causal_lm_loss
from openft.train.precision import Precision, weights_on_disk
from openft.train.recipe import finetune

from .helpers import write_chat_jsonl
from .test_recipe import _spec


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == decide("auto", cpu).precision  # measured (tests/test_autoprecision.py)
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision("fp16", cpu)


def _lora_model(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    apply_lora(
        loaded.model,
        LoraParams(8, 16.0, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    )
    torch.manual_seed(0)
    for layer in lora_layers(loaded.model).values():  # B = 0 at start would make every A gradient 0
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return loaded


def _loss_and_grads(model, ids, labels, precision: Precision) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with precision.autocast():
        out = causal_lm_loss(model, ids, torch.ones_like(ids), labels)
    (out.loss_sum / out.n_tokens).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return float(out.loss_sum.detach()) / out.n_tokens, grads


def test_bf16_loss_and_gradients_match_fp32(tiny_model_dir):
    loaded = _lora_model(tiny_model_dir)
    model = loaded.model
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    labels = ids.clone()
    labels[:, :15] = -100
    loss32, g32 = _loss_and_grads(model, ids, labels, Precision("fp32", "cpu"))

    bf16 = Precision("bf16", "cpu")
    converted = bf16.prepare(model)
    # The frozen base went to bf16; the adapter (what trains) stayed fp32.
    assert converted and all(n.endswith((".base.weight", "norm.weight", "embed_tokens.weight")) for n in converted)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    loss16, g16 = _loss_and_grads(model, ids, labels, bf16)
    assert g16.dtype == torch.float32
    assert abs(loss16 - loss32) / loss32 < 0.01
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.99
    assert float((g16 - g32).norm() / g32.norm()) < 0.1

    bf16.restore(model, converted, weights_on_disk(loaded.path))
    fresh = dict(load_model(str(tiny_model_dir)).model.named_parameters())
    maps = FileMaps()
    for name, p in model.named_parameters():
        if not p.requires_grad:  # bit for bit the weights on disk again
            assert p.dtype == torch.float32 and torch.equal(p, fresh[name.replace(".base.", ".")]), name
    # ... and, as when loaded, views of the file's pages rather than a second fp32 copy
    assert all(maps.covers(p) for p in model.parameters() if not p.requires_grad and p.dim() > 0)


def test_bf16_run_trains_and_leaves_the_model_as_loaded(tiny_model_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=24)
    loaded = load_model(str(tiny_model_dir))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    result = finetune(
        _spec(tiny_model_dir, data, tmp_path / "run", epochs=4, precision="bf16"), progress=False, loaded=loaded
    )
    losses = [r["train_loss"] for r in result.history]
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0]
    assert json.loads((result.run_dir / "config.json").read_text())["train"]["precision"] == "bf16"
    for name, p in loaded.model.named_parameters():
        if name.endswith(".base.weight") or name in before:
            key = name.replace(".base.", ".")
            assert p.dtype == torch.float32 and torch.equal(p, before[key]), name


def test_the_started_event_says_which_precision_auto_chose_and_why(tiny_model_dir, tmp_path, monkeypatch):
    """OPENFT_PRECISION forces `auto`'s path without measuring; the run follows it and
    its started event (the job's 'Fine-tuning started' line) carries the decision."""
    monkeypatch.setenv("OPENFT_PRECISION", "bf16")
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)
    events = []
    result = finetune(
        _spec(tiny_model_dir, data, tmp_path / "run", epochs=1, max_steps=1),
        progress=False,
        on_event=lambda kind, d: events.append((kind, d)),
    )
    started = next(d for kind, d in events if kind == "started")
    assert started["precision"]["precision"] == "bf16" and started["precision"]["forced_by"] == "OPENFT_PRECISION"
    assert started["precision"]["text"] == "precision bf16 (forced by OPENFT_PRECISION)"
    assert result.config["train"]["precision"] == "bf16"
