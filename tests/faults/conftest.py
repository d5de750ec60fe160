"""Fault-injection fixtures: a server that runs no worker of its own, and a fork
server for the `openft worker` processes the tests start, kill and watch."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve.conftest import TINY, Server  # the real-server helper the API tests use

from .campaign import Zygote


def make_home(tmp_path_factory, session_home, name: str) -> Path:
    home = tmp_path_factory.mktemp(name)
    (home / "models").symlink_to(Path(session_home) / "models", target_is_directory=True)
    return home


@pytest.fixture(scope="package")
def zygote(session_home):
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="package")
def bare_server(tmp_path_factory, session_home, tiny_model_dir):
    """`openft serve --no-worker`: jobs run only in the workers a test starts."""
    s = Server(make_home(tmp_path_factory, session_home, "faults-home"), "--no-worker", models={TINY: tiny_model_dir})
    s.start()
    yield s
    s.stop()
