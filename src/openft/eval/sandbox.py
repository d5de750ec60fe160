"""Run a `python` grader's `grade(sample, item)` in a separate, confined process.

The user's code runs in `grader_runner.py` under `python -I`, in a throwaway work
folder, with limits on CPU time, memory, output and wall-clock time, and without
network (see the runner for how). Whatever the code does (loops, allocates
without bound, prints forever, opens a socket, calls os._exit) it ends as a
`SandboxResult`: a reward, or an error kind and a sentence that says which limit
it hit. The limits come from `SandboxLimits` (OPENFT_GRADER_* variables).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RUNNER = Path(__file__).with_name("grader_runner.py")
MAX_SOURCE_BYTES = 256 * 1024  # OpenAI's limit on a python grader's source


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 10
    wall_s: float = 20.0
    memory_mb: int = 1024
    output_kb: int = 256

    @classmethod
    def from_env(cls) -> SandboxLimits:
        d = cls()
        return cls(
            cpu_s=int(os.environ.get("OPENFT_GRADER_CPU_S", d.cpu_s)),
            wall_s=float(os.environ.get("OPENFT_GRADER_WALL_S", d.wall_s)),
            memory_mb=int(os.environ.get("OPENFT_GRADER_MEMORY_MB", d.memory_mb)),
            output_kb=int(os.environ.get("OPENFT_GRADER_OUTPUT_KB", d.output_kb)),
        )


@dataclass
class SandboxResult:
    reward: float | None  # None when the grader failed
    error: str | None = None  # "timeout", "cpu", "memory", "output", "runtime", "crash"
    details: str | None = None
    seconds: float = 0.0
    network_namespace: bool = False  # the kernel gave the run its own (empty) network

    @property
    def ok(self) -> bool:
        return self.reward is not None


def _signal_error(code: int, limits: SandboxLimits, stderr: str) -> tuple[str, str]:
    sig = -code
    if sig == signal.SIGXCPU or sig == signal.SIGKILL and "cpu" in stderr:
        return "cpu", f"the grader used more than its {limits.cpu_s} s of CPU time"
    if sig == signal.SIGXFSZ:
        return "output", f"the grader wrote more than its {limits.output_kb} KB of output"
    if sig > 0:
        return "crash", f"the grader process died of signal {signal.Signals(sig).name}"
    tail = stderr.strip().splitlines()[-1:] or ["no output"]
    return "crash", f"the grader process exited with status {code} without a result ({tail[0][:300]})"


def run_python_grader(source: str, sample: dict, item: dict, limits: SandboxLimits | None = None) -> SandboxResult:
    limits = limits or SandboxLimits.from_env()
    if len(source.encode()) > MAX_SOURCE_BYTES:
        return SandboxResult(None, "runtime", f"the source is over {MAX_SOURCE_BYTES // 1024} KB")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="openft-grader-") as work:
        read_fd, write_fd = os.pipe()
        job = {"source": source, "sample": sample, "item": item, "limits": asdict(limits), "workdir": work}
        job["result_fd"] = write_fd
        out_path = Path(work, ".output")
        with open(out_path, "wb") as out:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", str(RUNNER)],
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_fd,),
                    cwd=work,
                    env={"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "TMPDIR": work},
                    start_new_session=True,  # its own process group: a timeout kills everything it left
                )
            finally:
                os.close(write_fd)
            outcome = _wait(proc, read_fd, json.dumps(job).encode(), limits)
        printed = out_path.read_text(errors="replace")[-4000:]
    seconds = time.monotonic() - start
    if isinstance(outcome, tuple):  # (error, details)
        return SandboxResult(None, outcome[0], outcome[1], seconds)
    if not outcome:
        error, details = _signal_error(proc.returncode, limits, printed)
        return SandboxResult(None, error, details, seconds)
    data = json.loads(outcome)
    isolated = bool(data.get("network_namespace"))
    if data.get("ok"):
        return SandboxResult(float(data["reward"]), seconds=seconds, network_namespace=isolated)
    kind = data.get("kind", "runtime")
    details = data.get("details") or ""
    if kind == "memory":
        details = f"the grader used more than its {limits.memory_mb} MB of memory ({details})"
    elif kind == "output":
        details = f"the grader wrote more than its {limits.output_kb} KB of output"
    return SandboxResult(None, kind, details, seconds, isolated)


def _wait(proc: subprocess.Popen, read_fd: int, job: bytes, limits: SandboxLimits) -> bytes | tuple[str, str]:
    """The runner's result bytes (b"" if it wrote none), or (error, details) on a timeout."""
    try:
        proc.stdin.write(job)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    try:
        proc.wait(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(read_fd)
        return "timeout", f"the grader ran longer than its {limits.wall_s:g} s and was stopped"
    with os.fdopen(read_fd, "rb") as r:
        return r.read()
