"""A fork server for `openft worker` processes.

Importing torch and transformers takes most of a worker's start-up (seconds, and
far more on a busy machine); a campaign that kills twenty workers would spend its
time importing. This process imports them once, then forks a fresh worker per
request: each child is a real `run_worker()` process with its own pid, store
connection and fault plan, killed and reaped like any other.

Protocol (one JSON object per line): on stdin {"plan", "faults_dir", "log", "env"} starts
a worker and answers {"pid"} on stdout; {"exit": pid, "code": n} reports every
child that ended (n < 0: killed by signal -n). EOF on stdin ends the server.
Single-threaded on purpose: forking a process that runs other threads can leave a
lock held in the child.
"""

from __future__ import annotations

import json
import os
import select
import sys


def _preload() -> None:
    from transformers import LlamaForCausalLM  # noqa: F401

    import openft.cli  # noqa: F401
    import openft.jobs.worker  # noqa: F401
    import openft.pipeline  # noqa: F401


def _child(req: dict) -> None:
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.environ.update(req.get("env", {}))
    os.environ["OPENFT_FAULTS"] = req.get("plan", "")
    os.environ["OPENFT_FAULTS_DIR"] = req.get("faults_dir", "")
    from openft import faults
    from openft.jobs.worker import run_worker

    faults.reset()
    code = 0
    try:
        run_worker()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    _preload()
    _say({"ready": os.getpid()})
    buf = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(req)
            _say({"pid": pid})


if __name__ == "__main__":
    main()
