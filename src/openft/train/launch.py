"""Run one fine-tuning job on several ranks through torchrun, from the process that
asked for it (the CLI or the job worker).

This process stays in charge of the job: it starts `torchrun` with the job's
`Launch`, relays rank 0's events to its own `on_event` as they are written, passes
pause/cancel requests down, and turns the end of the ranks into what `finetune`
would have returned or raised. torchrun does the rest: rendezvous (c10d), one
process per rank, tearing the group down when a rank dies and restarting it
(`--max-restarts`), each restarted rank resuming from the last checkpoint.
Each rank's output goes to `<run>/logs/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from openft.config import JobSpec
from openft.fileio import atomic_write
from openft.train import rank as rank_files
from openft.train.distributed import Launch, check_objective
from openft.train.progress import ProgressBar
from openft.train.recipe import ControlFn, EventFn, Interrupted, TrainResult, default_run_dir

WAIT_S = 0.25  # how often the launcher looks for new events while the ranks run


class RankFailure(RuntimeError):
    """The ranks ended in an error (after torchrun's restarts); the message names
    the rank that failed first and its cause."""


def prepare_run_dir(spec: JobSpec, launch: Launch, resume: bool) -> Path:
    if launch.nnodes > 1 and not spec.output_dir:
        raise ValueError("a run on more than one node needs --output: a run folder every node reaches (shared)")
    run_dir = Path(spec.output_dir) if spec.output_dir else default_run_dir(spec)
    if launch.node_rank == 0 and holds_run(run_dir) and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output")
    (run_dir / rank_files.DIST_DIR).mkdir(parents=True, exist_ok=True)
    return run_dir


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run's files. The launchers of the other nodes may start
    first and write their spec (under .dist) and log (under logs) before node 0 looks."""
    return run_dir.exists() and any(p.name not in (rank_files.DIST_DIR, "logs") for p in run_dir.iterdir())


def clear_logs(log_dir: Path, node_rank: int) -> None:
    """A fresh run's logs start empty, but for the launcher logs other nodes already opened."""
    if not log_dir.is_dir():
        return
    for p in log_dir.iterdir():
        if re.fullmatch(r"torchrun-node\d+\.log", p.name) and p.name != f"torchrun-node{node_rank}.log":
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def torchrun_command(launch: Launch, spec_file: Path, run_dir: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc_per_node}"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        cmd.append("--standalone")  # a local rendezvous on a free port
    else:
        # Every node derives the same id from the shared run folder's path.
        rdzv_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        cmd += [
            f"--nnodes={launch.nnodes}",
            f"--node-rank={launch.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
    cmd += [f"--max-restarts={launch.max_restarts}", f"--log-dir={run_dir / 'logs'}", "--redirects=3"]
    cmd += ["-m", "openft.train.rank", str(spec_file)]
    return cmd + (["--resume"] if resume else [])


def rank_env(launch: Launch) -> dict[str, str]:
    env = dict(os.environ)
    # Ranks sharing this machine's cores split them (torchrun would set 1 and warn).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc_per_node)))
    return env


def run_ranks(
    spec: JobSpec,
    launch: Launch,
    *,
    resume: bool = False,
    on_event: EventFn | None = None,
    control: ControlFn | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `spec` on `launch`'s ranks; returns or raises as `finetune` does."""
    check_objective(spec.train.objective)  # refused before any rank loads the model
    run_dir = prepare_run_dir(spec, launch, resume)
    dist_dir = run_dir / rank_files.DIST_DIR
    reporter = launch.node_rank == 0  # this node's process relays events and control
    if reporter:
        for name in (rank_files.EVENTS, rank_files.CONTROL, rank_files.OUTCOME):
            (dist_dir / name).unlink(missing_ok=True)
        for old in dist_dir.glob("error-rank*.json"):
            old.unlink()
    spec_file = dist_dir / f"spec-node{launch.node_rank}.json"
    atomic_write(spec_file, json.dumps(replace(spec, output_dir=str(run_dir)).to_dict()))
    if reporter and not resume:
        clear_logs(run_dir / "logs", launch.node_rank)
    (run_dir / "logs").mkdir(exist_ok=True)
    relay = Relay(dist_dir / rank_files.EVENTS, on_event, ProgressBar if progress else None)
    with open(run_dir / "logs" / f"torchrun-node{launch.node_rank}.log", "ab") as log:
        proc = subprocess.Popen(
            torchrun_command(launch, spec_file, run_dir, resume),
            env=rank_env(launch),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a stop reaches torchrun and every rank it started
        )
        try:
            while True:
                try:
                    code = proc.wait(timeout=WAIT_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if reporter:
                    relay.poll()
                    request = control() if control else None
                    if request:
                        atomic_write(dist_dir / rank_files.CONTROL, request)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if reporter:
        relay.poll()
        relay.close()
    return finish(run_dir, code, launch)


def finish(run_dir: Path, code: int, launch: Launch) -> TrainResult:
    dist_dir = run_dir / rank_files.DIST_DIR
    if code != 0:
        raise RankFailure(failure_message(run_dir, code, launch.world_size))
    outcome = dist_dir / rank_files.OUTCOME
    if outcome.exists():
        o = json.loads(outcome.read_text())
        raise Interrupted(o["interrupted"], o["step"])
    return result_from_run(run_dir)


def _timed_out(message: str) -> bool:
    return "timed out" in message.lower() or "timeout" in message.lower()


def failure_message(run_dir: Path, code: int, launch_world: int = 0) -> str:
    """Which rank failed first and why: torchrun's root cause where a rank was
    killed (it wrote nothing itself), else the first rank's own error (the others
    usually fail on its absence)."""
    log = run_dir / "logs"
    text = "".join(p.read_text(errors="replace") for p in sorted(log.glob("torchrun-node*.log")))
    killed = root_cause(text)
    errors = sorted((run_dir / rank_files.DIST_DIR).glob("error-rank*.json"), key=lambda p: p.stat().st_mtime)
    first = json.loads(errors[0].read_text()) if errors else None
    if killed and (first is None or killed[0] != first["rank"]):
        rank, host, how = killed
        after = f"; then rank {first['rank']} failed: {first['type']}: {first['message']}" if first else ""
        return f"rank {rank} on {host} died ({how}) and torchrun stopped the run{after}"
    if first and launch_world and _timed_out(first["message"]):
        failed = {json.loads(p.read_text())["rank"] for p in errors}
        hung = [r for r in range(launch_world) if r not in failed]
        if hung:
            return (
                f"rank{'s' if len(hung) > 1 else ''} {', '.join(map(str, hung))} stopped answering: rank "
                f"{first['rank']} on {first['host']} timed out waiting for it in a collective ({first['message'][:300]})"
            )
    if first:
        others = [json.loads(p.read_text())["rank"] for p in errors[1:]]
        tail = f" (then rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} stopped)" if others else ""
        return f"rank {first['rank']} on {first['host']} failed: {first['type']}: {first['message']}{tail}"
    return f"torchrun exited with status {code} before any rank started; see {log}"


_ROOT_CAUSE = re.compile(
    r"Root Cause.*?host\s*:\s*(\S+).*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(?:\((SIG\w+)\))?\s*\n",
    re.S,
)


def root_cause(log_text: str) -> tuple[int, str, str] | None:
    """(rank, host, how it ended) from torchrun's last failure report, where the
    rank ended by a signal."""
    found = _ROOT_CAUSE.findall(log_text)
    if not found:
        return None
    host, rank, code, sig = found[-1]
    if int(code) >= 0:
        return None
    return int(rank), host, sig or f"signal {-int(code)}"


def result_from_run(run_dir: Path) -> TrainResult:
    """What `finetune` returns, read back from the files rank 0 wrote."""
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    metrics = run_dir / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out = run_dir / ("adapter" if config["train"]["method"] == "lora" else "model")
    return TrainResult(
        run_dir=run_dir,
        output_dir=out,
        history=history,
        trained_tokens=summary["trained_tokens"],
        signals=summary["signals"],
        tokens_per_s=summary["tokens_per_s"],
        elapsed_s=summary["elapsed_s"],
        stopped_early=summary["stopped_early"],
        config=config,
    )


class Relay:
    """Rank 0's events file, read as it grows: each complete line becomes one
    `on_event` call (and a progress bar update) in this process."""

    def __init__(self, path: Path, on_event: EventFn | None, bar_factory):
        self.path, self.on_event, self.bar_factory = path, on_event, bar_factory
        self.offset, self.bar = 0, None

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        for line in chunk[:end].splitlines():
            event = json.loads(line)
            self.show(event["kind"], event["data"])
            if self.on_event:
                self.on_event(event["kind"], event["data"])

    def show(self, kind: str, data: dict) -> None:
        if self.bar_factory is None:
            return
        if kind == "started":
            self.bar = self.bar_factory(data["total_steps"])
        elif kind == "metrics" and self.bar:
            self.bar.update(data)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
