"""The worker: claims queued jobs from the store and runs them, one at a time.

It runs as its own process (`openft worker`, or spawned by `openft serve`), so a
training crash never takes the API down. Progress goes into the store as events
and checkpoints; the API never talks to the worker directly. Cancel and pause are
requests written on the job (`control`), polled after every optimizer step.

A job whose worker died (killed, crashed, machine restarted) is found on the next
worker start, or by a live worker's periodic sweep: its worker pid is gone, or its
heartbeat (written every few seconds by a thread of the worker running it) has
stopped. It is put back in the queue and resumes from its last complete
checkpoint; only attempts that ended without a new checkpoint count towards
MAX_ATTEMPTS, so a long job that keeps making progress is never given up on.

A resumed attempt first makes the store agree with the run folder (a checkpoint
renamed into place just before a crash is registered, one pruned just before is
dropped), and does not repeat the metrics events of steps an earlier attempt
already reported: resuming is deterministic (weights, optimizer, RNG and data
position all come from the checkpoint), so those steps train to the same values.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from openft import home
from openft.config import JobSpec
from openft.faults import fault_point
from openft.heap import release_free_memory
from openft.jobs import fleet
from openft.jobs.evalworker import EvalRunner, requeue_stale_runs
from openft.jobs.naming import checkpoint_model_name
from openft.jobs.store import TERMINAL, Lease, NotOwner, Store, open_store
from openft.models.templates import TemplateError
from openft.train.distributed import Launch, LaunchError
from openft.train.launch import RankFailure
from openft.train.prepare import DataError, NotPairs
from openft.train.recipe import Interrupted

MAX_ATTEMPTS = 3  # attempts in a row without a new checkpoint
HEARTBEAT_S = 5.0
STALE_AFTER_S = 120.0  # no heartbeat for this long: the worker is gone (or frozen)
SWEEP_S = 5.0


def _env_seconds(name: str, default: float) -> float:
    """OPENFT_WORKER_HEARTBEAT_S / OPENFT_WORKER_STALE_S override the defaults (tests)."""
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        raise SystemExit(f"{name} must be a number of seconds, not {os.environ[name]!r}") from None


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


def _worker_gone(store: Store, job: dict, stale_after_s: float) -> bool:
    """The job's heartbeat stopped, or its worker is known gone: it stopped, or it
    ran on this very machine and its pid is dead (a pid elsewhere says nothing)."""
    if job["heartbeat_at"] is not None and time.time() - job["heartbeat_at"] > stale_after_s:
        return True
    member = store.fleet_member(job["worker_id"]) if job["worker_id"] else None
    if member is None:  # a job claimed before the fleet existed: by a worker of this machine
        return job["worker_pid"] != os.getpid() and not _pid_alive(job["worker_pid"])
    if member["stopped_at"] is not None:
        return True
    return member["machine"] == fleet.machine() and member["pid"] != os.getpid() and not _pid_alive(member["pid"])


def member_gone(store: Store, worker_id: str | None, stale_after_s: float) -> bool:
    """A worker of the fleet is gone: unknown, stopped, silent for `stale_after_s`,
    or of this machine with its pid dead."""
    member = store.fleet_member(worker_id) if worker_id else None
    if member is None or member["stopped_at"] is not None:
        return True
    if time.time() - member["heartbeat_at"] > stale_after_s:
        return True
    return member["machine"] == fleet.machine() and member["pid"] != os.getpid() and not _pid_alive(member["pid"])


def requeue_orphans(store: Store, *, stale_after_s: float | None = None) -> list[str]:
    """Put 'running' jobs whose worker is gone back in the queue (or fail them
    after MAX_ATTEMPTS attempts in a row that made no progress)."""
    if stale_after_s is None:
        stale_after_s = _env_seconds("OPENFT_WORKER_STALE_S", STALE_AFTER_S)
    requeued = []
    for job in store.jobs_in("running"):
        if not _worker_gone(store, job, stale_after_s):
            continue
        # Fenced by the job's lease: a worker that took the job meanwhile keeps it.
        lease = Lease.of(job)
        if job["stalls"] >= MAX_ATTEMPTS:
            msg = (
                f"the worker running this job stopped {job['stalls']} times in a row without reaching a new "
                f"checkpoint ({job['attempts']} attempts in all)"
            )
            store.update_job(
                job["id"],
                expect_status=("running",),
                expect_worker=lease,
                status="failed",
                finished_at=int(time.time()),
                estimated_finish=None,
                error={"code": "worker_lost", "param": None, "message": msg},
                events=[{"message": f"Job failed: {msg}", "level": "error", "data": {"code": "worker_lost"}}],
            )
            continue
        if store.update_job(
            job["id"],
            expect_status=("running",),
            expect_worker=lease,
            status="queued",
            worker_pid=None,
            worker_id=None,
            events=[
                {
                    "message": "The worker running this job stopped; the job is queued again and "
                    "will resume from its last checkpoint",
                    "level": "warn",
                }
            ],
        ):
            requeued.append(job["id"])
    return requeued


def warn_unrunnable(store: Store) -> list[str]:
    """Queued jobs that no live worker can run (too many ranks, GPUs it lacks) get
    one warning event saying so; they stay queued, for a worker that can to join."""
    alive = [m for m in store.fleet(since=time.time() - fleet.LOST_AFTER_S) if m["kind"] == "worker"]
    caps = [m["capabilities"] or {} for m in alive]
    if not caps:
        return []
    ranks, gpus = max(c.get("max_ranks", 1) for c in caps), max(c.get("gpus", 0) for c in caps)
    warned = []
    for job in store.unfit_queued_jobs(ranks, gpus) if ranks or gpus else []:
        if any(c.get("max_ranks", 1) >= job["ranks"] and c.get("gpus", 0) >= job["gpus"] for c in caps):
            continue
        if any((e["data"] or {}).get("code") == "no_worker_fits" for e in store.list_events(job["id"], limit=1000)):
            continue
        store.add_event(
            job["id"],
            f"No worker can run this job yet: it needs {job['ranks']} rank(s) and {job['gpus']} GPU(s), and the "
            f"{len(caps)} live worker(s) offer at most {ranks} rank(s) and {gpus} GPU(s). It stays queued until a "
            "worker that can joins (openft worker --max-ranks N, or a machine with the GPUs).",
            level="warn",
            data={"code": "no_worker_fits", "ranks": job["ranks"], "gpus": job["gpus"]},
        )
        warned.append(job["id"])
    return warned


TakenOver = NotOwner  # this worker no longer owns its job (presumed dead, the job requeued)


class Heartbeat:
    """A thread that stamps the job's heartbeat every HEARTBEAT_S while it runs, so
    a worker busy in a long evaluation or model save is not taken for dead."""

    def __init__(self, store: Store, job_id: str, lease: Lease):
        self.store, self.job_id, self.lease = store, job_id, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(_env_seconds("OPENFT_WORKER_HEARTBEAT_S", HEARTBEAT_S)):
            try:
                self.store.update_job(self.job_id, expect_worker=self.lease, heartbeat_at=time.time())
            except Exception:  # noqa: BLE001 - a busy database must not end the heartbeat
                pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@dataclass
class JobRunner:
    store: Store
    job: dict
    parent_pid: int | None = None
    launch: Launch | None = None  # the worker's own --nproc-per-node / --max-restarts
    reported_step: int = 0  # metrics events up to this step exist (from earlier attempts)
    total_steps: int | None = None
    judge_runner: EvalRunner | None = None  # the engine behind an eval's model graders, while the job runs

    @property
    def lease(self) -> Lease:
        return Lease.of(self.job)

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

    def job_launch(self) -> Launch:
        """The job's `resources` over the worker's own launch flags (LaunchError if
        they cannot run). Recorded on the job, so the job shows the ranks it trains
        on, and an attempt resumed by another worker keeps them."""
        extra = self.job["extra"] or {}
        resources = extra.get("resources")
        if resources is not None and not isinstance(resources, dict):
            raise LaunchError(f"resources must be an object like {{'nproc_per_node': 2}}, not {resources!r}")
        launch = Launch.from_resources(resources, default=self.launch)
        ran = {**extra, "resources": {**(resources or {}), "nproc_per_node": launch.nproc_per_node}}
        if ran != extra:
            self.store.update_job(self.job["id"], expect_worker=self.lease, extra=ran)
        return launch

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
        if job is None or job["status"] == "cancelled" or job["control"] == "cancel":
            return "cancel"
        if job["status"] != "running" or Lease.of(job) != self.lease:
            raise TakenOver(self.job["id"])  # requeued (or failed) while this worker was presumed dead
        self.store.update_job(self.job["id"], expect_worker=self.lease, heartbeat_at=time.time())
        if job["control"] == "pause":
            return "pause"
        return None

    def on_event(self, kind: str, data: dict) -> None:
        jid = self.job["id"]
        if kind == "started":
            self.total_steps = data["total_steps"]
            self.store.add_event(
                jid,
                f"Fine-tuning started: {data['train_examples']} training and "
                f"{data['valid_examples']} validation examples, {data['total_steps']} steps"
                + (f"; {data['precision']['text']}" if data.get("precision") else ""),
                data={
                    "total_steps": data["total_steps"],
                    "hyperparameters": data["config"]["train"],
                    "precision": data.get("precision"),
                },
            )
        elif kind == "resumed":
            self.store.add_event(
                jid, f"Resumed from the checkpoint at step {data['step']}", data={"step": data["step"]}
            )
        elif kind == "metrics":
            row = {k: v for k, v in data.items()}
            total = self.total_steps
            msg = f"Step {row['step']}/{total}: training loss={row['train_loss']:.4f}"
            if "valid_loss" in row:
                msg += f", validation loss={row['valid_loss']:.4f}"
            if row["step"] > self.reported_step:  # else an earlier attempt reported this very step
                self.store.add_event(
                    jid, msg, type="metrics", data={**row, "total_steps": total}, expect_worker=self.lease
                )
            eta = row.get("eta_s")
            self.store.update_job(
                jid,
                expect_worker=self.lease,
                trained_tokens=row["trained_tokens"],
                estimated_finish=int(time.time() + eta) if eta is not None else None,
            )
        elif kind == "checkpoint":
            self._register_checkpoint(data["step"], data["metrics"], data["path"])
        elif kind in ("base_scored", "checkpoint_scored"):
            self._scored(kind, data)
        elif kind == "checkpoints_deleted":
            for step in data["steps"]:
                self.store.delete_checkpoint(jid, step)
        elif kind == "early_stopped":
            self.store.add_event(
                jid,
                f"Early stopping at step {data['step']}: validation loss stopped improving "
                f"(best {data['best_valid_loss']:.4f})",
                data=data,
            )

    def _register_checkpoint(self, step: int, m: dict, path: str) -> None:
        name = checkpoint_model_name(self.job, step)
        metrics = {
            "step": step,
            "train_loss": m["train_loss"],
            "train_mean_token_accuracy": m["train_mean_token_accuracy"],
            "valid_loss": m.get("valid_loss"),
            "valid_mean_token_accuracy": m.get("valid_mean_token_accuracy"),
            "full_valid_loss": None,
            "full_valid_mean_token_accuracy": None,
            # DPO: how the preference moved (rewards of each side, their margin, pairs ranked right)
            **{k: v for k, v in m.items() if k.endswith(("_reward", "_reward_margin", "_reward_accuracy"))},
            # the eval at this checkpoint (openft.eval.checkpoints): score, pass rate, per criterion
            **{k: v for k, v in m.items() if k.startswith("eval_")},
        }
        self.store.add_checkpoint(
            self.job["id"],
            step,
            metrics,
            name,
            path,
            expect_worker=self.lease,
            event={
                "message": f"Checkpoint created at step {step}",
                "type": "message",
                "data": {"step": step, "fine_tuned_model_checkpoint": name},
            },
        )

    def _scored(self, kind: str, data: dict) -> None:
        """An event for the score of the base model or of a checkpoint, and with the
        job's eval, a completed run of that eval holding the graded answers."""
        jid, step = self.job["id"], data.get("step")
        what = "The base model" if kind == "base_scored" else f"The checkpoint at step {step}"
        msg = f"{what} scores {data['eval_score']:.3f} on the eval (pass rate {data['eval_pass_rate']:.0%})"
        if data.get("eval_below_base"):
            msg += f": below the base model's {data['eval_base_score']:.3f}"
        metrics = {k: v for k, v in data.items() if k != "rows"}
        self.store.add_event(jid, msg, type="message", data={"step": step, **metrics}, expect_worker=self.lease)
        eval_id = (self.job["extra"] or {}).get("eval_id")
        if eval_id and self.store.get_eval(self.job["owner"], eval_id):
            record_scored_run(self.store, self.job, eval_id, step, data)

    def eval_criteria(self):
        """The job's eval's testing criteria (None: the references' own), and a judge
        for its model graders (the serving engine, loaded only if one asks)."""
        eval_id = (self.job["extra"] or {}).get("eval_id")
        ev = self.store.get_eval(self.job["owner"], eval_id) if eval_id else None
        if ev is None:
            return None, None
        from openft.jobs.evalworker import EngineSampler, EvalRunner

        self.judge_runner = EvalRunner(self.store)  # stopped when the job ends (run)
        return ev["testing_criteria"], EngineSampler(self.judge_runner.engine, self.store, self.job["owner"]).judge

    def selected_weights(self, spec: JobSpec, final: Path) -> Path:
        """The final weights, or with `select: best` the best-scoring checkpoint's adapter."""
        if spec.eval.select != "best":
            return final
        scored = [
            (c["metrics"]["eval_score"], c["step"], c)
            for c in self.store.list_checkpoints(self.job["id"], limit=1_000_000)
            if (c["metrics"] or {}).get("eval_score") is not None
        ]
        if not scored:
            self.store.add_event(
                self.job["id"],
                "select=best: no checkpoint was scored; the final weights are kept",
                level="warn",
                expect_worker=self.lease,
            )
            return final
        score, step, best = max(scored, key=lambda t: (t[0], t[1]))
        path = Path(best["path"])
        if not (path / "adapter_config.json").exists():
            return final  # a full fine-tune's checkpoint holds training state, not a servable model
        self.store.add_event(
            self.job["id"],
            f"Selected the checkpoint at step {step} (eval score {score:.3f}) as the fine-tuned model",
            data={"step": step, "eval_score": score},
            expect_worker=self.lease,
        )
        return path

    def sync_checkpoints(self) -> None:
        """Make the store's checkpoints those complete on disk: an earlier attempt
        may have died between renaming a checkpoint into place and registering it,
        or between deleting an old one and unregistering it."""
        from openft.train import checkpoint

        jid = self.job["id"]
        checkpoint.clean_leftovers(self.run_dir)
        on_disk = {checkpoint.step_of(p): p for p in checkpoint.complete(self.run_dir)}
        for row in self.store.list_checkpoints(jid, limit=1_000_000):
            if row["step"] not in on_disk:
                self.store.delete_checkpoint(jid, row["step"])
        for step, path in on_disk.items():
            history = json.loads((path / checkpoint.STATE_FILE).read_text())["history"]
            self._register_checkpoint(
                step, history[-1] if history else {"train_loss": None, "train_mean_token_accuracy": None}, str(path)
            )

    def run(self) -> None:
        from openft.jobs.naming import fine_tuned_model_name
        from openft.pipeline import finetune_with_comparison

        jid = self.job["id"]
        launch = self.job_launch()  # first: a job that cannot run fails before any model is merged
        spec = self.spec()
        spec.model = merged_base(spec.model)
        resume = self.run_dir.exists()
        if resume:
            self.sync_checkpoints()
        self.reported_step = self.store.last_metrics_step(jid)
        criteria, judge = self.eval_criteria()
        try:
            outcome = finetune_with_comparison(
                spec,
                resume=resume,
                on_event=self.on_event,
                progress=False,
                echo=lambda *a: None,
                control=self.control,
                launch=launch,
                criteria=criteria,
                grader_judge=judge,
            )
        finally:
            if self.judge_runner is not None:
                self.judge_runner.stop()
        r = outcome.result
        name = fine_tuned_model_name(self.job)
        path = self.selected_weights(spec, r.output_dir)
        kind = "adapter" if (path.name == "adapter" or (path / "adapter_config.json").exists()) else "full"
        self.store.add_model(
            id=name, owner=self.job["owner"], base=self.job["model"], job_id=jid, path=str(path), kind=kind
        )
        fault_point("register")
        comparison = None
        if outcome.comparison is not None:
            from openft.eval.compare import to_json

            comparison = to_json(outcome.comparison)
        result_files = []
        ok = self.store.update_job(
            jid,
            expect_status=("running",),
            expect_worker=self.lease,
            status="succeeded",
            finished_at=int(time.time()),
            fine_tuned_model=name,
            trained_tokens=r.trained_tokens,
            comparison=comparison,
            run_dir=str(r.run_dir),
            result_files=result_files,
            estimated_finish=None,
            control="",
            events=[
                {
                    "message": f"New fine-tuned model created: {name}",
                    "type": "message",
                    "data": {
                        "fine_tuned_model": name,
                        "trained_tokens": r.trained_tokens,
                        "full_valid_loss": r.signals.get("last_valid_loss"),
                    },
                },
                {"message": "The job has successfully completed", "data": {"status": "succeeded"}},
            ],
        )
        if not ok and (job := self.store.get_job(None, jid)) and job["status"] != "succeeded":
            # Cancelled while training finished (the trainer does not stop on its last
            # step, nor while saving): the job stays cancelled, so take back its model.
            self.store.delete_model(self.job["owner"], name)


def record_scored_run(store: Store, job: dict, eval_id: str, step: int | None, data: dict) -> None:
    """A completed run of `eval_id` for the base model (step None) or a checkpoint,
    under a fixed id: a resumed job that scores the same step again adds nothing."""
    from openft.eval.evals import parse_criteria
    from openft.eval.runs import summarise

    ev = store.get_eval(job["owner"], eval_id)
    rows = data["rows"]
    store.add_finished_run(
        {
            "id": f"evalrun-{job['id'].removeprefix('ftjob-')}-{'base' if step is None else step}",
            "eval_id": eval_id,
            "owner": job["owner"],
            "name": f"{job['id']} {'base model' if step is None else f'step {step}'}",
            "model": job["model"] if step is None else checkpoint_model_name(job, step),
            "status": "completed",
            "data_source": {"type": "fine_tuning_job", "job_id": job["id"], "step": step},
            "metadata": {"fine_tuning_job_id": job["id"], "step": "base" if step is None else str(step)},
            **summarise(parse_criteria(ev["testing_criteria"]), rows, None),
        },
        rows,
    )


def merged_base(model: str) -> str:
    """A second round trains on a fine-tuned model (its run folder) or on a LoRA
    checkpoint of one (`<run>/checkpoints/step-N`): it is merged once into a plain
    model folder, which then serves as the base (and is what the serving side loads
    under the new adapter)."""
    from openft.train.export import default_name, export, is_run_dir

    if not is_run_dir(model):
        return model
    target = home.models_dir() / f"merged-{default_name(model)}"
    if not (target / "config.json").exists():
        export(model, target)  # written whole or not at all
    return str(target)


class DataFileMissing(Exception):
    pass


def run_one(store: Store, job: dict, parent_pid: int | None = None, launch: Launch | None = None) -> None:
    """Run one claimed job to its end. Every write that ends it is fenced by the
    job's lease: a worker presumed dead meanwhile changes nothing."""
    jid, lease = job["id"], Lease.of(job)
    runner = JobRunner(store, job, parent_pid, launch)
    try:
        with Heartbeat(store, jid, lease):
            runner.run()
    except TakenOver:
        print(f"job {jid} was taken over by another worker; leaving it", flush=True)
    except Interrupted as e:
        if e.reason == "paused":
            store.update_job(
                jid,
                expect_status=("running",),
                expect_worker=lease,
                status="paused",
                control="",
                events=[
                    {
                        "message": f"Job paused at step {e.step}; resume continues from there",
                        "data": {"status": "paused", "step": e.step},
                    }
                ],
            )
        else:
            store.update_job(
                jid,
                status="cancelled",
                control="",
                finished_at=int(time.time()),
                expect_status=("running", "cancelled"),
                expect_worker=lease,
                events=[{"message": f"Job cancelled at step {e.step}", "data": {"status": "cancelled"}}],
            )
    except DataError as e:
        first = e.result.errors[0] if e.result.errors else None
        where = (
            f"line {first.line}"
            if first and first.line
            else (f"record {first.record}" if first and first.record is not None else "")
        )
        _fail(
            store,
            lease,
            jid,
            "invalid_training_file",
            f"The training file has {len(e.result.errors)} error(s); first at {where}: {first.message if first else e}",
            "training_file",
        )
    except TemplateError as e:  # the model's chat template does not fit its vocabulary or the data
        _fail(store, lease, jid, "invalid_chat_template", str(e), "model")
    except DataFileMissing as e:
        _fail(store, lease, jid, "invalid_training_file", f"file {e} no longer exists", "training_file")
    except NotPairs as e:  # a DPO job whose file passed the API's check by layout but holds no pairs
        _fail(store, lease, jid, "invalid_training_file", str(e), "training_file")
    except LaunchError as e:  # the job's resources (over this worker's flags) cannot run: the job's fault
        _fail(store, lease, jid, "invalid_resources", f"The job's resources cannot run: {e}", "resources")
    except RankFailure as e:  # torchrun's restarts are spent: the worker's own retry comes next
        retry_ranks(store, lease, jid, str(e))
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - a job failure must never kill the worker
        _print_exc()
        if _disk_full(e):
            _fail(store, lease, jid, "disk_full", _disk_full_message(store, jid, e), None)
        else:
            _fail(store, lease, jid, "training_failed", f"{type(e).__name__}: {e}", None)


def retry_ranks(store: Store, lease: Lease, jid: str, why: str) -> None:
    """A job whose ranks failed goes back in the queue to resume from its last
    checkpoint, as a job whose worker died does; after MAX_ATTEMPTS attempts in a
    row without a new checkpoint it fails, naming the rank."""
    job = store.get_job(None, jid)
    if job is None or job["stalls"] >= MAX_ATTEMPTS:
        _fail(
            store,
            lease,
            jid,
            "training_failed",
            f"The training ranks failed {MAX_ATTEMPTS} times in a row: {why}",
            None,
        )
        return
    store.update_job(
        jid,
        expect_status=("running",),
        expect_worker=lease,
        status="queued",
        worker_pid=None,
        worker_id=None,
        events=[
            {
                "message": f"The training ranks failed ({why}); the job is queued again and resumes from its "
                "last checkpoint",
                "level": "warn",
                "data": {"code": "ranks_failed"},
            }
        ],
    )


def _print_exc() -> None:
    try:
        traceback.print_exc()
    except OSError:  # the log is on the disk that just filled up: the job's error says it all
        pass


def _disk_full(e: BaseException) -> bool:
    from openft.train.checkpoint import os_errno

    return os_errno(e) == errno.ENOSPC or "database or disk is full" in str(e)


def _disk_full_message(store: Store, jid: str, e: BaseException) -> str:
    from openft.train.checkpoint import CheckpointWriteError

    kept = sorted(c["step"] for c in store.list_checkpoints(jid, limit=1_000_000))
    where = e.strerror if isinstance(e, CheckpointWriteError) else f"{type(e).__name__}: {e}"
    return (
        f"No space left on device under {home.home()}: {where}. "
        + (f"The checkpoints at steps {', '.join(map(str, kept))} are kept and usable. " if kept else "")
        + "Free some disk space and start the job again."
    )


def _fail(store: Store, lease: Lease, jid: str, code: str, message: str, param: str | None) -> None:
    store.update_job(
        jid,
        expect_status=("running",),
        expect_worker=lease,
        status="failed",
        finished_at=int(time.time()),
        error={"code": code, "message": message, "param": param},
        estimated_finish=None,
        events=[{"message": f"Job failed: {message}", "level": "error", "data": {"code": code}}],
    )


def release_memory() -> None:
    """Give a finished job's memory back to the system: the model, optimizer and
    activations are garbage once the job's frames are gone, but glibc keeps freed
    heap pages mapped unless asked to return them (training asks it to keep them)."""
    gc.collect()
    release_free_memory()


def run_worker(
    *,
    poll_s: float = 0.5,
    once: bool = False,
    parent_pid: int | None = None,
    launch: Launch | None = None,
    database_url: str | None = None,
    max_ranks: int | None = None,
) -> None:
    """`launch`: how this worker trains a job whose `resources` do not say (one rank
    by default). `max_ranks`: the most ranks it starts for a job that asks (default:
    one per GPU, else one per core); it claims only jobs within that and its GPUs."""
    from openft.models.load import setup_torch

    setup_torch()
    store = open_store(database_url)
    fleet.check_home(store, home.home())
    own = launch.nproc_per_node if launch else 1
    caps = fleet.capabilities(max(max_ranks or 0, own) if max_ranks else None)
    caps["max_ranks"] = max(caps["max_ranks"], own)
    member = fleet.Member(kind="worker", capabilities=caps)
    presence = fleet.Presence(store, member, _env_seconds("OPENFT_WORKER_HEARTBEAT_S", HEARTBEAT_S)).start()
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(0)))
    print(f"worker {member.id} (pid {member.pid}) on {store.describe()}: {caps}", flush=True)
    try:
        _work(store, member, poll_s=poll_s, once=once, parent_pid=parent_pid, launch=launch)
    finally:
        presence.stop()


def _work(store: Store, member: fleet.Member, *, poll_s: float, once: bool, parent_pid: int | None, launch) -> None:
    evals = EvalRunner(store)
    try:
        _loop(store, member, evals, poll_s=poll_s, once=once, parent_pid=parent_pid, launch=launch)
    finally:
        evals.stop()


def _loop(store: Store, member: fleet.Member, evals: EvalRunner, *, poll_s, once, parent_pid, launch) -> None:
    caps = member.capabilities
    last_sweep = 0.0
    stale = _env_seconds("OPENFT_WORKER_STALE_S", STALE_AFTER_S)
    while True:
        if parent_pid and os.getppid() != parent_pid:
            return
        if time.monotonic() - last_sweep > SWEEP_S:
            requeue_orphans(store)
            requeue_stale_runs(store, lambda w: w != member.id and member_gone(store, w, stale))
            warn_unrunnable(store)
            last_sweep = time.monotonic()
        job = store.claim_next_job(member.id, member.pid, max_ranks=caps["max_ranks"], gpus=caps["gpus"])
        if job is not None:
            store.fleet_beat(member.id, job_id=job["id"])
            run_one(store, job, parent_pid, launch)
            store.fleet_beat(member.id, job_id=None)
            release_memory()
        elif (run := store.claim_next_eval_run(member.id)) is not None:
            evals.run(run)  # between training jobs: an eval run is minutes, a job may be hours
        elif once:
            return
        else:
            time.sleep(poll_s)
            continue
        if once:
            return


__all__ = ["run_worker", "requeue_orphans", "run_one", "store_path", "TERMINAL"]
