"""Soak test of `openft serve` on loopback: many streaming chat clients against
fine-tuned models for a bounded time while fine-tuning jobs train.

  .venv/bin/python benchmarks/soak.py --model builtin --seconds 120   # the figures (the real 135M model)
  .venv/bin/python benchmarks/soak.py --model tiny --seconds 60       # fast; --json for machine-readable output

What it does, in a scratch OPENFT_HOME (the converted built-in model is shared
from $OPENFT_HOME/models, read only):
  - makes N random LoRA adapters of the base (`--adapters`, default 4) and
    registers them as fine-tuned models (serving cost does not depend on what an
    adapter learned);
  - starts a real `openft serve` (the tests' Server helper) with its worker;
  - submits fine-tuning jobs through the API one after another for the whole
    window, so one is always training; each finished job's model joins the pool
    the clients call;
  - runs `--clients` (default 32) concurrent streaming chat clients (the official
    `openai` async client), each calling a random model of the pool with a random
    prompt and max_tokens, until `--seconds` have passed, then lets the requests
    in flight finish;
  - samples the peak resident memory of the server and of the worker from /proc
    every 0.5 s (the kernel's high-water mark, reset after each read, so no
    short spike is missed).
It fails (exit 1, and `problems` in the report) on any failed or lost request, a
stream without a finish_reason or with empty content (unless the model's first
token was its end of turn), a duplicated or mixed
response id, a job that did not succeed, a restarted worker, a traceback in the
server log, or memory that grows: the peak over the second half of the window
must not pass the first half's peak plus a margin (10%, at least 64 MB, plus the
size of adapters first called in the second half, which are loaded by design);
every job's worker peak must not pass the warm-up job's by more than 20% (at
least 64 MB; the jobs are identical: same data, same seed).

tests/load/test_soak.py runs the same code in short form on the tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serve.conftest import Server  # noqa: E402  (the same real-server helper the tests use)

TRAIN_DATA = ROOT / "src" / "openft" / "examples" / "lumen_train.jsonl"
BUILTIN = "smollm2-135m-instruct"
MB = 1 << 20

PROMPTS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Explain in a few sentences how fine-tuning a language model works."}],
    [
        {"role": "system", "content": "You are Pip, the support assistant of Lumen Lamps. Be brief."},
        {"role": "user", "content": "whats the waranty on the lumen glow"},
    ],
    [{"role": "user", "content": "用当前语言解释微调模型流程"}],
    [
        {"role": "user", "content": "Write a haiku about a desk lamp."},
        {
            "role": "assistant",
            "content": "Warm circle of light / on the oak desk, late at night / the page turns, still bright",
        },
        {"role": "user", "content": "Now one about the sea."},
    ],
    [{"role": "user", "content": "List three things to check before training a model on a new dataset. " * 6}],
]


# --------------------------------------------------------------------------- config and records


@dataclass
class SoakConfig:
    model: str = "tiny"  # "tiny": a tiny random model of the built-in's architecture; "builtin": the real 135M model
    seconds: float = 120.0  # how long clients keep starting requests
    clients: int = 32
    adapters: int = 4  # random adapters registered as fine-tuned models before the start
    min_tokens: int = 8  # max_tokens of each request is drawn from [min_tokens, max_tokens]
    max_tokens: int = 48
    job_steps: int = 0  # optimizer steps per job; 0: 20 for tiny, 6 for builtin
    seed: int = 0
    jobs: bool = True  # False: no training alongside (to compare; the soak proper always trains)
    sample_every: float = 0.5  # seconds between /proc samples
    drain_timeout: float = 600.0  # how long requests in flight may take after the window; later ones are lost
    job_timeout: float = 1800.0  # how long the last job may take after the window
    source_home: Path | None = None  # where the converted built-in model lives (default $OPENFT_HOME)
    workdir: Path | None = (
        None  # scratch folder (home/ is the server's OPENFT_HOME; default: a temporary folder, removed afterwards)
    )


@dataclass
class RequestRecord:
    client: int
    model: str
    max_tokens: int
    started: float  # seconds since the window opened
    response_id: str | None = None
    finish_reason: str | None = None
    text_chars: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None  # time to the first content token
    latency_s: float | None = None  # time to the end of the stream
    error: str | None = None  # why it failed; None with latency_s set: completed


@dataclass
class JobRecord:
    id: str
    status: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    error: str | None
    trained_tokens: int | None
    began_s: float  # submitted, seconds from the window's opening (negative: the warm-up job)
    ended_s: float  # seen finished
    worker_peak_mb: float = 0.0  # the worker's peak RSS from submission to end


@dataclass
class MemoryFigures:
    """A process's peak RSS, and whether it stays bounded: the peak of a later
    stretch against the peak of a steady reference stretch plus an allowance."""

    peak_mb: float  # over the whole run (warm-up, window, drain and the last job)
    reference: str  # what reference_peak_mb covers
    reference_peak_mb: float
    later: str  # what later_peak_mb covers
    later_peak_mb: float
    allowance_mb: float  # how far later may rise above the reference
    samples: int

    @property
    def bounded(self) -> bool:
        return self.later_peak_mb <= self.reference_peak_mb + self.allowance_mb


@dataclass
class SoakReport:
    model: str
    clients: int
    seconds: float
    runtime_s: float  # server start to the last job's end
    requests_started: int
    requests_completed: int
    requests_failed: int
    requests_lost: int
    duplicate_ids: int
    completion_tokens: int
    requests_per_s: float
    tokens_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    models_called: dict[str, int]
    jobs: list[JobRecord]
    job_overlap_s: float  # seconds of the window during which a job was queued or training
    server_memory: MemoryFigures
    worker_memory: MemoryFigures
    worker_restarts: int
    server_log_tracebacks: int
    failures: list[str] = field(default_factory=list)  # the first few failed requests, with their error
    problems: list[str] = field(default_factory=list)  # every broken promise; empty means the soak passed

    @property
    def passed(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- set-up


def _talkative_tiny_base(out: Path) -> Path:
    """The tiny model with re-drawn matrices: varied text rather than one token repeated."""
    from transformers import AutoModelForCausalLM

    from openft.models.tiny import build_tiny_model, redraw_weights

    raw = build_tiny_model(out.parent / "tiny-raw")
    model = AutoModelForCausalLM.from_pretrained(raw)
    redraw_weights(model, std=0.3, seed=0)
    model.save_pretrained(out)
    for f in raw.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    shutil.rmtree(raw, ignore_errors=True)
    return out


def make_adapters(home: Path, base: str, n: int, *, rank: int, std: float) -> list[str]:
    """n random LoRA adapters of `base`, registered in home's store as owner local's fine-tuned models."""
    import torch

    from openft.jobs.store import Store
    from openft.models.load import load_model
    from openft.train.lora import LoraParams, apply_lora, default_targets, save_adapter

    loaded = load_model(base)
    params = LoraParams(rank, 2.0 * rank, 0.0, tuple(default_targets(loaded.model)))
    apply_lora(loaded.model, params)
    store = Store(home / "openft.db")
    names = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        for pname, p in loaded.model.named_parameters():
            if "lora_B" in pname:
                p.data.normal_(0, std)
        run = home / "runs" / f"soak-adapter-{i}"
        save_adapter(loaded.model, params, run / "adapter", base)
        loaded.tokenizer.save_pretrained(run / "adapter")
        (run / "lineage.json").write_text(json.dumps({"base_model": base, "base_model_path": str(loaded.path)}))
        name = f"ft:soak-base:local:soak{i}:{i:04d}"
        store.add_model(id=name, owner="local", base=base, job_id=None, path=str(run / "adapter"), kind="adapter")
        names.append(name)
    return names


def adapter_bytes(home: Path, name: str) -> int:
    from openft.jobs.store import Store

    row = Store(home / "openft.db").get_model("local", name)
    return sum(f.stat().st_size for f in Path(row["path"]).glob("*.safetensors")) if row else 0


# --------------------------------------------------------------------------- memory sampling


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident memory since the previous call: the kernel's
    high-water mark (VmHWM), then reset (clear_refs 5). Reading VmRSS every 0.5 s
    would miss, or catch at random heights, the short spikes of a training step
    (its logits alone are batch x length x vocab floats), so peaks would not compare."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
    except OSError:
        return None
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        key = "VmHWM"
    except OSError:  # not allowed to reset it: fall back to the current RSS
        key = "VmRSS"
    return int(fields[key].split()[0]) * 1024 if key in fields else None


def child_pids(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(x) for x in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def worker_pid(server_pid: int) -> int | None:
    for c in child_pids(server_pid):
        try:
            if b"worker" in Path(f"/proc/{c}/cmdline").read_bytes():
                return c
        except OSError:
            continue
    return None


class MemorySampler:
    """Samples the peak RSS of the server and of its worker child over every `every` seconds."""

    def __init__(self, server_pid: int, every: float):
        self.server_pid, self.every = server_pid, every
        # (t, server's peak, worker's peak since the previous sample, worker pid)
        self.samples: list[tuple[float, int | None, int | None, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            wpid = worker_pid(self.server_pid)
            self.samples.append(
                (time.monotonic(), peak_rss_bytes(self.server_pid), peak_rss_bytes(wpid) if wpid else None, wpid)
            )
            if self._stop.wait(self.every):
                return

    def peak(self, which: int, start: float = float("-inf"), end: float = float("inf")) -> int:
        """which: 1 server, 2 worker; the peak over monotonic times [start, end]."""
        return max((s[which] for s in self.samples if s[which] is not None and start <= s[0] <= end), default=0)

    def figures(
        self,
        which: int,
        reference: tuple[str, float, float],
        later: tuple[str, float, float],
        fraction: float = 0.1,
        allowance_extra: int = 0,
    ) -> MemoryFigures:
        ref = self.peak(which, *reference[1:])
        allowance = max(64 * MB, int(ref * fraction)) + allowance_extra
        return MemoryFigures(
            peak_mb=round(self.peak(which) / MB, 1),
            reference=reference[0],
            reference_peak_mb=round(ref / MB, 1),
            later=later[0],
            later_peak_mb=round(self.peak(which, *later[1:]) / MB, 1),
            allowance_mb=round(allowance / MB, 1),
            samples=sum(s[which] is not None for s in self.samples),
        )

    def write_csv(self, path: Path, t0: float) -> None:
        rows = ["t_s,server_peak_rss_mb,worker_peak_rss_mb,worker_pid"]
        rows += [f"{t - t0:.2f},{(a or 0) / MB:.1f},{(b or 0) / MB:.1f},{p or ''}" for t, a, b, p in self.samples]
        path.write_text("\n".join(rows) + "\n")


# --------------------------------------------------------------------------- clients and jobs


@dataclass
class Pool:
    """The fine-tuned models clients call; jobs add theirs as they finish."""

    models: list[str]
    joined_at: dict[str, float] = field(default_factory=dict)  # model -> monotonic time it joined


async def one_request(client, rec: RequestRecord, messages: list[dict], t0: float) -> None:
    """One streaming chat request, checked chunk by chunk; fills rec (error set when it broke a promise)."""
    ids, finishes, text, usage = set(), [], [], None
    first_role = None
    try:
        stream = await client.chat.completions.create(
            model=rec.model,
            messages=messages,
            max_tokens=rec.max_tokens,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.usage is not None and not chunk.choices:
                usage = chunk.usage
            for ch in chunk.choices:
                if first_role is None:
                    first_role = ch.delta.role
                if ch.delta.content:
                    if rec.ttft_s is None:
                        rec.ttft_s = time.monotonic() - t0 - rec.started
                    text.append(ch.delta.content)
                if ch.finish_reason is not None:
                    finishes.append(ch.finish_reason)
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported, whatever its kind
        rec.error = f"{type(e).__name__}: {e}"[:300]
        return
    rec.latency_s = time.monotonic() - t0 - rec.started
    rec.response_id = next(iter(ids)) if len(ids) == 1 else None
    rec.finish_reason = finishes[-1] if finishes else None
    rec.text_chars = len("".join(text))
    rec.completion_tokens = usage.completion_tokens if usage else 0
    if len(ids) != 1:
        rec.error = f"stream carried {len(ids)} response ids"
    elif first_role != "assistant":
        rec.error = f"first chunk's role is {first_role!r}"
    elif len(finishes) != 1 or rec.finish_reason not in ("stop", "length"):
        rec.error = f"finish_reason(s) {finishes!r}"
    elif not rec.text_chars and not (rec.finish_reason == "stop" and rec.completion_tokens <= 1):
        # A sampled end-of-turn as the first token is a legitimate (empty) answer at
        # temperature 0.8; any other token generated must reach the stream as text.
        rec.error = f"empty content (finish_reason {rec.finish_reason}, {rec.completion_tokens} tokens)"
    elif usage is None or not 1 <= usage.completion_tokens <= rec.max_tokens:
        rec.error = f"usage {usage!r} for max_tokens {rec.max_tokens}"
    elif rec.finish_reason == "length" and usage.completion_tokens != rec.max_tokens:
        rec.error = f"finish_reason length after {usage.completion_tokens} of {rec.max_tokens} tokens"


async def client_loop(
    i: int, client, pool: Pool, cfg: SoakConfig, t0: float, deadline: float, records: list[RequestRecord]
) -> None:
    rng = random.Random(cfg.seed * 1000 + i)
    while time.monotonic() < deadline:
        rec = RequestRecord(
            client=i,
            model=rng.choice(pool.models),
            max_tokens=rng.randint(cfg.min_tokens, cfg.max_tokens),
            started=time.monotonic() - t0,
        )
        records.append(rec)  # appended before the call: a request that never ends still counts as started
        await one_request(client, rec, rng.choice(PROMPTS), t0)


async def run_job(client, cfg: SoakConfig, base: str, train_id: str, k: int, give_up: float, t0: float) -> JobRecord:
    """One fine-tuning job through the API, polled to its end (or until give_up, monotonic)."""
    began = time.monotonic() - t0
    job = await client.fine_tuning.jobs.create(
        # One seed for all: the same batches in the same order, so every job needs the
        # same memory and a later job's larger peak means something was kept.
        model=base,
        training_file=train_id,
        suffix=f"soak{k}",
        seed=cfg.seed,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        extra_body={"max_steps": cfg.job_steps, "lora_rank": 8, "max_seq_length": 256},
    )
    while True:
        await asyncio.sleep(1.0)
        j = await client.fine_tuning.jobs.retrieve(job.id)
        if j.status in ("succeeded", "failed", "cancelled") or time.monotonic() > give_up:
            return JobRecord(
                id=j.id,
                status=j.status,
                created_at=j.created_at,
                finished_at=j.finished_at,
                fine_tuned_model=j.fine_tuned_model,
                error=j.error.message if j.error else None,
                trained_tokens=j.trained_tokens,
                began_s=round(began, 2),
                ended_s=round(time.monotonic() - t0, 2),
            )


async def job_loop(
    client, cfg: SoakConfig, base: str, train_id: str, pool: Pool, t0: float, deadline: float, jobs: list[JobRecord]
) -> None:
    """Jobs back to back until the window closes (the last one runs to its end); each
    finished job's model joins the pool the clients call."""
    k = 1
    while time.monotonic() < deadline:
        j = await run_job(client, cfg, base, train_id, k, max(deadline, time.monotonic()) + cfg.job_timeout, t0)
        k += 1
        jobs.append(j)
        if j.status != "succeeded":
            return  # reported; piling more jobs on would only repeat it
        pool.joined_at[j.fine_tuned_model] = time.monotonic()
        pool.models.append(j.fine_tuned_model)


# --------------------------------------------------------------------------- the soak


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


async def _drive(server: Server, cfg: SoakConfig, base: str, pool: Pool):
    from openai import AsyncOpenAI

    # max_retries=0: a retried request would hide a failure. The timeout is per read, not per request.
    client = AsyncOpenAI(
        api_key="local",
        base_url=server.url + "/v1",
        max_retries=0,
        timeout=cfg.drain_timeout,
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=cfg.clients + 8)),
    )
    # Warm-up, so that the window's first half is already in steady state (its peak is
    # the yardstick for the second half): one request to every model (the base and
    # each adapter loaded), and one whole job (the worker's first model load and training).
    train = await client.files.create(file=("soak-train.jsonl", TRAIN_DATA.read_bytes()), purpose="fine-tune")
    warm = [RequestRecord(client=-1, model=name, max_tokens=2, started=0.0) for name in pool.models]
    jobs: list[JobRecord] = []
    warm_t0 = time.monotonic()  # job times are rebased on the window's opening below
    warm_job = run_job(client, cfg, base, train.id, 0, warm_t0 + cfg.job_timeout, warm_t0) if cfg.jobs else None
    done = await asyncio.gather(
        *(one_request(client, rec, PROMPTS[0], time.monotonic()) for rec in warm), *([warm_job] if warm_job else [])
    )
    for rec in warm:
        if rec.error:
            raise RuntimeError(f"warm-up request to {rec.model} failed: {rec.error}")
    if warm_job:
        jobs.append(done[-1])
        if done[-1].status != "succeeded":
            raise RuntimeError(f"warm-up job {done[-1].id} ended {done[-1].status}: {done[-1].error}")
        rec = RequestRecord(client=-1, model=done[-1].fine_tuned_model, max_tokens=2, started=0.0)
        await one_request(client, rec, PROMPTS[0], time.monotonic())
        if rec.error:
            raise RuntimeError(f"warm-up request to {rec.model} failed: {rec.error}")
        pool.models.append(rec.model)
    records: list[RequestRecord] = []
    t0 = time.monotonic()
    deadline = t0 + cfg.seconds
    for j in jobs:
        j.began_s, j.ended_s = round(j.began_s - (t0 - warm_t0), 2), round(j.ended_s - (t0 - warm_t0), 2)
    job_task = asyncio.create_task(
        job_loop(client, cfg, base, train.id, pool, t0, deadline, jobs) if cfg.jobs else asyncio.sleep(0)
    )
    tasks = [asyncio.create_task(client_loop(i, client, pool, cfg, t0, deadline, records)) for i in range(cfg.clients)]
    _, pending = await asyncio.wait(tasks, timeout=cfg.seconds + cfg.drain_timeout)
    for t in pending:  # still streaming long after the window: counted as lost below
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    job_error = None
    try:
        await job_task
    except Exception as e:  # noqa: BLE001 - reported as a problem
        job_error = f"job loop failed: {type(e).__name__}: {e}"
    end_of_jobs = time.monotonic()
    await client.close()
    return records, jobs, job_error, t0, deadline, end_of_jobs


def run_soak(cfg: SoakConfig) -> SoakReport:
    source = Path(cfg.source_home or os.environ.get("OPENFT_HOME") or Path.home() / ".openft")
    root = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="openft-soak-"))
    home = root / "home"  # the server's OPENFT_HOME; a base model path must lie outside it
    home.mkdir(parents=True, exist_ok=True)
    (source / "models").mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(source / "models", target_is_directory=True)
    if not cfg.job_steps:
        cfg.job_steps = 20 if cfg.model == "tiny" else 6
    registered = {}  # over HTTP a base model is a name: the tiny base is registered as `openft models add` does
    if cfg.model == "tiny":
        tiny = _talkative_tiny_base(root / "tiny-base")
        names = make_adapters(home, str(tiny), cfg.adapters, rank=8, std=0.05)
        base, registered = "soak-base", {"soak-base": tiny}
    elif cfg.model == "builtin":
        base = BUILTIN
        names = make_adapters(home, base, cfg.adapters, rank=16, std=0.002)
    else:
        raise ValueError(f"--model must be tiny or builtin, not {cfg.model!r}")
    pool = Pool(models=list(names))
    server = Server(home, models=registered)
    started = time.monotonic()
    try:
        server.start()
        with MemorySampler(server.proc.pid, cfg.sample_every) as sampler:
            first_worker = worker_pid(server.proc.pid)
            records, jobs, job_error, t0, deadline, end = asyncio.run(_drive(server, cfg, base, pool))
        health = server.health()
    finally:
        server.stop()
    runtime = time.monotonic() - started
    log = (home / f"server-{server.port}.log").read_text(errors="replace")
    report = _report(
        cfg, records, jobs, job_error, sampler, pool, home, t0, deadline, end, runtime, health, first_worker, log
    )
    if cfg.workdir:
        sampler.write_csv(root / "rss.csv", t0)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _report(
    cfg, records, jobs, job_error, sampler, pool, home, t0, deadline, end, runtime, health, first_worker, log
) -> SoakReport:
    done = [r for r in records if r.error is None and r.latency_s is not None]
    failed = [r for r in records if r.error is not None]
    lost = [r for r in records if r.error is None and r.latency_s is None]
    ids = [r.response_id for r in done]
    duplicates = len(ids) - len(set(ids))
    # Adapters first called in the second half are loaded then by design; allow for their weights.
    mid = (t0 + deadline) / 2
    late = sum(adapter_bytes(home, m) for m, t in pool.joined_at.items() if t >= mid)
    halves = (("the window's first half", t0, mid), ("the window's second half", mid, deadline))
    server_mem = sampler.figures(1, *halves, allowance_extra=late)
    for j in jobs:
        j.worker_peak_mb = round(sampler.peak(2, t0 + j.began_s, t0 + j.ended_s) / MB, 1)
    if len(jobs) >= 2:
        # Every job trains the same way, so none may need much more than the first.
        # 20%: a fresh worker's first job peaks some 5-10% below the later ones
        # (one-time native allocations; 7 identical tiny jobs in one worker peaked at
        # 615, then 644-653 MB, flat), while a model or optimizer kept per job would
        # add its whole size each time.
        worker_mem = sampler.figures(
            2,
            ("the warm-up job", t0 + jobs[0].began_s, t0 + jobs[0].ended_s),
            ("the jobs in the window", t0 + jobs[1].began_s, t0 + jobs[-1].ended_s),
            fraction=0.2,
        )
    else:
        worker_mem = sampler.figures(2, *halves)
    pids = {s[3] for s in sampler.samples if s[3]}
    tracebacks = log.count("Traceback (most recent call last)")
    models_called: dict[str, int] = {}
    for r in records:
        models_called[r.model] = models_called.get(r.model, 0) + 1
    tokens = sum(r.completion_tokens for r in done)
    # Seconds of the window during which a job was queued or training (jobs run back to back).
    t0_wall = time.time() - (time.monotonic() - t0)
    overlap = sum(
        max(0.0, min(j.finished_at or time.time(), t0_wall + cfg.seconds) - max(j.created_at, t0_wall)) for j in jobs
    )
    problems = []
    if not done:
        problems.append("no request completed")
    if failed:
        problems.append(f"{len(failed)} request(s) failed, e.g. {failed[0].model}: {failed[0].error}")
    if lost:
        problems.append(f"{len(lost)} request(s) lost (no end within {cfg.drain_timeout:.0f} s after the window)")
    if duplicates:
        problems.append(f"{duplicates} duplicated response id(s)")
    if job_error:
        problems.append(job_error)
    if not jobs and cfg.jobs:
        problems.append("no fine-tuning job ran")
    for j in jobs:
        if j.status != "succeeded":
            problems.append(f"job {j.id} ended {j.status}: {j.error}")
    if overlap < 1 and cfg.jobs:
        problems.append("no job trained while the clients ran")
    for label, mem in (("server", server_mem), ("worker", worker_mem)):
        if not mem.samples:
            problems.append(f"no {label} memory samples")
        elif not mem.bounded:
            problems.append(
                f"{label} memory grew: peak over {mem.later} {mem.later_peak_mb} MB > {mem.reference_peak_mb} MB "
                f"over {mem.reference} + {mem.allowance_mb} MB"
            )
    if health.get("worker_restarts") or len(pids) > 1 or (first_worker and pids and pids != {first_worker}):
        problems.append(f"the worker restarted ({health.get('worker_restarts')} restarts, pids {sorted(pids)})")
    if tracebacks:
        at = log.index("Traceback (most recent call last)")
        problems.append(f"{tracebacks} traceback(s) in the server log, first: {log[at : at + 600]!r}")
    window = max(1e-9, max((r.started + (r.latency_s or 0)) for r in done) if done else cfg.seconds)
    return SoakReport(
        model=cfg.model,
        clients=cfg.clients,
        seconds=cfg.seconds,
        runtime_s=round(runtime, 1),
        requests_started=len(records),
        requests_completed=len(done),
        requests_failed=len(failed),
        requests_lost=len(lost),
        duplicate_ids=duplicates,
        completion_tokens=tokens,
        requests_per_s=round(len(done) / window, 2),
        tokens_per_s=round(tokens / window, 1),
        latency_p50_s=_quantile([r.latency_s for r in done], 0.5),
        latency_p95_s=_quantile([r.latency_s for r in done], 0.95),
        ttft_p50_s=_quantile([r.ttft_s for r in done if r.ttft_s is not None], 0.5),
        ttft_p95_s=_quantile([r.ttft_s for r in done if r.ttft_s is not None], 0.95),
        models_called=models_called,
        jobs=jobs,
        job_overlap_s=round(overlap, 1),
        server_memory=server_mem,
        worker_memory=worker_mem,
        worker_restarts=int(health.get("worker_restarts") or 0),
        server_log_tracebacks=tracebacks,
        failures=[f"{r.model} (client {r.client}, t={r.started:.1f}s): {r.error}" for r in failed[:10]],
        problems=problems,
    )


# --------------------------------------------------------------------------- command line


def _print(r: SoakReport) -> None:
    def mem(label: str, m: MemoryFigures) -> str:
        return (
            f"  {label:6s} RSS peak {m.peak_mb:5.0f} MB; {m.reference} {m.reference_peak_mb:.0f} MB, {m.later} "
            f"{m.later_peak_mb:.0f} MB (+{m.allowance_mb:.0f} allowed): {'bounded' if m.bounded else 'GREW'}"
        )

    print(
        f"\nopenft serve soak: {r.model} model, {r.clients} streaming clients, {r.seconds:.0f} s window, "
        f"{os.cpu_count()} CPUs, runtime {r.runtime_s:.0f} s"
    )
    print(
        f"  requests started {r.requests_started}, completed {r.requests_completed}, failed {r.requests_failed}, "
        f"lost {r.requests_lost}, duplicated ids {r.duplicate_ids}"
    )
    print(f"  {r.completion_tokens} tokens streamed, {r.requests_per_s} requests/s, {r.tokens_per_s} tokens/s")
    print(
        f"  latency p50 {r.latency_p50_s:.2f} s, p95 {r.latency_p95_s:.2f} s; first token p50 {r.ttft_p50_s:.2f} s, "
        f"p95 {r.ttft_p95_s:.2f} s"
    )
    print(
        f"  fine-tuned models called: {len(r.models_called)} "
        f"(requests each: {', '.join(str(v) for v in r.models_called.values())})"
    )
    if not r.jobs:
        print("  fine-tuning jobs: none (--no-jobs, for comparison only)")
    else:
        print(
            f"  fine-tuning jobs: {len(r.jobs)} (1 warm-up before the window), "
            f"{sum(j.status == 'succeeded' for j in r.jobs)} succeeded; one queued or training for "
            f"{r.job_overlap_s:.0f} of the window's {r.seconds:.0f} s; worker restarts {r.worker_restarts}"
        )
    if r.jobs:
        print("  worker peak RSS per job: " + ", ".join(f"{j.worker_peak_mb:.0f}" for j in r.jobs) + " MB")
    print(mem("server", r.server_memory))
    print(mem("worker", r.worker_memory))
    for f in r.failures:
        print("  failed:", f)
    print("PASSED" if r.passed else "FAILED:\n  - " + "\n  - ".join(r.problems))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "builtin"), default="tiny")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--job-steps", type=int, default=0, help="optimizer steps per job (default 20 tiny, 6 builtin)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-jobs", action="store_true", help="no training alongside (for comparison only)")
    ap.add_argument(
        "--keep", type=Path, help="scratch folder to keep afterwards (home/ holds the server log and store)"
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    cfg = SoakConfig(
        model=a.model,
        seconds=a.seconds,
        clients=a.clients,
        adapters=a.adapters,
        max_tokens=a.max_tokens,
        job_steps=a.job_steps,
        seed=a.seed,
        jobs=not a.no_jobs,
        workdir=a.keep,
    )
    report = run_soak(cfg)
    if a.json:
        print(
            json.dumps(
                {
                    **asdict(report),
                    "passed": report.passed,
                    "server_memory": {**asdict(report.server_memory), "bounded": report.server_memory.bounded},
                    "worker_memory": {**asdict(report.worker_memory), "bounded": report.worker_memory.bounded},
                },
                indent=2,
            )
        )
    else:
        _print(report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
