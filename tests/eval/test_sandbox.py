"""The python grader's sandbox: real child processes that loop, sleep, allocate,
print, open sockets, read and write files they must not, or die; each ends as a
clear error and the next grader still runs."""

from __future__ import annotations

import socket
import threading

import pytest

from openft.eval.graders import GradeContext, grade, parse_grader
from openft.eval.render import sample_namespace
from openft.eval.sandbox import SandboxLimits, run_python_grader

LIMITS = SandboxLimits(cpu_s=2, wall_s=8, memory_mb=512, output_kb=64)


def py(body: str, *, imports: str = "") -> str:
    return f"{imports}\ndef grade(sample, item):\n" + "\n".join("    " + ln for ln in body.splitlines()) + "\n"


def test_a_grader_reads_sample_and_item_and_may_use_its_work_folder():
    source = py(
        "open('scratch.txt', 'w').write(sample['output_text'])\n"
        "same = open('scratch.txt').read() == item['label']\n"
        "return json.loads(item['weights'])['hit'] if same else 0.0",
        imports="import json",
    )
    spec = parse_grader({"type": "python", "name": "p", "source": source})
    result = grade(
        spec, {"label": "Paris", "weights": '{"hit": 0.9}'}, sample_namespace("Paris"), GradeContext(limits=LIMITS)
    )
    assert result.reward == 0.9 and not result.failed


@pytest.mark.parametrize(
    "name, source, error, words",
    [
        ("endless loop", py("while True:\n    pass"), "cpu", "CPU time"),
        ("sleeps past the wall clock", py("time.sleep(60)", imports="import time"), "timeout", "longer than"),
        (
            "allocates without bound",
            py("x = []\nwhile True:\n    x.append(bytearray(10**7))"),
            "memory",
            "MB of memory",
        ),
        ("prints without bound", py("while True:\n    print('x' * 1000)"), "output", "KB of output"),
        ("returns a string", py("return 'high'"), "runtime", "not a finite number"),
        ("raises", py("return 1 / 0"), "runtime", "ZeroDivisionError"),
        ("exits the process", py("os._exit(3)", imports="import os"), "crash", "status 3"),
    ],
)
def test_each_hazard_is_stopped_with_a_clear_error(name, source, error, words):
    result = run_python_grader(source, {"output_text": "a"}, {}, LIMITS)
    assert result.reward is None, name
    assert result.error == error, (name, result)
    assert words in result.details, (name, result.details)
    assert result.seconds < LIMITS.wall_s + 5  # never outlives its limits (generous: the machine is noisy)


@pytest.fixture
def listener():
    """A real TCP server on loopback that counts the connections it accepts."""
    srv = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        try:
            while True:
                conn, _ = srv.accept()
                accepted.append(conn)
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], accepted
    srv.close()


@pytest.mark.parametrize(
    "code",
    [
        "socket.create_connection(('127.0.0.1', PORT), timeout=2)",
        "s = socket.socket()\ns.connect(('127.0.0.1', PORT))",
        "_socket.socket().connect(('127.0.0.1', PORT))",
        "subprocess.run(['python3', '-c', 'import socket; socket.create_connection((\"127.0.0.1\", PORT))'])",
    ],
)
def test_no_network(listener, code):
    port, accepted = listener
    source = py(code.replace("PORT", str(port)) + "\nreturn 1.0", imports="import socket, _socket, subprocess")
    result = run_python_grader(source, {}, {}, LIMITS)
    assert result.reward is None and result.error == "runtime"
    assert "may not use" in result.details
    assert accepted == []  # the server never saw a connection


@pytest.mark.parametrize(
    "code, words",
    [
        ("return len(open('/etc/passwd').read())", "may not read"),
        ("open('/tmp/openft-grader-escape', 'w').write('x')\nreturn 1.0", "only in their work folder"),
        ("os.remove('/tmp/openft-grader-target')\nreturn 1.0", "may not change"),
        ("ctypes.CDLL(None).system(b'true')\nreturn 1.0", "may not use ctypes"),
    ],
)
def test_no_files_outside_the_work_folder(tmp_path, code, words):
    target = __import__("pathlib").Path("/tmp/openft-grader-target")
    target.write_text("keep")
    try:
        result = run_python_grader(py(code, imports="import os, ctypes"), {}, {}, LIMITS)
        assert result.reward is None and words in result.details, result
        assert target.read_text() == "keep"
        assert not __import__("pathlib").Path("/tmp/openft-grader-escape").exists()
    finally:
        target.unlink(missing_ok=True)


def test_a_failed_python_grader_is_a_runtime_error_flag_and_timeouts_are_unresponsive():
    spec = parse_grader({"type": "python", "name": "p", "source": py("while True:\n    pass")})
    result = grade(spec, {}, sample_namespace("x"), GradeContext(limits=LIMITS))
    assert result.errors["python_grader_runtime_error"] and result.errors["unresponsive_reward_error"]
    assert "CPU time" in result.errors["python_grader_runtime_error_details"]
