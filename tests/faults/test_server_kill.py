"""SIGKILL the `openft serve` process while jobs train and chat streams are open,
then start it again on the same data folder: the streaming clients get a
connection error at once (no hang), nothing in the store is lost, and the jobs go
on from their last checkpoints to the same end as if nothing had happened."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading

import httpx
import openai
import pytest
from serve.conftest import TINY, Server, jsonl

from .campaign import TRAIN_ROWS, events, rows, store_checkpoints, wait_for
from .conftest import make_home

pytestmark = pytest.mark.integration

TERMINAL = ("succeeded", "failed", "cancelled")


class Streamer(threading.Thread):
    """A streaming chat client that reads until its stream ends, one way or another."""

    def __init__(self, srv: Server, model: str):
        super().__init__(daemon=True)
        self.client, self.model = srv.client(), model
        self.chunks: list = []
        self.error: BaseException | None = None
        self.completed = False

    def run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model=self.model,
                max_tokens=1500,
                temperature=1.0,
                messages=[{"role": "user", "content": "Tell me a long story."}],
                stream=True,
            )
            for chunk in stream:
                self.chunks.append(chunk)
            self.completed = True
        except BaseException as e:  # noqa: BLE001 - what the client sees is the point
            self.error = e


def test_server_killed_mid_job_and_mid_stream_loses_nothing(tmp_path_factory, session_home, tiny_model_dir):
    home = make_home(tmp_path_factory, session_home, "server-kill-home")
    first = Server(home, models={TINY: tiny_model_dir}).start()
    second = None
    try:
        c = first.client()
        f = c.files.create(file=("train.jsonl", jsonl(rows(TRAIN_ROWS))), purpose="fine-tune")
        jobs = [
            c.fine_tuning.jobs.create(
                model=TINY, training_file=f.id, seed=3, hyperparameters={"n_epochs": 1, "batch_size": 1}
            )
            for _ in range(2)
        ]
        ckpt = wait_for(lambda: c.fine_tuning.jobs.checkpoints.list(jobs[0].id).data, timeout=300, every=0.05)[0]
        # Chat with that checkpoint (the tiny model: 1500 random tokens stream for seconds).
        streams = [Streamer(first, ckpt.fine_tuned_model_checkpoint) for _ in range(2)]
        for s in streams:
            s.start()
        wait_for(lambda: all(s.chunks or s.error for s in streams), timeout=300, every=0.02)
        assert not any(s.error for s in streams), [repr(s.error) for s in streams]
        before = {j.id: [e["id"] for e in events(home, j.id)] for j in jobs}
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        # Every open stream ends with a connection error, not a hang (the generous
        # join only bounds a failing test) and not a read timeout.
        for s in streams:
            s.join(120)
            assert not s.is_alive(), "a streaming client hung after the server died"
            assert not s.completed and s.error is not None
            assert isinstance(s.error, (httpx.TransportError, openai.APIConnectionError)), repr(s.error)
            assert not isinstance(s.error, (httpx.TimeoutException, openai.APITimeoutError)), repr(s.error)
        # The old worker notices its server is gone and stops; a new server takes over.
        second = Server(home).start()
        c = second.client()
        assert f.id in {x.id for x in c.files.list().data}
        assert c.files.content(f.id).read() == jsonl(rows(TRAIN_ROWS))
        for j in jobs:
            done = wait_for(lambda: (x := c.fine_tuning.jobs.retrieve(j.id)).status in TERMINAL and x, timeout=600)
            assert done.status == "succeeded", done.error
            ev = events(home, j.id)
            ids = [e["id"] for e in ev]
            assert ids[: len(before[j.id])] == before[j.id]  # every earlier event still there, in order
            total = [e["data"]["total_steps"] for e in ev if e["message"].startswith("Fine-tuning started")][-1]
            steps = [e["data"]["step"] for e in ev if e["type"] == "metrics"]
            assert steps == list(range(1, total + 1))  # forward only, none lost or twice
            ckpt_events = [e["data"]["step"] for e in ev if e["message"].startswith("Checkpoint created")]
            assert len(ckpt_events) == len(set(ckpt_events))
            run = home / "runs" / j.id / "checkpoints"
            assert sorted(store_checkpoints(home, j.id)) == sorted(int(p.name.split("-")[1]) for p in run.iterdir())
            assert done.fine_tuned_model in {m.id for m in c.models.list().data}
        assert any(e["message"].startswith("Resumed from the checkpoint") for e in events(home, jobs[0].id))
        with sqlite3.connect(f"file:{home / 'openft.db'}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        first.stop()
        if second:
            second.stop()
