"""The worker: claims queued jobs from the store and runs them, one at a time.

It runs as its own process (`openft worker`, or spawned by `openft serve`), so a
training crash never takes the API down. Progress goes into the store as events
and checkpoints; the API never talks to the worker directly. Cancel and pause are
requests written on the job (`control`), polled after every optimizer step.

A job whose worker died (killed, crashed, machine restarted) is found on the next
worker start, or by a live worker's periodic sweep, and put back in the queue; it
then resumes from its last complete checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from openft import home
from openft.config import JobSpec
from openft.jobs.naming import checkpoint_model_name
from openft.jobs.store import TERMINAL, Store
from openft.train.recipe import DataError, Interrupted

MAX_ATTEMPTS = 3
HOST = socket.gethostname()


def store_path() -> Path:
    return home.home() / "openft.db"


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def requeue_orphans(store: Store, *, stale_after_s: float = 600.0) -> list[str]:
    """Put 'running' jobs whose worker is gone back in the queue."""
    requeued = []
    for job in store.jobs_in("running"):
        dead = not _pid_alive(job["worker_pid"]) if job["worker_pid"] != os.getpid() else False
        stale = job["heartbeat_at"] is not None and time.time() - job["heartbeat_at"] > stale_after_s
        if not (dead or stale):
            continue
        if job["attempts"] >= MAX_ATTEMPTS:
            if store.update_job(job["id"], expect_status=("running",), status="failed", finished_at=int(time.time()),
                                error={"code": "worker_lost", "param": None,
                                       "message": f"the worker running this job stopped {job['attempts']} times"}):
                store.add_event(job["id"], "Job failed: its worker stopped too many times", level="error")
            continue
        if store.update_job(job["id"], expect_status=("running",), status="queued", worker_pid=None):
            store.add_event(job["id"], "The worker running this job stopped; the job is queued again and will "
                            "resume from its last checkpoint", level="warn")
            requeued.append(job["id"])
    return requeued


@dataclass
class JobRunner:
    store: Store
    job: dict
    parent_pid: int | None = None

    def spec(self) -> JobSpec:
        spec = JobSpec.from_dict(self.job["spec"])
        spec.data.path = self._file_path(self.job["training_file"])
        if self.job["validation_file"]:
            spec.data.validation_path = self._file_path(self.job["validation_file"])
        extra = self.job["extra"] or {}
        if extra.get("questions_file"):
            spec.eval.questions = self._file_path(extra["questions_file"])
        spec.output_dir = str(self.run_dir)
        return spec

    @property
    def run_dir(self) -> Path:
        return home.runs_dir() / self.job["id"]

    def _file_path(self, file_id: str) -> str:
        f = self.store.get_file(self.job["owner"], file_id)
        if f is None:
            raise DataFileMissing(file_id)
        return f["path"]

    # ---- callbacks from the training loop
    def control(self) -> str | None:
        if self.parent_pid and os.getppid() != self.parent_pid:
            raise SystemExit("the server that started this worker is gone")
        job = self.store.get_job(None, self.job["id"])
        self.store.update_job(self.job["id"], heartbeat_at=time.time())
        if job is None or job["status"] == "cancelled" or job["control"] == "cancel":
            return "cancel"
        if job["control"] == "pause":
            return "pause"
        return None

    def on_event(self, kind: str, data: dict) -> None:
        jid = self.job["id"]
        if kind == "started":
            self.total_steps = data["total_steps"]
            self.store.add_event(jid, f"Fine-tuning started: {data['train_examples']} training and "
                                 f"{data['valid_examples']} validation examples, {data['total_steps']} steps",
                                 data={"total_steps": data["total_steps"], "hyperparameters": data["config"]["train"]})
        elif kind == "resumed":
            self.store.add_event(jid, f"Resumed from the checkpoint at step {data['step']}", data={"step": data["step"]})
        elif kind == "metrics":
            row = {k: v for k, v in data.items()}
            total = getattr(self, "total_steps", None)
            msg = f"Step {row['step']}/{total}: training loss={row['train_loss']:.4f}"
            if "valid_loss" in row:
                msg += f", validation loss={row['valid_loss']:.4f}"
            self.store.add_event(jid, msg, type="metrics", data={**row, "total_steps": total})
            eta = row.get("eta_s")
            self.store.update_job(jid, trained_tokens=row["trained_tokens"],
                                  estimated_finish=int(time.time() + eta) if eta is not None else None)
        elif kind == "checkpoint":
            name = checkpoint_model_name(self.job, data["step"])
            m = data["metrics"]
            metrics = {"step": data["step"], "train_loss": m["train_loss"],
                       "train_mean_token_accuracy": m["train_mean_token_accuracy"],
                       "valid_loss": m.get("valid_loss"), "valid_mean_token_accuracy": m.get("valid_mean_token_accuracy"),
                       "full_valid_loss": None, "full_valid_mean_token_accuracy": None}
            self.store.add_checkpoint(jid, data["step"], metrics, name, data["path"])
            self.store.add_event(jid, f"Checkpoint created at step {data['step']}", type="message",
                                 data={"step": data["step"], "fine_tuned_model_checkpoint": name})
        elif kind == "checkpoints_deleted":
            for step in data["steps"]:
                self.store.delete_checkpoint(jid, step)
        elif kind == "early_stopped":
            self.store.add_event(jid, f"Early stopping at step {data['step']}: validation loss stopped improving "
                                 f"(best {data['best_valid_loss']:.4f})", data=data)

    def run(self) -> None:
        from openft.pipeline import finetune_with_comparison
        from openft.jobs.naming import fine_tuned_model_name

        jid = self.job["id"]
        spec = self.spec()
        spec.model = merged_base(spec.model)
        resume = self.run_dir.exists()
        outcome = finetune_with_comparison(spec, resume=resume, on_event=self.on_event, progress=False,
                                           echo=lambda *a: None, control=self.control)
        r = outcome.result
        name = fine_tuned_model_name(self.job)
        kind = "adapter" if (r.output_dir.name == "adapter") else "full"
        self.store.add_model(id=name, owner=self.job["owner"], base=self.job["model"], job_id=jid,
                             path=str(r.output_dir), kind=kind)
        comparison = None
        if outcome.comparison is not None:
            from openft.eval.compare import to_json

            comparison = to_json(outcome.comparison)
        result_files = []
        ok = self.store.update_job(
            jid, expect_status=("running",), status="succeeded", finished_at=int(time.time()),
            fine_tuned_model=name, trained_tokens=r.trained_tokens, comparison=comparison, run_dir=str(r.run_dir),
            result_files=result_files, estimated_finish=None, control="")
        if not ok:
            # Cancelled while training finished (the trainer does not stop on its last
            # step, nor while saving): the job stays cancelled, so take back its model.
            self.store.delete_model(self.job["owner"], name)
        if ok:
            self.store.add_event(jid, f"New fine-tuned model created: {name}", type="message",
                                 data={"fine_tuned_model": name, "trained_tokens": r.trained_tokens,
                                       "full_valid_loss": r.signals.get("last_valid_loss")})
            self.store.add_event(jid, "The job has successfully completed", data={"status": "succeeded"})


def merged_base(model: str) -> str:
    """A second round trains on a fine-tuned model: its run folder is merged once
    into a plain model folder, which then serves as the base (and is what the
    serving side loads under the new adapter)."""
    from openft.train.export import export, is_run_dir

    if not is_run_dir(model):
        return model
    target = home.models_dir() / f"merged-{Path(model).name}"
    if not (target / "config.json").exists():
        export(model, target)
    return str(target)


class DataFileMissing(Exception):
    pass


def run_one(store: Store, job: dict, parent_pid: int | None = None) -> None:
    jid = job["id"]
    runner = JobRunner(store, job, parent_pid)
    try:
        runner.run()
    except Interrupted as e:
        if e.reason == "paused":
            if store.update_job(jid, expect_status=("running",), status="paused", control=""):
                store.add_event(jid, f"Job paused at step {e.step}; resume continues from there",
                                data={"status": "paused", "step": e.step})
        else:
            store.update_job(jid, status="cancelled", control="", finished_at=int(time.time()),
                             expect_status=("running", "cancelled"))
            store.add_event(jid, f"Job cancelled at step {e.step}", data={"status": "cancelled"})
    except DataError as e:
        first = e.result.errors[0] if e.result.errors else None
        where = f"line {first.line}" if first and first.line else (f"record {first.record}" if first and first.record is not None else "")
        _fail(store, jid, "invalid_training_file", f"The training file has {len(e.result.errors)} error(s); first at {where}: {first.message if first else e}",
              "training_file")
    except DataFileMissing as e:
        _fail(store, jid, "invalid_training_file", f"file {e} no longer exists", "training_file")
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - a job failure must never kill the worker
        traceback.print_exc()
        _fail(store, jid, "training_failed", f"{type(e).__name__}: {e}", None)


def _fail(store: Store, jid: str, code: str, message: str, param: str | None) -> None:
    if store.update_job(jid, expect_status=("running",), status="failed", finished_at=int(time.time()),
                        error={"code": code, "message": message, "param": param}, estimated_finish=None):
        store.add_event(jid, f"Job failed: {message}", level="error", data={"code": code})


def run_worker(*, poll_s: float = 0.5, once: bool = False, parent_pid: int | None = None) -> None:
    from openft.models.load import setup_torch

    setup_torch()
    store = Store(store_path())
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(0)))
    last_sweep = 0.0
    while True:
        if parent_pid and os.getppid() != parent_pid:
            return
        if time.monotonic() - last_sweep > 5:
            requeue_orphans(store)
            last_sweep = time.monotonic()
        job = store.claim_next_job(os.getpid())
        if job is None:
            if once:
                return
            time.sleep(poll_s)
            continue
        run_one(store, job, parent_pid)
        if once:
            return


__all__ = ["run_worker", "requeue_orphans", "run_one", "store_path", "TERMINAL"]
