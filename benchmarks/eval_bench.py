"""Eval figures of issue 19: an eval run of 100 items, and the cost of scoring
every checkpoint as a share of a job's wall time, each beside its baseline in
the same run.

Commands (run from the repository root; OPENFT_HOME must hold the converted
built-in model, e.g. OPENFT_HOME=.openft-home):

  .venv/bin/python benchmarks/eval_bench.py            # both parts (~15 min on a quiet 2-core machine)
  .venv/bin/python benchmarks/eval_bench.py --quick    # 24 items, 8 training steps
  .venv/bin/python benchmarks/eval_bench.py --part run # one part: run | checkpoints

Part `run`. 100 items (the first alpaca_en_demo.json rows without an `input`:
the instruction as the question, the row's output as the reference), graded by
the criteria a question set gets (`contains_reference`, `rouge_l`). openft: a real
`openft serve` with its worker, driven by the official client: `evals.create`,
`evals.runs.create` with a `completions` source on the built-in model (greedy,
--max-tokens), timed from the create call until the run is completed (a 1-item
run first, so the engine's load is not in the figure; it is reported apart).
Baseline: the same 100 prompts (the same chat template) answered one at a time
with transformers `generate` (greedy, batch 1, fp32), then graded by the same
graders in this process. The server runs at --precision (auto: bf16 where it
measured faster, as the API does).

Part `checkpoints`. The built-in model fine-tuned (LoRA, defaults) on the lumen
demo data for --steps steps with a checkpoint every --steps/4, its 12 questions
answered before and after, twice in this process: once with every checkpoint
scored (the default) and once with `score_checkpoints` off. Reported: both wall
times, their ratio, and the scoring's share: the sum of each checkpoint's
`eval_seconds` over the scored job's training time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serve.conftest import Server  # noqa: E402  (the same real-server helper the tests use)

BUILTIN = "smollm2-135m-instruct"
SHARED = ROOT.parent / "shared" / "datasets"
EXAMPLES = ROOT / "src" / "openft" / "examples"
SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "reference": {"type": "string"}},
    "required": ["question", "reference"],
}


def items(n: int) -> list[dict]:
    rows = json.loads((SHARED / "alpaca_en_demo.json").read_text())
    out = [{"question": r["instruction"], "reference": r["output"]} for r in rows if not r.get("input")]
    return out[:n]


def criteria() -> list[dict]:
    from openft.eval.checkpoints import criteria_from_references

    return criteria_from_references()


def wait_run(client, eval_id: str, run_id: str, timeout: float = 3600):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in ("completed", "failed", "canceled"):
            return run
        time.sleep(0.1)
    raise TimeoutError(f"run {run_id} still {run.status}")


def openft_run(data: list[dict], max_tokens: int, precision: str) -> dict:
    home = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    (home / "models").symlink_to(Path(os.environ.get("OPENFT_HOME", ROOT / ".openft-home")) / "models")
    server = Server(home, "--precision", precision).start()
    try:
        client = server.client()
        ev = client.evals.create(
            name="bench",
            data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
            testing_criteria=criteria(),
        )

        def run(rows):
            source = {
                "type": "completions",
                "model": BUILTIN,
                "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]},
                "sampling_params": {"max_completion_tokens": max_tokens, "temperature": 0},
                "source": {"type": "file_content", "content": [{"item": r} for r in rows]},
            }
            t0 = time.perf_counter()
            r = client.evals.runs.create(ev.id, data_source=source)
            done = wait_run(client, ev.id, r.id)
            assert done.status == "completed", done.error
            return time.perf_counter() - t0, done

        cold_s, _ = run(data[:1])
        seconds, done = run(data)
        tokens = sum(u.completion_tokens for u in done.per_model_usage)
        return {
            "seconds": seconds,
            "first_run_s": cold_s,
            "completion_tokens": tokens,
            "passed": done.result_counts.passed,
            "precision": server.health().get("precision"),
        }
    finally:
        server.stop()


def baseline_run(data: list[dict], max_tokens: int) -> dict:
    import torch

    from openft.eval.graders import GradeContext, parse_grader
    from openft.eval.render import sample_namespace
    from openft.eval.runs import grade_entry
    from openft.models.load import load_model

    loaded = load_model(BUILTIN)
    model, tok = loaded.model.eval(), loaded.tokenizer
    graders = [parse_grader(c, f"testing_criteria[{i}]") for i, c in enumerate(criteria())]
    t0, tokens, passed = time.perf_counter(), 0, 0
    for row in data:
        text = tok.apply_chat_template(
            [{"role": "user", "content": row["question"]}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1] :]
        tokens += len(new)
        answer = tok.decode(new, skip_special_tokens=True)
        _, status, _ = grade_entry(graders, {"item": row}, sample_namespace(answer), GradeContext())
        passed += status == "pass"
    return {"seconds": time.perf_counter() - t0, "completion_tokens": tokens, "passed": passed}


def part_run(args) -> dict:
    data = items(args.items)
    ours = openft_run(data, args.max_tokens, args.precision)
    base = baseline_run(data, args.max_tokens)
    return {
        "items": len(data),
        "max_tokens": args.max_tokens,
        "openft": ours,
        "baseline": base,
        "speedup": base["seconds"] / ours["seconds"],
    }


def one_job(steps: int, scored: bool, out: Path) -> dict:
    from openft.config import JobSpec
    from openft.pipeline import finetune_with_comparison

    spec = JobSpec()
    spec.data.path = str(EXAMPLES / "lumen_train.jsonl")
    spec.eval.questions = str(EXAMPLES / "lumen_questions.jsonl")
    spec.eval.score_checkpoints = scored
    spec.train.max_steps = steps
    spec.train.save_every = max(1, steps // 4)
    spec.output_dir = str(out)
    seen = []
    t0 = time.perf_counter()
    outcome = finetune_with_comparison(
        spec, on_event=lambda kind, data: seen.append((kind, data)), progress=False, echo=lambda *a: None
    )
    wall = time.perf_counter() - t0
    scores = [d for k, d in seen if k == "checkpoint_scored"]
    return {
        "wall_s": wall,
        "train_s": outcome.result.elapsed_s,
        "checkpoints": sum(k == "checkpoint" for k, _ in seen),
        "scored": len(scores),
        "eval_s": sum(d["eval_seconds"] for d in scores),
        "scores": [round(d["eval_score"], 3) for d in scores],
    }


def part_checkpoints(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="eval-bench-ckpt-"))
    off = one_job(args.steps, False, root / "off")
    on = one_job(args.steps, True, root / "on")
    return {
        "steps": args.steps,
        "scored": on,
        "unscored": off,
        "wall_ratio": on["wall_s"] / off["wall_s"],
        "train_ratio": on["train_s"] / off["train_s"],
        "share_of_training": on["eval_s"] / on["train_s"],
        "share_of_wall": on["eval_s"] / on["wall_s"],
        "per_checkpoint_s": on["eval_s"] / max(1, on["scored"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=("run", "checkpoints", "both"), default="both")
    ap.add_argument("--items", type=int)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = ap.parse_args()
    args.items = args.items or (24 if args.quick else 100)
    args.steps = args.steps or (8 if args.quick else 24)
    out = {}
    if args.part in ("run", "both"):
        out["run"] = r = part_run(args)
        print(
            f"eval run of {r['items']} items: openft {r['openft']['seconds']:.1f} s "
            f"(engine in {r['openft']['precision']}; first 1-item run {r['openft']['first_run_s']:.1f} s), "
            f"generate one at a time {r['baseline']['seconds']:.1f} s: {r['speedup']:.2f}x; "
            f"tokens {r['openft']['completion_tokens']} vs {r['baseline']['completion_tokens']}, "
            f"passed {r['openft']['passed']} vs {r['baseline']['passed']}",
            file=sys.stderr,
        )
    if args.part in ("checkpoints", "both"):
        out["checkpoints"] = c = part_checkpoints(args)
        print(
            f"{c['steps']} steps, {c['scored']['scored']} checkpoints scored: wall {c['scored']['wall_s']:.1f} s vs "
            f"{c['unscored']['wall_s']:.1f} s unscored ({c['wall_ratio']:.2f}x), training {c['train_ratio']:.2f}x; "
            f"scoring {c['scored']['eval_s']:.1f} s = {c['share_of_training']:.1%} of training, "
            f"{c['share_of_wall']:.1%} of the job's wall time, "
            f"{c['per_checkpoint_s']:.1f} s per checkpoint",
            file=sys.stderr,
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
