"""The child process of a `python` grader (run by `openft.eval.sandbox`, never imported).

It reads {"source", "sample", "item", "limits", "workdir", "result_fd"} from stdin, confines
itself, then runs the user's `grade(sample, item)` and writes one JSON result to
the pipe descriptor `result_fd` the parent passed. Confinement happens here rather than in a preexec_fn because
the server forking with threads alive must not run Python between fork and exec.

Layers, each enough for its own hazard:
- resource limits: CPU seconds (the kernel's SIGXCPU), address space (a
  MemoryError), and file size (SIGXFSZ), which also bounds stdout/stderr because
  the parent points them at a file;
- no network: a fresh network namespace where the kernel allows one (it holds
  only a loopback that is down), and in every case an audit hook that refuses
  sockets, new processes, ctypes, and any file write outside the work folder.
Only the standard library is used: this runs with `python -I` (no site, no env).
"""

import errno
import json
import math
import os
import resource
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

_DENIED_PREFIXES = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "pty.")
_DENIED = {"os.system", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "sys.remote_exec"}
_WRITES = {
    "os.remove",
    "os.rmdir",
    "os.rename",
    "os.mkdir",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.utime",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copyfile",
}


def set_limits(limits: dict) -> None:
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = int(limits["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    output = int(limits["output_kb"]) * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (output, output))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def leave_network() -> bool:
    """Move into a new network namespace (unprivileged through a user namespace, or
    as root); False where the kernel refuses, and the audit hook alone applies."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (CLONE_NEWUSER | CLONE_NEWNET, CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            return True
    return False


def _inside(path, root: str) -> bool:
    if isinstance(path, int):
        return True  # an already-open descriptor
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str):
        path = os.fspath(path)
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def make_hook(workdir: str):
    readable = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}) + (workdir,)

    def hook(event: str, args) -> None:
        if event in _DENIED or event.startswith(_DENIED_PREFIXES):
            raise PermissionError(f"python graders may not use {event} (no network, no processes)")
        if event == "open":
            path, mode = args[0], args[1] or "r"
            if path is None:
                return
            writing = any(c in str(mode) for c in "wax+")
            if writing and not _inside(path, workdir):
                raise PermissionError(f"python graders may write only in their work folder, not {path}")
            if not writing and not any(_inside(path, root) for root in readable):
                raise PermissionError(f"python graders may not read {path}")
        elif event in _WRITES:
            for path in args:
                if isinstance(path, str | bytes | os.PathLike) and not _inside(path, workdir):
                    raise PermissionError(f"python graders may not change {path} ({event})")

    return hook


def user_traceback(e: BaseException) -> str:
    """The traceback without this runner's own frames: what the user can act on."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__]
    lines = traceback.format_list(frames[-6:]) + traceback.format_exception_only(type(e), e)
    return "".join(lines).strip()[-2000:]


def run(job: dict) -> dict:
    namespace = {"__name__": "grader"}
    try:
        exec(compile(job["source"], "grader.py", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            return {"ok": False, "kind": "runtime", "details": "the source defines no function grade(sample, item)"}
        reward = grade(job["sample"], job["item"])
    except MemoryError:
        return {"ok": False, "kind": "memory", "details": "MemoryError"}
    except OSError as e:
        if e.errno == errno.EFBIG:  # Python ignores SIGXFSZ: the write past RLIMIT_FSIZE fails instead
            return {"ok": False, "kind": "output", "details": str(e)}
        return {"ok": False, "kind": "runtime", "details": user_traceback(e)}
    except BaseException as e:  # the user's code may raise anything, SystemExit included
        return {"ok": False, "kind": "runtime", "details": user_traceback(e)}
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        return {"ok": False, "kind": "runtime", "details": f"grade() returned {reward!r:.200}, not a finite number"}
    return {"ok": True, "reward": float(reward)}


def main() -> None:
    job = json.loads(sys.stdin.read())
    result = os.fdopen(job["result_fd"], "w")
    set_limits(job["limits"])
    isolated = leave_network()
    workdir = os.path.realpath(job["workdir"])
    sys.addaudithook(make_hook(workdir))
    outcome = run(job)
    outcome["network_namespace"] = isolated
    result.write(json.dumps(outcome))
    result.flush()


if __name__ == "__main__":
    main()
