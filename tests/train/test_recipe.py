"""Whole fine-tuning runs on the tiny model: weights change, loss falls, resume is
exact, export reloads with identical outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from openft.config import JobSpec
from openft.models.load import load_model
from openft.train import checkpoint
from openft.train.export import export, load_run
from openft.train.prepare import DataError
from openft.train.recipe import finetune

from .helpers import write_chat_jsonl


def _spec(tiny_model_dir, data, out, **train):
    spec = JobSpec(model=str(tiny_model_dir))
    spec.data.path = str(data)
    spec.output_dir = str(out)
    spec.train.learning_rate = 1e-2
    spec.train.epochs = 3
    spec.train.batch_size = 4
    for k, v in train.items():
        setattr(spec.train, k, v)
    return spec


def test_lora_changes_adapter_weights_and_lowers_loss(tiny_model_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=24)
    result = finetune(_spec(tiny_model_dir, data, tmp_path / "run", epochs=4), progress=False)
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    b_weights = [v for k, v in adapter.items() if k.endswith("lora_B.weight")]
    assert b_weights and all(float(v.abs().sum()) > 0 for v in b_weights)  # B starts at exactly zero
    losses = [r["train_loss"] for r in result.history]
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0]
    assert result.signals["weights_changed"] and result.signals["fully_masked_examples"] == 0
    valid = [r["valid_loss"] for r in result.history if "valid_loss" in r]
    assert valid and valid[-1] < valid[0]
    # The run folder holds what a user needs: adapter, tokenizer + template, metrics, lineage.
    for name in (
        "adapter/adapter_config.json",
        "adapter/tokenizer.json",
        "adapter/chat_template.jinja",
        "metrics.jsonl",
        "lineage.json",
        "config.json",
    ):
        assert (result.run_dir / name).exists(), name
    lineage = json.loads((result.run_dir / "lineage.json").read_text())
    assert len(lineage["base_model_sha256"]) == 64 and len(lineage["dataset_sha256"]) == 64
    assert lineage["split_seed"] == 0 and lineage["valid_examples"] >= 1


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=20)
    full = finetune(_spec(tiny_model_dir, data, tmp_path / "full", save_every=2), progress=False)

    # Crash right after the checkpoint at step 4, then resume the same run folder.
    class Crash(Exception):
        pass

    def crash_after_step_4(kind, data):
        if kind == "checkpoint" and data["step"] == 4:
            raise Crash

    part_dir = tmp_path / "part"
    with pytest.raises(Crash):
        finetune(_spec(tiny_model_dir, data, part_dir, save_every=2), progress=False, on_event=crash_after_step_4)
    # Simulate a crash mid-save: a half-written checkpoint must be ignored on resume.
    (part_dir / "checkpoints" / ".tmp-step-000006").mkdir()
    assert checkpoint.latest(part_dir).name == "step-000004"
    resumed = finetune(_spec(tiny_model_dir, data, part_dir, save_every=2), resume=True, progress=False)

    assert resumed.history[-1]["step"] == full.history[-1]["step"]
    a = load_file(str(full.output_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.output_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_existing_run_is_not_overwritten_without_resume(tiny_model_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=12)
    finetune(_spec(tiny_model_dir, data, tmp_path / "run", max_steps=1), progress=False)
    with pytest.raises(FileExistsError):
        finetune(_spec(tiny_model_dir, data, tmp_path / "run", max_steps=1), progress=False)


def test_bad_training_file_is_refused_with_its_line(tiny_model_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=12)
    lines = data.read_text().splitlines()
    lines[4] = '{"messages": [{"role": "user", "content": "hi"'
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        finetune(_spec(tiny_model_dir, data, tmp_path / "run"), progress=False)
    assert ":5" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_export_merged_and_adapter_reload_with_identical_outputs(tiny_model_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=16)
    result = finetune(_spec(tiny_model_dir, data, tmp_path / "run", max_steps=4), progress=False)
    ids = torch.tensor([[1, 520, 9531, 198, 28120, 216]])
    with torch.no_grad():
        expected = load_run(result.run_dir).model(ids).logits
        merged_dir = export(result.run_dir, tmp_path / "merged")
        merged = load_model(str(merged_dir)).model(ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    adapter_dir = export(result.run_dir, tmp_path / "adapter-only", adapter_only=True)
    assert (adapter_dir / "adapter_model.safetensors").exists()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16


def test_full_fine_tuning_changes_base_weights(tiny_model_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=12)
    spec = _spec(tiny_model_dir, data, tmp_path / "run", max_steps=3, learning_rate=1e-3)
    spec.train.method = "full"
    result = finetune(spec, progress=False)
    assert (result.output_dir / "model.safetensors").exists()
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(result.output_dir / "model.safetensors"))
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    # The weight-delta signal is read back from the copy spilled to disk, which leaves nothing behind.
    expected = sum(float((after[k] - before[k]).pow(2).sum()) for k in before if k in after) ** 0.5
    assert result.signals["weights_changed"]
    assert abs(result.signals["weight_delta_norm"] - expected) <= 1e-4 * expected
    assert {p.name for p in result.run_dir.iterdir()} == {
        "config.json",
        "lineage.json",
        "metrics.jsonl",
        "checkpoints",
        "model",
        "summary.json",
    }


def test_early_stopping_stops_when_validation_stops_improving(tiny_model_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=24)
    # A zero learning rate: validation loss cannot improve after the first check.
    spec = _spec(tiny_model_dir, data, tmp_path / "run", learning_rate=0.0, eval_every=1, early_stopping_patience=2)
    result = finetune(spec, progress=False)
    assert result.stopped_early
    assert result.history[-1]["step"] == 3  # best at step 1, no improvement at 2 and 3
    assert checkpoint.latest(result.run_dir).name == "step-000003"


def test_spilled_weight_copy_reads_back_across_chunk_boundaries(tmp_path, monkeypatch):
    from openft.train import recipe

    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(5, 3)),
        torch.nn.Parameter(torch.randn(11)),
        torch.nn.Parameter(torch.randn(2)),
    ]
    monkeypatch.setattr(recipe, "SPILL_CHUNK", 4)  # every weight spans several reads, none ends on a boundary
    spilled = recipe.snapshot_weights(params, tmp_path, spill=True)
    kept = recipe.snapshot_weights(params, tmp_path, spill=False)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    expected = recipe.weight_delta_norm(params, kept)
    assert expected > 0
    assert abs(recipe.weight_delta_norm(params, spilled) - expected) <= 1e-6 * expected
    assert spilled.closed and list(tmp_path.iterdir()) == []  # unnamed: nothing left behind
