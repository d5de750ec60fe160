"""`openft worker --nproc-per-node N --max-restarts K` (issue 17): the worker's own
launch, for jobs whose resources do not say; `openft serve` takes the same flags
and passes them on to the worker it starts. In process, the worker loop replaced
by a recorder (nothing trains)."""

from __future__ import annotations

import pytest

from openft.cli import _launch_args, build_parser, main
from openft.train.distributed import Launch


@pytest.fixture
def worker_calls(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr("openft.jobs.worker.run_worker", lambda **kw: calls.append(kw))
    return calls


def test_worker_flags_become_its_launch(worker_calls):
    assert main(["worker", "--once", "--nproc-per-node", "2", "--max-restarts", "3"]) == 0
    assert worker_calls[0]["launch"] == Launch(nproc_per_node=2, max_restarts=3)
    assert main(["worker", "--once"]) == 0
    assert worker_calls[1]["launch"] is None  # no flags: Launch's defaults, decided in one place


@pytest.mark.parametrize("command", ["worker", "serve"])
@pytest.mark.parametrize("flags", [["--nproc-per-node", "0"], ["--max-restarts", "-1"]])
def test_a_launch_that_cannot_run_is_a_usage_error(worker_calls, command, flags, capsys):
    # serve refuses it before it starts (not a worker dying at every restart)
    assert main([command, *flags]) == 2
    assert "error:" in capsys.readouterr().err and worker_calls == []


def test_serve_passes_its_launch_flags_to_its_worker():
    serve = build_parser().parse_args(["serve", "--nproc-per-node", "4", "--max-restarts", "0"])
    forwarded = _launch_args(serve)
    assert forwarded == ("--nproc-per-node", "4", "--max-restarts", "0")
    # What the spawned worker parses from them is the launch serve was given.
    worker = build_parser().parse_args(["worker", "--parent-pid", "1", *forwarded])
    assert (worker.nproc_per_node, worker.max_restarts) == (4, 0)
    assert _launch_args(build_parser().parse_args(["serve"])) == ()
