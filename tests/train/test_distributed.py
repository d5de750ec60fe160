"""Training on several ranks through real torchrun (gloo on the CPU), the tiny model:
2 ranks end where 1 rank ends (LoRA on DDP, full fine-tuning on FSDP2), a run
resumes on a different number of ranks than the one that wrote its checkpoint, a
rank killed mid-step or mid-checkpoint is restarted and the run still ends on the
same weights, and a rank that stops answering becomes an error naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openft.config import JobSpec
from openft.train.distributed import Launch, LaunchError
from openft.train.launch import run_ranks, torchrun_command

from .helpers import write_chat_jsonl

pytestmark = pytest.mark.integration

# As a fraction of the training update (`update_diff`). Ranks sum gradients in
# another order than one rank does, and AdamW divides by the root of tiny second
# moments, which turns those rounding differences into visible ones on weights that
# barely train; another seed moves the weights by a large part of the update.
TOL = 0.02
FLAGS = ["--epochs", "2", "--batch-size", "4", "--save-every", "2", "--lora-dropout", "0", "--learning-rate", "1e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_chat_jsonl(tmp_path_factory.mktemp("dist-data") / "train.jsonl", n=20)


def finetune(model: Path, data: Path, out: Path, *flags: str, ranks: int = 1, env: dict | None = None):
    env = {"OPENFT_FAULTS_DIR": str(out.parent), **(env or {})}  # an injected kill's record stays out of the tree
    argv = [sys.executable, "-m", "openft.cli", "finetune", "--model", str(model), "--data", str(data)]
    argv += ["--output", str(out), "--nproc-per-node", str(ranks), *FLAGS, *flags]
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def weights(run: Path) -> dict[str, torch.Tensor]:
    files = sorted((run / "adapter").glob("*.safetensors")) or sorted((run / "model").glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def apart(method: str, ref_run: Path, run: Path, tiny_model_dir: Path) -> float:
    ref = weights(ref_run)
    return update_diff(ref, weights(run), base_of(method, ref, tiny_model_dir))


def update_diff(ref: dict, other: dict, base: dict) -> float:
    """||other - ref|| / ||ref - base||: how far apart two runs end, as a fraction
    of how far training moved the weights (LoRA's base is zero for B, its init for A)."""
    assert set(ref) == set(other)
    num = sum(float((other[k].float() - ref[k].float()).pow(2).sum()) for k in ref)
    den = sum(float((ref[k].float() - base.get(k, torch.zeros_like(ref[k])).float()).pow(2).sum()) for k in ref)
    return (num / den) ** 0.5


def base_of(method: str, ref: dict, tiny_model_dir: Path) -> dict:
    """What training started from: the tiny model's weights (full), zero B and the
    seeded A (LoRA: A moves little, so it is compared against its own size)."""
    if method == "full":
        return load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    return {k: torch.zeros_like(v) for k, v in ref.items()}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted one-rank runs, LoRA and full, for the others to equal."""
    root = tmp_path_factory.mktemp("dist-ref")
    runs = {}
    for method in ("lora", "full"):
        runs[method] = root / method
        ok(finetune(tiny_model_dir, data, runs[method], "--method", method))
    return runs


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_ranks_end_with_the_weights_of_one(method, reference, tiny_model_dir, data, tmp_path):
    run = tmp_path / "two"
    ok(finetune(tiny_model_dir, data, run, "--method", method, ranks=2))
    assert apart(method, reference[method], run, tiny_model_dir) <= TOL
    # Another seed (data order; LoRA's init) is far outside that tolerance: the check can fail.
    other = tmp_path / "seed"
    ok(finetune(tiny_model_dir, data, other, "--method", method, "--seed", "7", ranks=2))
    assert apart(method, reference[method], other, tiny_model_dir) > 5 * TOL
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and json.loads((run / "lineage.json").read_text())["world_size"] == 2
    ref_rows = [json.loads(x) for x in (reference[method] / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # written once, by rank 0
    assert all(abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * a["train_loss"] for a, b in zip(ref_rows, rows))
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref_rows]  # every rank's share counted
    if method == "full":  # sharded checkpoints (DCP); the saved model leaves the tied head out as one rank does
        assert (run / "checkpoints" / "step-000010" / "dcp").is_dir()
        assert set(weights(run)) == set(weights(reference[method]))
    assert sorted(p.name for p in (run / "logs").iterdir())  # the ranks' own output is in the run folder


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_embedding_and_head_split_by_rows_end_and_resume_as_one_rank(family, tiny_tokenizer, data, tmp_path):
    """The embedding and head split by vocabulary rows across the ranks
    (`openft.train.vocab_parallel`, not FSDP2 groups): Mistral's untied head
    (Qwen 0.5B as converted) and Gemma's scaled embedding tied to its head. 2
    ranks end where 1 rank does, also resumed across world sizes (a DCP
    checkpoint of the split tables on one rank, a one-rank checkpoint split onto
    two)."""
    from .families import build_family_model

    base = build_family_model(tmp_path / "base", family, tiny_tokenizer)
    one, two = tmp_path / "one", tmp_path / "two"
    ok(finetune(base, data, one, "--method", "full"))
    ok(finetune(base, data, two, "--method", "full", ranks=2))
    start = load_file(str(next(base.glob("*.safetensors"))))
    # Untied: saved apart from the embedding; tied: left out, as one rank saves it.
    assert ("lm_head.weight" in weights(two)) == (family == "mistral")
    assert set(weights(two)) == set(weights(one))
    assert update_diff(weights(one), weights(two), start) <= TOL
    for run in resumed_across_world_sizes(base, data, tmp_path):
        assert update_diff(weights(one), weights(run), start) <= TOL


def test_full_resumes_on_two_ranks_from_one_and_on_one_from_two(reference, tiny_model_dir, data, tmp_path):
    for run in resumed_across_world_sizes(tiny_model_dir, data, tmp_path):
        assert apart("full", reference["full"], run, tiny_model_dir) <= TOL


def resumed_across_world_sizes(model: Path, data: Path, tmp_path: Path) -> list[Path]:
    """A full fine-tune killed in step 5 (checkpoints at 2 and 4) and resumed on the
    other world size, both ways; returns the two finished runs."""
    # One rank, killed, resumed on two ranks.
    a = tmp_path / "one-then-two"
    died = finetune(model, data, a, "--method", "full", env={"OPENFT_FAULTS": "step:5"})
    assert died.returncode != 0 and not (a / "model").exists()
    ok(finetune(model, data, a, "--method", "full", "--resume", ranks=2))
    # Two ranks, rank 1 killed with no restarts: the run fails naming it; one rank resumes it.
    b = tmp_path / "two-then-one"
    kill = {"OPENFT_FAULTS": "step:5", "OPENFT_FAULTS_RANK": "1"}
    died = finetune(model, data, b, "--method", "full", "--max-restarts", "0", ranks=2, env=kill)
    assert died.returncode == 1 and "rank 1" in died.stderr and "SIGKILL" in died.stderr, died.stderr[-2000:]
    assert (b / "checkpoints" / "step-000004" / "dcp").is_dir()
    ok(finetune(model, data, b, "--method", "full", "--resume"))
    return [a, b]


def test_lora_resumes_on_two_ranks_from_one(reference, tiny_model_dir, data, tmp_path):
    run = tmp_path / "lora"
    died = finetune(tiny_model_dir, data, run, env={"OPENFT_FAULTS": "step:5"})
    assert died.returncode != 0
    ok(finetune(tiny_model_dir, data, run, "--resume", ranks=2))
    assert apart("lora", reference["lora"], run, tiny_model_dir) <= TOL


@pytest.mark.parametrize(
    ("method", "point"), [("lora", "step:5"), ("full", "checkpoint.write:3")], ids=["mid-step", "mid-checkpoint"]
)
def test_a_killed_rank_is_restarted_and_the_run_ends_on_the_same_weights(
    method, point, reference, tiny_model_dir, data, tmp_path
):
    run = tmp_path / "killed"
    ok(
        finetune(
            tiny_model_dir,
            data,
            run,
            "--method",
            method,
            ranks=2,
            env={"OPENFT_FAULTS": point, "OPENFT_FAULTS_RANK": "1"},
        )
    )
    assert apart(method, reference[method], run, tiny_model_dir) <= TOL
    attempts = list((run / "logs").glob("*/attempt_*"))
    assert len(attempts) == 2  # torchrun restarted the group once
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written checkpoint left nothing behind
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # each step reported once, also those trained again


def test_a_rank_that_stops_answering_is_an_error_naming_it(tiny_model_dir, data, tmp_path):
    faults = tmp_path / "faults"
    faults.mkdir()
    env = {
        "OPENFT_FAULTS": "step:2:hold",  # rank 1 waits at step 2 for a go that never comes
        "OPENFT_FAULTS_RANK": "1",
        "OPENFT_FAULTS_DIR": str(faults),
        "OPENFT_COLLECTIVE_TIMEOUT_S": "10",
    }
    proc = finetune(tiny_model_dir, data, tmp_path / "hung", "--max-restarts", "0", ranks=2, env=env)
    assert proc.returncode == 1 and (faults / "step.held").exists()
    assert "rank 1 stopped answering" in proc.stderr and "rank 0" in proc.stderr, proc.stderr[-2000:]


def test_launch_requests_are_checked_before_anything_starts(tiny_model_dir, data, tmp_path):
    with pytest.raises(LaunchError, match="rdzv-endpoint"):
        Launch(nproc_per_node=1, nnodes=2)
    with pytest.raises(LaunchError, match="node_rank"):
        Launch(nnodes=2, node_rank=2, rdzv_endpoint="10.0.0.1:29500")
    with pytest.raises(LaunchError, match="nproc_per_node"):
        Launch(nproc_per_node=0)
    spec = JobSpec(model=str(tiny_model_dir))
    spec.data.path = str(data)
    with pytest.raises(ValueError, match="--output"):
        run_ranks(spec, Launch(nnodes=2, rdzv_endpoint="10.0.0.1:29500"), progress=False)
    spec.train.objective, spec.output_dir = "dpo", str(tmp_path / "dpo")
    with pytest.raises(LaunchError, match="DPO trains on one rank"):
        run_ranks(spec, Launch(nproc_per_node=2), progress=False)
    assert not (tmp_path / "dpo").exists()
    cmd = torchrun_command(Launch(nnodes=2, node_rank=1, rdzv_endpoint="h:1"), tmp_path / "s.json", tmp_path, False)
    assert "--rdzv-backend=c10d" in cmd and "--node-rank=1" in cmd and "--rdzv-endpoint=h:1" in cmd
    proc = finetune(tiny_model_dir, data, tmp_path / "bad", "--nnodes", "2")
    assert proc.returncode == 2 and "rdzv-endpoint" in proc.stderr
