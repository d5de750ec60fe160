"""Serving and start-up figures for `openft serve` on one model, with a
plain transformers `generate` baseline measured in the same run.

The model: `--model NAME`, a built-in, a registered name or a path (as
openft.models.registry.resolve takes it; default the built-in
smollm2-135m-instruct). A name that is not a built-in is served under the name
`bench-base`, registered in the benchmark's scratch home.

Commands (run from the repository root; OPENFT_HOME must hold the converted
built-in model, e.g. OPENFT_HOME=.openft-home):

  .venv/bin/python benchmarks/serve_bench.py            # full run (~10 min on a quiet 2-core machine)
  .venv/bin/python benchmarks/serve_bench.py --quick    # under 2 minutes
  .venv/bin/python benchmarks/serve_bench.py --json     # one JSON object on stdout (table on stderr)
  .venv/bin/python benchmarks/serve_bench.py --device cuda   # GPU: bf16 server and baseline
  .venv/bin/python benchmarks/serve_bench.py --quick --cpu-isa avx2   # as a CPU without AVX512/AMX

Workload. Prompts are chat conversations built from rows of
../shared/datasets/alpaca_en_demo.json: earlier rows as previous user/assistant
turns, a last row as the question, grown until the templated prompt has about
--prompt-tokens tokens (300 by default, 120 with --quick), each client a
different conversation. Greedy, --max-tokens new tokens at most (128; 24 with
--quick); answers may stop earlier at the end-of-turn token, and every rate
below counts the tokens actually produced. Why the answer length matters:
prefill is compute-bound on both sides (the server cannot do a prompt's
FLOPs faster than plain generate), so batching gains only on decoding; with
P the serial time of a prompt's prefill and D of its decoding, the best
aggregate ratio is (P + D) / (P + D/k) for a batch k times as efficient as
batch 1. 300-token prompts with 64-token answers cap it near 3.5x here.

Adapters: 8 LoRA adapters as openft training writes them by default (r=16,
alpha=32, every linear layer of the decoder; random B so each adapter differs:
serving cost does not depend on what an adapter learned), registered as
fine-tuned models in a scratch OPENFT_HOME.

openft side: a real `openft serve --max-batch-size 16` on loopback (the same
`Server` helper the tests use), driven by the official `openai` async client,
streaming, N concurrent clients for N in 1, 4, 16, each sending one request (N=1:
the baseline's prompts one after another: all 16, or 3 with --quick). Once with every client on one adapter, once
with clients spread over 4 different adapters (round robin; --quick: 16 clients only).

Baseline: plain transformers `model.generate` (greedy, batch 1, the adapter
applied unmerged with openft's LoraLinear: the baseline of the serving targets) serving the
16-client phase's 16 requests one at a time (--quick: the first 3), in this
process after the server has stopped; in fp32 and, where bf16 measured faster
(openft.autoprecision, the decision `auto` takes), again in bf16 (--device cuda: bf16 only). Each ratio
takes the better baseline figure: the faster aggregate, the lower TTFT.

The server runs at `--precision` (auto by default: bf16 where it measured at
least 1.2x fp32's matmul rate here, fp32 elsewhere; the figures record which as
server_precision).

Figures (keys of --json):
  - ttft_p50_s / ttft_p95_s per phase: time from sending the request to the first
    streamed content; baseline TTFT: generate() call to its first new token.
    ttft_ratio = openft p50 TTFT at 1 client / the lower baseline p50 TTFT (target <= 1.2).
  - per_stream_tps: per request, (tokens - 1) / (time of last token - time of
    first token), averaged; aggregate_tps: all tokens of the phase / its wall time.
    Baseline aggregate = its tokens / its total time (serial: concurrency does
    not change it). aggregate_16_ratio = openft aggregate at 16 clients on one
    adapter / baseline aggregate (target >= 4).
  - mixed_adapters_ratio = aggregate at 16 clients on 4 adapters / on 1 adapter (target >= 0.9).
  - adapters8_memory_ratio = API-process RSS (VmRSS) with the base model and 8
    adapters loaded / API-process RSS with only the base model loaded, both
    measured on a fresh server at rest after short requests (one to the base,
    then one to each adapter), so batch buffers of a long run do not count (target <= 1.1).
  - load_s: `openft.models.load.load_for_serving(MODEL)` (what
    the server runs: openft's own Llama forward and tokenizer) wall time in a
    fresh process that has imported torch (everything else it imports counts);
    load_cold_s: the same process from interpreter start. Target load_s <= 2.
    load_transformers_s: the same for `load_model` (transformers' classes, which
    training uses), for reference.
  - first_answer_s: from spawning `openft serve` to the first complete
    /v1/chat/completions answer (built-in model, 1 token); listen_s: to the first
    accepted connection. Target first_answer_s <= 5. Measured on the second start
    in the benchmark's home: first_answer_new_home_s is the first, which also
    measures the machine's precision and writes the bf16 weight cache
    (openft.models.weightcache), as a user's first `openft serve` does once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from figures import add_isa_flag, cap_isa, machine  # noqa: E402
from serve.conftest import Server  # noqa: E402  (the same real-server helper the tests use)

BUILTIN = "smollm2-135m-instruct"
# The served base model's name (--model): the built-in as given, else the name it is
# registered under in the benchmark's scratch home (see bench_model).
MODEL = BUILTIN
BENCH_NAME = "bench-base"
DATASET = ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json"
N_ADAPTERS = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- workload


def _row_text(row: dict) -> str:
    return row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")


def prompt_length(tok, messages: list[dict]) -> int:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def make_prompts(tok, n: int, target_tokens: int) -> list[list[dict]]:
    """n different conversations of about target_tokens templated tokens each."""
    rows = json.loads(DATASET.read_text())
    prompts, i = [], 0
    for _ in range(n):
        messages: list[dict] = [{"role": "system", "content": "You are a helpful assistant."}]
        while True:
            row = rows[i % len(rows)]
            i += 1
            question = [{"role": "user", "content": _row_text(row)}]
            if prompt_length(tok, messages + question) >= target_tokens or len(messages) > 40:
                prompts.append(messages + question)
                break
            messages += question + [{"role": "assistant", "content": row["output"]}]
    return prompts


def make_adapters(home: Path, n: int) -> list[str]:
    import torch

    from openft.jobs.store import Store
    from openft.models.load import load_model
    from openft.train.lora import LoraParams, apply_lora, default_targets, save_adapter

    loaded = load_model(MODEL)
    # openft's training defaults: r=16, alpha=2r, every linear layer of the decoder.
    params = LoraParams(16, 32.0, 0.0, tuple(default_targets(loaded.model)))
    apply_lora(loaded.model, params)
    store = Store(home / "openft.db")
    names = []
    for i in range(n):
        torch.manual_seed(i)
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.002)
        run = home / "runs" / f"bench-{i}"
        save_adapter(loaded.model, params, run / "adapter", MODEL)
        loaded.tokenizer.save_pretrained(run / "adapter")  # as training does
        (run / "lineage.json").write_text(json.dumps({"base_model": MODEL, "base_model_path": str(loaded.path)}))
        name = f"ft:{MODEL}:local:bench{i}:{i:04d}"
        store.add_model(id=name, owner="local", base=MODEL, job_id=None, path=str(run / "adapter"), kind="adapter")
        names.append(name)
    return names


# --------------------------------------------------------------------------- measurement


@dataclass
class Phase:
    clients: int
    adapters: int
    requests: int
    tokens: int
    wall_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    per_stream_tps: float
    aggregate_tps: float


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarise(clients: int, adapters: int, results: list[tuple[float, float, int, float]], wall: float) -> Phase:
    """results: (ttft, time of last token, tokens, start offset) per request."""
    ttfts = [r[0] for r in results]
    streams = [(r[2] - 1) / (r[1] - r[0]) for r in results if r[2] > 1 and r[1] > r[0]]
    tokens = sum(r[2] for r in results)
    return Phase(
        clients,
        adapters,
        len(results),
        tokens,
        wall,
        statistics.median(ttfts),
        _p(ttfts, 0.95),
        statistics.mean(streams) if streams else 0.0,
        tokens / wall,
    )


async def one_stream(client, model: str, messages: list[dict], max_tokens: int) -> tuple[float, float, int, float]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter() - t0
            first = last if first is None else first
            pieces += 1
        if chunk.usage:
            n = chunk.usage.completion_tokens
    n = n or pieces  # llama_cpp.server sends no usage chunk: one content chunk per token
    end = time.perf_counter() - t0
    return (first if first is not None else end), (last if last is not None else end), n, t0


async def run_phase(
    client, models: list[str], prompts: list[list[dict]], max_tokens: int, sequential: bool = False
) -> tuple[list, float]:
    t0 = time.perf_counter()
    if sequential:
        results = [await one_stream(client, m, p, max_tokens) for m, p in zip(models, prompts)]
    else:
        results = await asyncio.gather(*(one_stream(client, m, p, max_tokens) for m, p in zip(models, prompts)))
    return list(results), time.perf_counter() - t0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure_load(env: dict, fn: str = "load_for_serving", dtype: str = "float32") -> tuple[float, float]:
    code = (
        "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter()\n"
        f"from openft.models.load import {fn}\n"
        f"{fn}({MODEL!r}, dtype=torch.{dtype}); t2 = time.perf_counter()\n"
        "print(t2 - t1, t2 - t0)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    load_s, cold_s = map(float, out.stdout.split()[-2:])
    return load_s, cold_s


def first_answer(home: Path, env: dict, precision: str) -> tuple[Server, float, float]:
    """Spawn `openft serve` and poll until it answers a chat completion; the server keeps running."""
    import httpx

    server = Server(home)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    server.proc = subprocess.Popen(
        [sys.executable, "-m", "openft.cli", "serve", "--port", str(server.port), "--precision", precision],
        env={**env, "OPENFT_HOME": str(home)},
        stdout=server.log,
        stderr=subprocess.STDOUT,
    )
    listen = None
    while time.perf_counter() - t0 < 300:
        if listen is None:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                listen = time.perf_counter() - t0
            except OSError:
                if server.proc.poll() is not None:
                    raise RuntimeError(
                        "server exited: " + (home / f"server-{server.port}.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.02)
                continue
        try:
            r = httpx.post(
                server.url + "/v1/chat/completions", json=body, timeout=120, headers={"Authorization": "Bearer local"}
            )
            if r.status_code == 200:
                return server, listen, time.perf_counter() - t0
            raise RuntimeError(f"first request failed: {r.status_code} {r.text[:300]}")
        except httpx.TransportError:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    "server exited: " + (home / f"server-{server.port}.log").read_text()[-2000:]
                ) from None
            time.sleep(0.02)
    raise RuntimeError("server never answered")


def memory(server: Server, names: list[str]) -> tuple[float, float]:
    from openai import OpenAI

    client = OpenAI(api_key="local", base_url=server.url + "/v1", max_retries=0, timeout=300)
    ask = [{"role": "user", "content": "Hello"}]
    client.chat.completions.create(model=MODEL, messages=ask, max_tokens=4, temperature=0)
    time.sleep(1.0)
    base = rss_mb(server.proc.pid)
    for name in names:
        client.chat.completions.create(model=name, messages=ask, max_tokens=4, temperature=0)
    time.sleep(1.0)
    return base, rss_mb(server.proc.pid)


class _FirstToken:
    """A generate() streamer that records when the first new token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def baseline(adapter_dir: Path, prompts: list[list[dict]], max_tokens: int, device: str, precision: str) -> dict:
    import torch

    from openft.models.load import load_model
    from openft.train.lora import load_adapter

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    loaded = load_model(MODEL, dtype=dtype)
    model = loaded.model.to(device)
    load_adapter(model, adapter_dir)
    model.to(device, dtype)
    tok = loaded.tokenizer
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    ttfts, tokens, total = [], 0, 0.0
    with torch.inference_mode():
        for i, messages in enumerate([prompts[0]] + prompts):  # the first is a warm-up
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            streamer = _FirstToken()
            t0 = time.perf_counter()
            out = model.generate(
                **enc,
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
                streamer=streamer,
            )
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if i == 0:
                continue
            ttfts.append((streamer.first or time.perf_counter()) - t0)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
            total += dt
    return {
        "precision": precision,
        "requests": len(prompts),
        "tokens": tokens,
        "wall_s": total,
        "aggregate_tps": tokens / total,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": _p(ttfts, 0.95),
        "per_stream_tps": tokens / total,
    }


# --------------------------------------------------------------------------- main


async def drive(
    server: Server, names: list[str], prompts: list[list[dict]], max_tokens: int, quick: bool, n_serial: int
) -> list[Phase]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="local", base_url=server.url + "/v1", max_retries=0, timeout=1200)
    # Warm up: load the base and the 4 adapters, so no phase pays a load.
    for name in names[:4]:
        await one_stream(client, name, [{"role": "user", "content": "Hi"}], 2)
    phases = []
    # One client, one request at a time, on the same prompts as the serial baseline
    # (so the TTFT medians compare the same prompt lengths).
    res, wall = await run_phase(client, [names[0]] * n_serial, prompts[:n_serial], max_tokens, sequential=True)
    phases.append(summarise(1, 1, res, wall))
    log(f"  1 client: {phases[-1]}")
    for n in (4, 16):
        res, wall = await run_phase(client, [names[0]] * n, prompts[:n], max_tokens)
        phases.append(summarise(n, 1, res, wall))
        log(f"  {n} clients, 1 adapter: {phases[-1]}")
        if quick and n < 16:
            continue
        res, wall = await run_phase(client, [names[i % 4] for i in range(n)], prompts[:n], max_tokens)
        phases.append(summarise(n, 4, res, wall))
        log(f"  {n} clients, 4 adapters: {phases[-1]}")
    return phases


# --------------------------------------------------------------------------- llama.cpp peer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llamacpp_peer(run_dir: Path, prompts: list[list[dict]], max_tokens: int, n_serial: int, quant: str) -> dict:
    """The adapter of `run_dir` merged into one GGUF (openft's export) and served by
    llama.cpp's own OpenAI-compatible server (llama_cpp.server, one request at a
    time as it serves them), driven by the same client code on the same prompts."""
    from openft.export.formats import export_as

    gguf = run_dir.parent / f"{run_dir.name}-{quant}.gguf"
    export_as("gguf", run_dir, gguf, quant=quant)
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "peer",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", str(os.cpu_count()),
           # Its default lets each new request cut off the stream before it: 16 clients would get nothing.
           "--interrupt_requests", "False"]  # fmt: skip
    # Its load log goes to a file: a pipe nobody reads fills, and the server stalls on it.
    errors = open(run_dir.parent / "llamacpp-server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, text=True)
    try:
        wait_listening(port, proc, errors)
        return asyncio.run(drive_peer(f"http://127.0.0.1:{port}/v1", prompts, max_tokens, n_serial)) | {"quant": quant}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        errors.close()


def wait_listening(port: int, proc: subprocess.Popen, log_file, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_file.seek(0)
            raise SystemExit(f"llama_cpp.server exited: {log_file.read()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)  # a port coming up sends no event to wait on
    raise SystemExit("llama_cpp.server did not listen within 300 s")


async def drive_peer(url: str, prompts: list[list[dict]], max_tokens: int, n_serial: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="none", base_url=url, max_retries=0, timeout=1200)
    await one_stream(client, "peer", [{"role": "user", "content": "Hi"}], 2)  # warm up
    res, wall = await run_phase(client, ["peer"] * n_serial, prompts[:n_serial], max_tokens, sequential=True)
    one = summarise(1, 1, res, wall)
    log(f"  llama.cpp, 1 client: {one}")
    res, wall = await run_phase(client, ["peer"] * 16, prompts[:16], max_tokens)
    sixteen = summarise(16, 1, res, wall)
    log(f"  llama.cpp, 16 clients: {sixteen}")
    return {"one": asdict(one), "sixteen": asdict(sixteen)}


def bench_weights(model: str) -> Path:
    """The safetensors directory of `model` (a built-in, registered name or path,
    as openft.models.registry.resolve takes it), converted once where it is a GGUF."""
    from openft.models.load import materialise
    from openft.models.registry import resolve

    return materialise(resolve(model))


def bench_model(model: str, weights: Path) -> str:
    """The name the server is asked for: a built-in's own, else `weights` registered
    under BENCH_NAME in the scratch home (the server serves base models by name only)."""
    from openft.models import registry

    if model in registry.BUILTINS:
        return model
    registry.add(weights, BENCH_NAME)
    return BENCH_NAME


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter prompts and answers, fewer baseline requests")
    ap.add_argument("--json", action="store_true", help="print one JSON object (the table goes to stderr)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--prompt-tokens", type=int)
    ap.add_argument("--baseline-requests", type=int)
    ap.add_argument("--model", default=BUILTIN, help=f"a built-in, registered name or path (default {BUILTIN})")
    ap.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="the server's --precision (auto: bf16 where it measured faster, openft.autoprecision)",
    )
    ap.add_argument(
        "--llamacpp",
        metavar="QUANT",
        help="also serve the same model with llama.cpp (openft's GGUF export at QUANT, e.g. f16) as a peer",
    )
    add_isa_flag(ap)
    args = ap.parse_args()
    cap_isa(args.cpu_isa)  # re-runs this benchmark capped (server and baseline alike)
    max_tokens = args.max_tokens or (24 if args.quick else 128)
    prompt_tokens = args.prompt_tokens or (120 if args.quick else 300)
    # The serial baseline runs the same prompts as the 16-client phase (the same
    # work, so aggregate rates compare like with like); --quick runs 3 of them.
    n_base = args.baseline_requests or (3 if args.quick else 16)

    import torch

    env = dict(os.environ)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the server picks CUDA by itself when it sees one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    # A terminated benchmark still stops the servers it started (the finally blocks below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    src_home = Path(os.environ.get("OPENFT_HOME", Path.home() / ".openft"))
    os.environ["OPENFT_HOME"] = str(src_home)
    weights = bench_weights(args.model)  # in the source home: a GGUF converts once, there
    home = Path(tempfile.mkdtemp(prefix="openft-bench-"))
    (home / "models").symlink_to((src_home / "models").resolve(), target_is_directory=True)
    if (src_home / "builtins").is_dir():  # pulled built-ins' GGUFs: the conversions above were made from them
        (home / "builtins").symlink_to((src_home / "builtins").resolve(), target_is_directory=True)
    env["OPENFT_HOME"] = os.environ["OPENFT_HOME"] = str(home)
    global MODEL
    MODEL = bench_model(args.model, weights)
    t_start = time.perf_counter()
    result: dict = {
        "device": args.device,
        "model": args.model,
        "max_tokens": max_tokens,
        "prompt_tokens_target": prompt_tokens,
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "machine": machine(),
    }
    try:
        log("adapters and prompts ...")
        names = make_adapters(home, N_ADAPTERS)
        from transformers import AutoTokenizer

        from openft.models.templates import apply_template

        tok = AutoTokenizer.from_pretrained(weights)
        # The template the server renders with (a base without one, Gemma 3 270M: its family's).
        apply_template(tok, json.loads((weights / "config.json").read_text()))
        prompts = make_prompts(tok, 16, prompt_tokens)
        lengths = [prompt_length(tok, p) for p in prompts]
        result["prompt_tokens_mean"] = statistics.mean(lengths)
        log("start-up: spawn openft serve in the new home, first answer ...")
        server, _, result["first_answer_new_home_s"] = first_answer(home, env, args.precision)
        try:
            result["server_precision"] = server.health()["precision"]
        finally:
            server.stop()  # its exit waits for the weight cache to be written
        log("start-up: load_for_serving and load_model in fresh processes ...")
        dtype = "bfloat16" if result["server_precision"] == "bf16" else "float32"
        result["load_s"], result["load_cold_s"] = measure_load(env, dtype=dtype)
        result["load_transformers_s"], result["load_transformers_cold_s"] = measure_load(env, "load_model", dtype)
        log("start-up: spawn openft serve again, first answer ...")
        server, result["listen_s"], result["first_answer_s"] = first_answer(home, env, args.precision)
        try:
            result["rss_base_mb"], result["rss_8_adapters_mb"] = memory(server, names)
        finally:
            server.stop()
        result["adapters8_memory_ratio"] = result["rss_8_adapters_mb"] / result["rss_base_mb"]
        log("throughput: openft serve --max-batch-size 16 ...")
        server = Server(home, "--max-batch-size", "16", "--no-worker", "--precision", args.precision).start()
        try:
            phases = asyncio.run(drive(server, names, prompts, max_tokens, args.quick, n_base))
        finally:
            server.stop()
        # The baseline runs in every precision this machine runs fast (fp32, and bf16
        # where it measured faster: openft.autoprecision), and each ratio takes its better figure.
        from openft.autoprecision import resolve_precision

        cpu_bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
        precisions = ["bf16"] if args.device == "cuda" else (["fp32", "bf16"] if cpu_bf16 else ["fp32"])
        baselines = {}
        for precision in precisions:
            log(f"baseline: plain transformers generate in {precision}, one request at a time ...")
            baselines[precision] = baseline(
                home / "runs" / "bench-0" / "adapter", prompts[:n_base], max_tokens, args.device, precision
            )
        if args.llamacpp:
            log(f"peer: llama.cpp's server on the {args.llamacpp} GGUF export ...")
            result["llamacpp"] = llamacpp_peer(home / "runs" / "bench-0", prompts, max_tokens, n_base, args.llamacpp)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    by = {(p.clients, p.adapters): p for p in phases}
    result["phases"] = [asdict(p) for p in phases]
    base = max(baselines.values(), key=lambda b: b["aggregate_tps"])  # the faster baseline
    result["baselines"] = baselines
    result["baseline"] = base
    result["aggregate_16_ratio"] = by[16, 1].aggregate_tps / base["aggregate_tps"]
    result["mixed_adapters_ratio"] = by[16, 4].aggregate_tps / by[16, 1].aggregate_tps
    result["ttft_ratio"] = by[1, 1].ttft_p50_s / min(b["ttft_p50_s"] for b in baselines.values())
    result["wall_s"] = time.perf_counter() - t_start

    out = sys.stderr if args.json else sys.stdout
    print(
        f"\nopenft serve ({result['server_precision']}), built-in model, {args.device}, "
        f"prompts ~{result['prompt_tokens_mean']:.0f} tokens, "
        f"max_tokens={max_tokens}, greedy, {os.cpu_count()} CPUs",
        file=out,
    )
    print(
        f"  {'phase':34s} {'TTFT p50':>9s} {'TTFT p95':>9s} {'per-stream tok/s':>17s} {'aggregate tok/s':>16s}",
        file=out,
    )
    rows = [(f"baseline generate {b['precision']}, serial ({b['requests']} req)", b) for b in baselines.values()] + [
        (f"openft, {p.clients:2d} clients, {p.adapters} adapter{'s' if p.adapters > 1 else ''}", asdict(p))
        for p in phases
    ]
    for label, r in rows:
        print(
            f"  {label:34s} {r['ttft_p50_s'] * 1000:7.0f}ms {r['ttft_p95_s'] * 1000:7.0f}ms "
            f"{r['per_stream_tps']:17.1f} {r['aggregate_tps']:16.1f}",
            file=out,
        )
    targets = [
        (f"aggregate at 16 clients / serial baseline ({base['precision']})", result["aggregate_16_ratio"], ">= 4.0"),
        ("16 clients: 4 adapters mixed / 1 adapter", result["mixed_adapters_ratio"], ">= 0.9"),
        ("TTFT at 1 client / the baselines' lower TTFT", result["ttft_ratio"], "<= 1.2"),
        (
            f"RSS 8 adapters / base only ({result['rss_8_adapters_mb']:.0f} / {result['rss_base_mb']:.0f} MB)",
            result["adapters8_memory_ratio"],
            "<= 1.1",
        ),
        ("server's model load after `import torch` (s)", result["load_s"], "<= 2"),
        ("spawn openft serve -> first chat answer (s)", result["first_answer_s"], "<= 5"),
    ]
    for label, value, target in targets:
        print(f"  {label:58s} {value:7.2f}   target {target}", file=out)
    print(
        f"  (the first start in a new home, which measures the precision and casts the weights once: "
        f"{result['first_answer_new_home_s']:.2f} s to the first answer)",
        file=out,
    )
    if "llamacpp" in result:
        print_peer(result, by, out)
    print(
        f"  (server's load from interpreter start {result['load_cold_s']:.2f} s; with transformers' classes "
        f"{result['load_transformers_s']:.2f} s after torch, {result['load_transformers_cold_s']:.2f} s cold; "
        f"server listening after "
        f"{result['listen_s']:.2f} s; benchmark wall {result['wall_s']:.0f} s)",
        file=out,
    )
    if args.json:
        print(json.dumps(result))


def print_peer(result: dict, by: dict, out) -> None:
    """openft against llama.cpp on the same prompts: one stream, 16 clients, TTFT."""
    peer = result["llamacpp"]
    one, sixteen = peer["one"], peer["sixteen"]
    result["vs_llamacpp"] = {
        "one_stream": by[1, 1].per_stream_tps / one["per_stream_tps"],
        "sixteen_clients": by[16, 1].aggregate_tps / sixteen["aggregate_tps"],
        "ttft": by[1, 1].ttft_p50_s / one["ttft_p50_s"],
    }
    print(f"  llama.cpp ({peer['quant']} GGUF, llama_cpp.server):", file=out)
    for label, r in (("1 client", one), ("16 clients", sixteen)):
        print(f"    {label:32s} {r['ttft_p50_s'] * 1000:7.0f}ms {r['ttft_p95_s'] * 1000:7.0f}ms "
              f"{r['per_stream_tps']:17.1f} {r['aggregate_tps']:16.1f}", file=out)  # fmt: skip
    v = result["vs_llamacpp"]
    print(f"  openft / llama.cpp: one stream {v['one_stream']:.2f}x, 16 clients (aggregate) {v['sixteen_clients']:.2f}x "
          f"(higher is better), TTFT {v['ttft']:.2f}x (lower is better)", file=out)  # fmt: skip


if __name__ == "__main__":
    main()
