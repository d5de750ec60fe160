"""Unit tier: the fault-plan parser, ENOSPC injection into a checkpoint save, the
store's migration of an older database, and metrics trimming on resume."""

from __future__ import annotations

import errno
import json
import sqlite3

import pytest
import torch

from openft import faults
from openft.jobs.store import Store
from openft.train import checkpoint

from .test_store import ORIGINAL_SCHEMA


def test_fault_plans_parse_and_bad_ones_name_the_entry():
    plan = faults.parse("checkpoint.write:2, eval:1:hold,register:3:enospc")
    assert plan["checkpoint.write"] == faults.Fault("checkpoint.write", 2, "kill")
    assert plan["eval"].action == "hold" and plan["register"].at == 3
    assert faults.parse("") == {}
    for bad, named in (
        ("nowhere:1", "nowhere:1"),
        ("step:0", "step:0"),
        ("step", "step"),
        ("step:x", "step:x"),
        ("step:1:explode", "explode"),
    ):
        with pytest.raises(ValueError, match=named):
            faults.parse(bad)


def _tiny_training():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return model, opt


def _state(step: int) -> checkpoint.TrainerState:
    return checkpoint.TrainerState(
        step=step,
        epoch=0.0,
        best_valid_loss=None,
        evals_without_improvement=0,
        history=[{"step": s, "train_loss": 1.0 / s} for s in range(1, step + 1)],
        trained_tokens=step,
        elapsed_s=0.0,
    )


def test_a_checkpoint_that_hits_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    model, opt = _tiny_training()
    checkpoint.save(tmp_path, model, opt, _state(1))
    monkeypatch.setenv("OPENFT_FAULTS", "checkpoint.write:1:enospc")
    faults.reset()
    try:
        with pytest.raises(checkpoint.CheckpointWriteError) as e:
            checkpoint.save(tmp_path, model, opt, _state(2))
    finally:
        monkeypatch.delenv("OPENFT_FAULTS")
        faults.reset()
    assert e.value.errno == errno.ENOSPC
    assert "checkpoint at step 2" in str(e.value) and "No space left on device" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert checkpoint.latest(tmp_path).name == "step-000001"
    restored, _ = _tiny_training()
    assert checkpoint.load(checkpoint.latest(tmp_path), restored, torch.optim.AdamW(restored.parameters())).step == 1
    assert torch.equal(restored.weight, model.weight)


def test_safetensors_io_errors_map_to_their_errno():
    assert (
        checkpoint.os_errno(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
        == errno.ENOSPC
    )
    assert checkpoint.os_errno(OSError(errno.EIO, "io")) == errno.EIO
    assert checkpoint.os_errno(ValueError("shape mismatch")) is None


def test_prune_and_resave_leave_only_complete_checkpoints(tmp_path):
    model, opt = _tiny_training()
    for step in (1, 2, 3, 3, 4):  # step 3 saved twice: replaced, never missing
        checkpoint.save(tmp_path, model, opt, _state(step))
    assert checkpoint.prune(tmp_path, 2) == [1, 2]
    (tmp_path / "checkpoints" / ".del-step-000009").mkdir()  # what a crash mid-prune leaves
    (tmp_path / "checkpoints" / ".tmp-step-000009").mkdir()  # ... and mid-save
    checkpoint.clean_leftovers(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


def test_prune_keeps_the_best_checkpoint_beside_the_latest(tmp_path):
    model, opt = _tiny_training()
    for step in (1, 2, 3, 4, 5):
        checkpoint.save(tmp_path, model, opt, _state(step))
    assert checkpoint.prune(tmp_path, 2, keep_steps={2, None}) == [1, 3]  # None: nothing scored yet
    assert [checkpoint.step_of(p) for p in checkpoint.complete(tmp_path)] == [2, 4, 5]
    assert checkpoint.prune(tmp_path, 1) == [2, 4]  # the best is no longer asked for: it goes


def test_resume_trims_metrics_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))  # an attempt got to step 7
    checkpoint.trim_metrics(path, _state(5))  # ... and is resumed from step 5
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_an_older_database_gains_the_stalls_column(tmp_path):
    db = tmp_path / "openft.db"
    assert "stalls" not in ORIGINAL_SCHEMA
    with sqlite3.connect(db) as conn:
        conn.executescript(ORIGINAL_SCHEMA)
        conn.execute(
            "INSERT INTO jobs (id, owner, model, status, created_at, training_file, spec, hyperparameters, "
            "method, seed) VALUES ('ftjob-1', 'o', 'm', 'queued', 1, 'f', '{}', '{}', 'supervised', 0)"
        )
    store = Store(db)
    job = store.claim_next_job("wrk-test", 123)
    assert job["id"] == "ftjob-1" and job["stalls"] == 1 and job["attempts"] == 1
    assert store.add_checkpoint("ftjob-1", 3, {}, "m:ckpt-step-3", "/x", event={"message": "Checkpoint created"})
    assert not store.add_checkpoint("ftjob-1", 3, {}, "m:ckpt-step-3", "/x", event={"message": "Checkpoint created"})
    assert store.get_job(None, "ftjob-1")["stalls"] == 0  # a new checkpoint is progress
    assert [e["message"] for e in store.list_events("ftjob-1")] == ["Checkpoint created"]  # once
    assert Store(db).applied_migrations == []  # opening it again changes nothing
