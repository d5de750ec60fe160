"""Fault injection: named points in the training worker's path where a test can
make the process die, run out of disk, or wait.

Off unless the environment variable OPENFT_FAULTS names a point, so in normal use
`fault_point()` is one dict lookup. The plan is a comma-separated list of
`point:n[:action]`: at the n-th time this process reaches `point`, do `action`:

  kill    SIGKILL this process (the default): nothing after it runs, as with the
          OOM killer or a power cut
  enospc  raise OSError(ENOSPC) at the n-th hit and every later one, as a full
          disk does
  hold    write `<OPENFT_FAULTS_DIR>/<point>.held` and wait until
          `<point>.go` appears there, so a test can act at a known moment

e.g. OPENFT_FAULTS="checkpoint.write:2,eval:1:hold". Under torchrun every rank
inherits the plan; OPENFT_FAULTS_RANK=R keeps it to rank R's first attempt, so a
rank restarted by torchrun does not die again at the same point. Before a kill, one JSON line
naming the point goes to OPENFT_FAULTS_DIR/injected.jsonl, so a campaign can tell
which moment each death hit.

Points (where they sit, and what a death there leaves behind):
  step              in an optimizer step, after the backward pass, before the update
  eval              in an evaluation pass, between micro-batches
  checkpoint.write  in a checkpoint save, some files written, not yet renamed
  checkpoint.commit a checkpoint renamed into place, not yet in the job store
  checkpoint.prune  an old checkpoint being deleted
  register          the final model saved and registered, the job not yet succeeded
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ENV = "OPENFT_FAULTS"
DIR_ENV = "OPENFT_FAULTS_DIR"
RANK_ENV = "OPENFT_FAULTS_RANK"
ACTIONS = ("kill", "enospc", "hold")
POINTS = ("step", "eval", "checkpoint.write", "checkpoint.commit", "checkpoint.prune", "register")


@dataclass(frozen=True)
class Fault:
    point: str
    at: int  # the n-th hit (1-based) in this process
    action: str = "kill"


def parse(text: str) -> dict[str, Fault]:
    """`point:n[:action],...` -> {point: Fault}; a bad entry is an error naming it."""
    plan: dict[str, Fault] = {}
    for entry in filter(None, (x.strip() for x in text.split(","))):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or parts[0] not in POINTS or not parts[1].isdigit() or int(parts[1]) < 1:
            raise ValueError(
                f"{ENV}: bad entry {entry!r}; expected point:n[:action] with point one of "
                f"{', '.join(POINTS)} and n >= 1"
            )
        action = parts[2] if len(parts) == 3 else "kill"
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: bad action {action!r} in {entry!r}; one of {', '.join(ACTIONS)}")
        plan[parts[0]] = Fault(parts[0], int(parts[1]), action)
    return plan


_plan: dict[str, Fault] | None = None
_hits: Counter = Counter()


def _faults_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or ".")


def _this_process_faults() -> bool:
    """False in a rank other than OPENFT_FAULTS_RANK, and in any torchrun restart."""
    want = os.environ.get(RANK_ENV)
    if want is None:
        return True
    return os.environ.get("RANK", "0") == want and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def fault_point(name: str) -> None:
    global _plan
    if _plan is None:
        _plan = parse(os.environ.get(ENV, "")) if _this_process_faults() else {}
    fault = _plan.get(name)
    if fault is None:
        return
    _hits[name] += 1
    n = _hits[name]
    if fault.action == "enospc" and n >= fault.at:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {name})")
    if n != fault.at:
        return
    if fault.action == "kill":
        try:
            with open(_faults_dir() / "injected.jsonl", "a") as fh:
                fh.write(json.dumps({"point": name, "hit": n, "pid": os.getpid(), "time": time.time()}) + "\n")
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered asynchronously; never run past the point
    elif fault.action == "hold":
        d = _faults_dir()
        (d / f"{name}.held").write_text(str(os.getpid()))
        while not (d / f"{name}.go").exists():
            time.sleep(0.05)


def reset() -> None:
    """Re-read the plan (tests that change OPENFT_FAULTS within one process)."""
    global _plan
    _plan = None
    _hits.clear()
