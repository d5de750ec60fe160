"""A worker's eval runs: claim one, run it through the serving engine, store its
output items a chunk at a time under the run's lease, then its counts.

The engine is the server's own (`openft.serve.engine.Engine`): the same forward,
adapters, chat template and stop tokens the API answers with, with a chunk's
prompts decoded as one batch. It is made on the first run and kept for the next.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from pathlib import Path

from openft.eval.evals import EvalSpecError, check_items, parse_criteria, parse_run_source, rows_from_jsonl
from openft.eval.graders import GradeContext, GraderError, JudgeError, JudgeReply
from openft.eval.runs import DEFAULT_MAX_TOKENS, Generated, chunk_rows, summarise
from openft.jobs.store import Store, now

log = logging.getLogger("openft.worker")
CHUNK = 16  # items per batch of prompts, per write, and between checks for a cancel


class EngineSampler:
    """Samples and judges for one owner's run through one engine."""

    def __init__(self, engine_fn, store: Store, owner: str):
        # the engine is made on first use: a jsonl run graded by string checks never loads a model
        self._engine_fn, self.store, self.owner = engine_fn, store, owner

    @property
    def engine(self):
        return self._engine_fn()

    def _handle(self, model: str):
        from openft.serve.errors import APIError
        from openft.serve.models import resolve_handle

        try:
            return resolve_handle(self.store, self.owner, model)
        except APIError as e:
            raise JudgeError(f"model {model!r}: {e.message}") from None

    def sample(self, model: str, conversations: list[list[dict]], sampling: dict) -> list[Generated]:
        from openft.serve.graders import sampling_params

        handle = self._handle(model)
        params = sampling_params(sampling, DEFAULT_MAX_TOKENS)
        prompts = [self.engine.apply_chat_template(handle, msgs) for msgs in conversations]

        async def all_at_once():  # the engine batches requests that arrive together
            return await asyncio.gather(*(self.engine.complete(handle, ids, params) for ids in prompts))

        out = []
        for choices, usage in asyncio.run(all_at_once()):
            text, reason = choices[0]
            out.append(Generated(text, reason, usage.prompt_tokens, usage.completion_tokens))
        return out

    def judge(self, model: str, messages: list[dict], sampling: dict) -> JudgeReply:
        from openft.serve.graders import reply_of

        gen = self.sample(model, [messages], sampling)[0]
        return reply_of(model, gen.text, gen.prompt_tokens, gen.completion_tokens)


class EvalRunner:
    def __init__(self, store: Store):
        self.store = store
        self._engine = None

    def engine(self):
        if self._engine is None:
            from openft.serve.engine import Engine

            self._engine = Engine()
            self._engine.start()
        return self._engine

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.stop()

    def run(self, run: dict) -> None:
        lease = (run["worker_id"], run["attempts"])
        try:
            self._run(run, lease)
        except (EvalSpecError, GraderError) as e:
            self._finish(run, lease, "failed", error={"code": "invalid_run", "message": f"{e.param}: {e.message}"})
        except Exception as e:  # a run that fails must say why, and the worker goes on
            log.error("eval run %s failed:\n%s", run["id"], traceback.format_exc())
            self._finish(run, lease, "failed", error={"code": "internal_error", "message": f"{type(e).__name__}: {e}"})

    def _items(self, run: dict, item_schema: dict, source) -> list[dict]:
        if source.source["type"] == "file_content":
            rows = source.source["content"]
        else:
            f = self.store.get_file(run["owner"], source.source["id"])
            if f is None:
                raise EvalSpecError("data_source.source.id", f"no such file: {source.source['id']}")
            rows = rows_from_jsonl(Path(f["path"]).read_text(encoding="utf-8"), "data_source.source.id")
        return check_items(rows, item_schema, "data_source.source.content")

    def _run(self, run: dict, lease: tuple[str, int]) -> None:
        ev = self.store.get_eval(None, run["eval_id"])
        if ev is None:
            raise EvalSpecError("eval_id", "the eval was deleted")
        criteria = parse_criteria(ev["testing_criteria"])
        source = parse_run_source(run["data_source"])
        items = self._items(run, ev["data_source_config"]["schema"]["properties"]["item"], source)
        sampler = EngineSampler(self.engine, self.store, run["owner"])
        from openft.eval.scores import Embedder

        ctx = GradeContext(judge=sampler.judge, embedder=Embedder())
        done = {r["datasource_item_id"] for r in self.store.all_output_items(run["id"])}
        pending = [(i, e) for i, e in enumerate(items) if i not in done]
        for start in range(0, len(pending), CHUNK):
            current = self.store.get_eval_run(None, None, run["id"])
            if current is None or current["status"] != "in_progress":
                return  # cancelled or deleted: stop between chunks
            rows = chunk_rows(source, criteria, pending[start : start + CHUNK], sampler.sample, ctx)
            for r in rows:
                r.update(run_id=run["id"], eval_id=run["eval_id"])
                r.pop("errored")
            if not self.store.add_output_items(rows, lease):
                return  # the lease was lost (taken over, cancelled): write nothing more
        summary = summarise(criteria, self.store.all_output_items(run["id"]), source.model)
        self._finish(run, lease, "completed", **summary)

    def _finish(self, run: dict, lease: tuple[str, int], status: str, **values) -> None:
        self.store.update_eval_run(
            run["id"], expect_status=("in_progress",), lease=lease, status=status, finished_at=now(), **values
        )


def requeue_stale_runs(store: Store, gone) -> list[str]:
    """Runs in progress whose worker is gone (`gone(worker_id)`) go back to the
    queue; their stored items are kept, and the next worker grades only the rest."""
    moved = []
    for run in store.eval_runs_in("in_progress"):
        if not gone(run["worker_id"]):
            continue
        lease = (run["worker_id"], run["attempts"])
        if store.update_eval_run(run["id"], expect_status=("in_progress",), lease=lease, status="queued"):
            moved.append(run["id"])
    return moved
