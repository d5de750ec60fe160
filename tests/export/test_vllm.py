"""The vLLM export: an adapter checked against vLLM's LoRA rules (each rule on an
adapter that breaks it), and a real run's adapter exported with the line that
serves it, or refused with its reasons and merged on request."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from openft.export.vllm import MAX_LORA_RANKS, check_adapter, export_vllm

CONFIG = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def adapter(tmp_path, name="a", r=16, cfg=None, tensors=None):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({**CONFIG, "r": r, **(cfg or {})}))
    if tensors is None:
        p = "base_model.model.model.layers.0.self_attn"
        tensors = {
            f"{p}.q_proj.lora_A.weight": torch.zeros(r, 64),
            f"{p}.q_proj.lora_B.weight": torch.zeros(64, r),
            f"{p}.v_proj.lora_A.weight": torch.zeros(r, 64),
            f"{p}.v_proj.lora_B.weight": torch.zeros(32, r),
        }
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def test_a_plain_adapter_passes_with_the_smallest_rank_that_fits(tmp_path):
    c = check_adapter(adapter(tmp_path))
    assert c.ok and c.rank == 16 and c.max_lora_rank == 16 and c.modules == ["q_proj", "v_proj"]
    odd = check_adapter(adapter(tmp_path, "odd", r=12))
    assert odd.ok and odd.max_lora_rank == 16  # any r up to the server's --max-lora-rank
    assert check_adapter(adapter(tmp_path, "big", r=300)).max_lora_rank == 320
    assert MAX_LORA_RANKS[-1] == 512


@pytest.mark.parametrize(
    "cfg, why",
    [
        ({"use_dora": True}, "does not support DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "bias is 'lora_only'"),
        ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head' is not a decoder linear"),
        ({"peft_type": "IA3"}, "LoRA adapters only"),
    ],
)
def test_each_rule_vllm_has_refuses_its_adapter(tmp_path, cfg, why):
    c = check_adapter(adapter(tmp_path, cfg=cfg))
    assert not c.ok and any(why in p for p in c.problems), c.problems


def test_a_rank_past_vllms_largest_is_refused(tmp_path):
    c = check_adapter(adapter(tmp_path, r=1024))
    assert c.max_lora_rank is None and any("up to 512" in p for p in c.problems)


def test_tensors_are_checked_by_name_module_and_shape(tmp_path):
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64),  # rank 8, not 16
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 16),
        "base_model.model.lm_head.lora_A.weight": torch.zeros(16, 64),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4),
    }
    problems = check_adapter(adapter(tmp_path, tensors=tensors)).problems
    assert any("q_proj.lora_A.weight' has shape [8, 64]" in p for p in problems), problems
    assert any("adapts lm_head" in p for p in problems), problems
    assert any("'model.layers.0.mlp.up_proj.weight' is not named" in p for p in problems), problems
    assert len(problems) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no adapter_config.json or adapter_model.safetensors" in check_adapter(empty).problems[0]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    from train.helpers import write_chat_jsonl

    from openft.config import JobSpec
    from openft.train.recipe import finetune

    tmp = tmp_path_factory.mktemp("vllm-run")
    spec = JobSpec(model=str(tiny_model_dir), output_dir=str(tmp / "run"))
    spec.data.path = str(write_chat_jsonl(tmp / "train.jsonl", n=8))
    spec.train.max_steps = 1
    return finetune(spec, progress=False).run_dir


@pytest.mark.integration
def test_a_runs_adapter_exports_with_its_serve_line(run, tiny_model_dir, tmp_path):
    done = export_vllm(run, tmp_path / "out", name="pip")
    assert not done.merged and done.check.ok
    assert sorted(p.name for p in done.out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "vllm-serve.sh",
    ]
    argv = shlex.split(done.command)
    assert argv[:3] == ["vllm", "serve", str(tiny_model_dir)] and "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == str(done.check.max_lora_rank)
    assert argv[argv.index("--lora-modules") + 1] == f"pip={(tmp_path / 'out').resolve()}"
    assert done.command in (done.out / "vllm-serve.sh").read_text()


@pytest.mark.integration
def test_a_refused_adapter_is_merged_on_request_from_the_command_line(run, tmp_path):
    cfg_path = run / "adapter" / "adapter_config.json"
    original = cfg_path.read_text()
    cfg_path.write_text(json.dumps({**json.loads(original), "use_dora": True}))
    try:
        cli = [sys.executable, "-m", "openft.cli", "export", str(run), "--format", "vllm"]
        refused = subprocess.run([*cli, "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
        assert (
            refused.returncode == 1 and "vLLM does not support DoRA" in refused.stderr and "--merge" in refused.stderr
        )
        assert not (tmp_path / "x").exists()  # nothing half-written
        merged = subprocess.run(
            [*cli, "--out", str(tmp_path / "m"), "--merge"], capture_output=True, text=True, timeout=300
        )
        assert merged.returncode == 0, merged.stderr
        assert (tmp_path / "m" / "config.json").exists() and "vllm serve" in merged.stdout
        assert "--enable-lora" not in (tmp_path / "m" / "vllm-serve.sh").read_text()
    finally:
        cfg_path.write_text(original)
