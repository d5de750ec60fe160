"""What torchrun runs on each rank: `python -m openft.train.rank SPEC.json [--resume]`.

The rank joins the process group, trains its share (`finetune`), and talks to the
process that launched it (`openft.train.launch`) through files in the run folder's
`.dist/`: rank 0 appends events to `events.jsonl` and reads pause/cancel requests
from `control`; a rank that fails writes `error-rank<R>.json` before it exits; an
interrupted run leaves `outcome.json`. A rank restarted by torchrun (after another
rank died) resumes from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

DIST_DIR = ".dist"
EVENTS = "events.jsonl"
CONTROL = "control"
OUTCOME = "outcome.json"


def die_with_parent() -> None:
    """SIGKILL this rank when its torchrun agent dies (killed with the job's worker):
    an orphaned rank would train on, beside the attempt that resumes the job. A
    watch thread rather than PR_SET_PDEATHSIG, which fires when the *thread* that
    started the process exits, and torchrun starts ranks from threads that do."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)  # polling: Linux has no event for "my parent died" short of PDEATHSIG
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="openft-parent-watch", daemon=True).start()


def error_file(dist_dir: Path, rank: int) -> Path:
    return dist_dir / f"error-rank{rank}.json"


class EventFile:
    """Rank 0's events as JSON lines, one write per event (the launcher tails the file)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, kind: str, data: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"kind": kind, "data": data}, default=str) + "\n")


def read_control(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def write_usage(dist_dir: Path, rank: int) -> None:
    """This rank's peak resident memory, for `benchmarks/dist_bench.py` and the curious."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    (dist_dir / f"usage-rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_bytes": peak}))


def set_threads(local_size: int) -> None:
    """Ranks that share a CPU split its cores (one thread each on a 2-core machine
    with 2 ranks) unless OMP_NUM_THREADS says otherwise."""
    import torch

    if os.environ.get("OPENFT_RANK_THREADS"):
        torch.set_num_threads(int(os.environ["OPENFT_RANK_THREADS"]))
    elif not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_size)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m openft.train.rank")
    p.add_argument("spec", help="the job spec (JSON), output_dir set")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    die_with_parent()
    from openft.config import JobSpec
    from openft.train import distributed
    from openft.train.recipe import Interrupted, finetune

    spec = JobSpec.from_dict(json.loads(Path(args.spec).read_text()))
    dist_dir = Path(spec.output_dir) / DIST_DIR
    world = distributed.World.from_env()
    set_threads(world.local_size)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    error_file(dist_dir, world.rank).unlink(missing_ok=True)  # an earlier attempt's, if any
    try:
        world = distributed.init()
        emit = EventFile(dist_dir / EVENTS) if world.main else (lambda kind, data: None)
        finetune(
            spec,
            resume=args.resume or restarted,
            on_event=emit,
            progress=False,
            control=lambda: read_control(dist_dir / CONTROL),
        )
        write_usage(dist_dir, world.rank)
        distributed.shutdown(together=True)
    except Interrupted as e:
        if world.main:
            (dist_dir / OUTCOME).write_text(json.dumps({"interrupted": e.reason, "step": e.step}))
        distributed.shutdown(together=True)  # every rank stops at the same step
        return 0
    except BaseException as e:
        error_file(dist_dir, world.rank).write_text(
            json.dumps(
                {
                    "rank": world.rank,
                    "host": os.uname().nodename,
                    "type": type(e).__name__,
                    "message": str(e)[:4000],
                    "traceback": traceback.format_exc()[-8000:],
                }
            )
        )
        raise
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
