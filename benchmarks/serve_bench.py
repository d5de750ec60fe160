"""Serving figures for `openft serve` on the built-in model, with a plain
transformers `generate` baseline measured in the same run.

  .venv/bin/python benchmarks/serve_bench.py [--max-tokens 64] [--adapters 8]

It makes N LoRA adapters for the built-in model (random, r=16, all linear
layers: serving cost does not depend on what an adapter learned), registers them
as fine-tuned models in a scratch OPENFT_HOME, starts a real server on loopback
and drives it with the official `openai` client:
  - one stream: time to first token and tokens/s;
  - 8 concurrent streams on one adapter, and on 4 different adapters: aggregate tokens/s;
  - server RSS with 1 and with 8 adapters loaded.
Baseline: plain `model.generate` (greedy, batch 1) on the same prompt, unmerged
LoRA via our adapter, in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve.conftest import Server  # noqa: E402  (the same real-server helper the tests use)

PROMPT = [{"role": "user", "content": "Explain in a few sentences how fine-tuning a language model works."}]


def make_adapters(home: Path, n: int) -> list[str]:
    from openft.jobs.store import Store
    from openft.models.load import load_model
    from openft.train.lora import LoraParams, apply_lora, default_targets, save_adapter

    loaded = load_model("smollm2-135m-instruct")
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
        save_adapter(loaded.model, params, run / "adapter", "smollm2-135m-instruct")
        loaded.tokenizer.save_pretrained(run / "adapter")
        (run / "lineage.json").write_text(json.dumps({"base_model": "smollm2-135m-instruct",
                                                      "base_model_path": str(loaded.path)}))
        name = f"ft:smollm2-135m-instruct:local:bench{i}:{i:04d}"
        store.add_model(id=name, owner="local", base="smollm2-135m-instruct", job_id=None,
                        path=str(run / "adapter"), kind="adapter")
        names.append(name)
    return names


async def one_stream(client, model: str, max_tokens: int) -> tuple[float, int, float]:
    t0 = time.perf_counter()
    first = None
    n = 0
    stream = await client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens,
                                                  temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return first or 0.0, n, time.perf_counter() - t0


async def concurrent(client, models: list[str], max_tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, m, max_tokens) for m in models))
    return sum(r[1] for r in results), time.perf_counter() - t0


def rss_mb(pid: int) -> float:
    """Resident memory of the API process (where the engine lives; the worker is a
    separate process and holds no inference weights)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def baseline(adapter_dir: Path, max_tokens: int) -> tuple[int, float]:
    from openft.models.load import load_model
    from openft.train.lora import load_adapter

    loaded = load_model("smollm2-135m-instruct")
    load_adapter(loaded.model, adapter_dir)
    ids = loaded.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        loaded.model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = loaded.model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        dt = time.perf_counter() - t0
    return out.shape[1] - ids["input_ids"].shape[1], dt


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    args = ap.parse_args()
    from openai import AsyncOpenAI

    src_home = Path(os.environ.get("OPENFT_HOME", Path.home() / ".openft"))
    home = Path(tempfile.mkdtemp(prefix="openft-bench-"))
    (home / "models").symlink_to(src_home / "models", target_is_directory=True)
    os.environ["OPENFT_HOME"] = str(home)
    names = make_adapters(home, args.adapters)
    server = Server(home).start()
    try:
        client = AsyncOpenAI(api_key="local", base_url=server.url + "/v1", max_retries=0, timeout=600)
        pid = server.proc.pid
        await one_stream(client, names[0], 8)  # load base + adapter, warm up
        rss1 = rss_mb(pid)
        ttft, n, dt = await one_stream(client, names[0], args.max_tokens)
        single_tps = n / dt
        decode_tps = (n - 1) / max(1e-9, dt - ttft)
        n8, dt8 = await concurrent(client, [names[0]] * 8, args.max_tokens)
        n4, dt4 = await concurrent(client, [names[i % 4] for i in range(8)], args.max_tokens)
        for name in names:  # load every adapter
            await one_stream(client, name, 2)
        rss8 = rss_mb(pid)
    finally:
        server.stop()
    bn, bdt = baseline(home / "runs" / "bench-0" / "adapter", args.max_tokens)
    base_tps = bn / bdt
    rows = [
        ("one stream: time to first token", f"{ttft * 1000:.0f} ms", ""),
        ("one stream: tokens/s (whole request)", f"{single_tps:.1f}", f"{single_tps / base_tps:.2f}x plain generate"),
        ("one stream: tokens/s after the first token", f"{decode_tps:.1f}", f"{decode_tps / base_tps:.2f}x plain generate"),
        ("8 streams, 1 adapter: aggregate tokens/s", f"{n8 / dt8:.1f}", f"{(n8 / dt8) / base_tps:.2f}x plain generate"),
        ("8 streams, 4 adapters: aggregate tokens/s", f"{n4 / dt4:.1f}", f"{(n4 / dt4) / base_tps:.2f}x plain generate"),
        ("baseline: plain transformers generate, batch 1, LoRA unmerged", f"{base_tps:.1f} tokens/s", "1.00x"),
        ("server RSS with 1 adapter loaded", f"{rss1:.0f} MB", ""),
        (f"server RSS with {args.adapters} adapters loaded", f"{rss8:.0f} MB", f"+{(rss8 - rss1) / max(1, args.adapters - 1):.0f} MB per adapter"),
    ]
    print(f"\nopenft serve, built-in model, max_tokens={args.max_tokens}, greedy, {os.cpu_count()} CPUs")
    for name, value, ratio in rows:
        print(f"  {name:62s} {value:>14s}  {ratio}")
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
