"""The disk fills up while a checkpoint is written: the job fails with an error
that names the cause, the earlier checkpoints stay complete and servable, and the
store stays consistent. Run on a real size-limited data folder (a tmpfs mount,
where this machine lets us mount one) and with writes that fail with ENOSPC
injected at the same moment (everywhere)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from serve.conftest import TINY, Server, jsonl

from .campaign import TRAIN_ROWS, Worker, rows, wait_for

pytestmark = pytest.mark.integration


def _fill(disk: Path) -> Path:
    """Write a ballast file until the disk is full."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                pass
    return ballast


@pytest.fixture
def tmpfs_home(tmp_path, session_home):
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({r.stderr.strip()}); the injected-ENOSPC test covers it")
    (disk / "models").symlink_to(Path(session_home) / "models", target_is_directory=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _run_until_disk_full(
    srv: Server, zygote, model: str, plan: str, faults_dir: Path, *, disk: Path | None, worker_log: Path
) -> tuple[str, dict]:
    c = srv.client()
    f = c.files.create(file=("train.jsonl", jsonl(rows(TRAIN_ROWS))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model=model, training_file=f.id, seed=3, hyperparameters={"n_epochs": 1, "batch_size": 1}
    )
    w = Worker(zygote, srv.home, plan, faults_dir, log=worker_log).start()
    try:
        if disk is not None:
            # Held inside the third checkpoint save (step 9), some of its files written.
            wait_for(lambda: (faults_dir / "checkpoint.write.held").exists(), timeout=300, every=0.05)
            _fill(disk)
            (faults_dir / "checkpoint.write.go").write_text("")
        done = wait_for(
            lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
            timeout=300,
        )
        assert w.poll() is None, worker_log.read_text()[-3000:]  # the worker survives a full disk
    finally:
        w.stop()
    return job.id, done


def _check(srv: Server, job_id: str, done) -> None:
    c = srv.client()
    assert done.status == "failed", done
    err = done.error
    assert err.code == "disk_full", err
    assert "No space left on device" in err.message and "checkpoint at step 9" in err.message, err.message
    assert "checkpoints at steps 3, 6 are kept" in err.message, err.message
    events = list(reversed(c.fine_tuning.jobs.list_events(job_id, limit=1000).data))
    assert events[-1].level == "error" and events[-1].message == f"Job failed: {err.message}"
    assert max(e.data["step"] for e in events if e.type == "metrics") == 9
    # The earlier checkpoints are complete on disk, registered, and servable.
    ckpts = c.fine_tuning.jobs.checkpoints.list(job_id).data
    assert sorted(ck.step_number for ck in ckpts) == [3, 6]
    run = Path(srv.home) / "runs" / job_id / "checkpoints"
    assert sorted(p.name for p in run.iterdir()) == ["step-000003", "step-000006"]  # no half-written folder
    for p in run.iterdir():
        assert {
            "trainable.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
            "adapter_model.safetensors",
        } <= {x.name for x in p.iterdir()}
        assert json.loads((p / "trainer_state.json").read_text())["step"] == int(p.name.split("-")[1])
    latest = max(ckpts, key=lambda ck: ck.step_number)
    reply = c.chat.completions.create(
        model=latest.fine_tuned_model_checkpoint,
        max_tokens=5,
        temperature=0,
        messages=[{"role": "user", "content": "Who are you?"}],
    )
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1
    with sqlite3.connect(f"file:{Path(srv.home) / 'openft.db'}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {r[0] for r in db.execute("SELECT path FROM checkpoints WHERE job_id = ?", (job_id,))}
    assert stored == {str(p) for p in run.iterdir()}


def test_disk_full_on_a_size_limited_data_folder(tmpfs_home, tmp_path, zygote, tiny_model_dir):
    faults_dir = tmp_path / "faults"
    faults_dir.mkdir()
    srv = Server(tmpfs_home, "--no-worker", models={TINY: tiny_model_dir})
    srv.log = open(tmp_path / "server.log", "ab")  # the server's own log is not on the disk that fills up
    srv.start()
    try:
        job_id, done = _run_until_disk_full(
            srv,
            zygote,
            TINY,
            "checkpoint.write:3:hold",
            faults_dir,
            disk=tmpfs_home,
            worker_log=tmpfs_home / "workers.log",
        )
        _check(srv, job_id, done)  # all of it with the disk still full
        (tmpfs_home / "ballast").unlink()
        f = srv.client().files.create(file=("more.jsonl", jsonl(rows(3))), purpose="fine-tune")
        assert f.status == "processed"  # space back: the store takes writes again
    finally:
        srv.stop()


def test_disk_full_injected_enospc(bare_server, tmp_path, zygote, tiny_model_dir):
    job_id, done = _run_until_disk_full(
        bare_server,
        zygote,
        TINY,
        "checkpoint.write:3:enospc",
        tmp_path,
        disk=None,
        worker_log=tmp_path / "worker.log",
    )
    _check(bare_server, job_id, done)
