"""Run an eval: sample the model on each item (a `completions` run) or take the
item's own sample (`jsonl`), grade it by every testing criterion, and store the
output items a chunk at a time, so a run shows progress, can be cancelled
between chunks, and resumes after a crash without grading an item twice.

Sampling goes through a `Sampler`: the worker's engine, which batches a chunk's
prompts together. Judges of model graders go through the GradeContext's judge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from openft.eval.evals import RunSource, prompt_for
from openft.eval.graders import ERROR_FLAGS, GradeContext, Grader, grade, passed
from openft.eval.render import TemplateVariableError, sample_namespace


@dataclass
class Generated:
    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


DEFAULT_MAX_TOKENS = 256  # an eval run's answers, where its sampling_params set no max_completion_tokens
Sampler = Callable[[str, list[list[dict]], dict], list[Generated]]  # (model, conversations, sampling)


def grade_entry(criteria: list[Grader], entry: dict, sample: dict, ctx: GradeContext) -> tuple[list[dict], str, bool]:
    """(results, "pass"/"fail", errored) of one item by every criterion."""
    results, all_pass, errored = [], True, False
    for spec in criteria:
        r = grade(spec, entry["item"], sample, ctx)
        ok = passed(spec, r)
        all_pass &= ok
        errored |= r.failed
        judge = None
        if r.sampled_model_name:
            judge = {"model": r.sampled_model_name, "usage": r.usage.get(r.sampled_model_name), "label": r.label}
        results.append(
            {
                "name": spec.name,
                "type": r.type,
                "score": r.reward,
                "passed": ok,
                "sample": judge,
                "error": r.message if r.failed else None,
                "errors": {k: v for k, v in r.errors.items() if k in ERROR_FLAGS and v} or None,
            }
        )
    return results, "pass" if all_pass else "fail", errored


def _sample_json(source: RunSource, messages: list[dict], gen: Generated | None, error: str | None) -> dict:
    usage = {
        "prompt_tokens": gen.prompt_tokens if gen else 0,
        "completion_tokens": gen.completion_tokens if gen else 0,
        "total_tokens": (gen.prompt_tokens + gen.completion_tokens) if gen else 0,
        "cached_tokens": 0,
    }
    return {
        "input": messages,
        "output": [{"role": "assistant", "content": gen.text}] if gen else [],
        "finish_reason": gen.finish_reason if gen else "",
        "model": source.model,
        "usage": usage,
        "error": {"code": "sample_error", "message": error} if error else None,
        # the settings the engine sampled with (openft's defaults where the run gave none)
        "temperature": float(source.sampling.get("temperature", 0.0)),
        "max_completion_tokens": int(source.sampling.get("max_completion_tokens") or DEFAULT_MAX_TOKENS),
        "top_p": float(source.sampling.get("top_p", 1.0)),
        "seed": int(source.sampling.get("seed", 0)),
    }


def chunk_rows(
    source: RunSource,
    criteria: list[Grader],
    entries: list[tuple[int, dict]],
    sampler: Sampler | None,
    ctx: GradeContext,
) -> list[dict]:
    """The output item rows of one chunk of (index, entry) pairs."""
    prompts: dict[int, list[dict]] = {}
    problems: dict[int, str] = {}
    if source.kind == "completions":
        for idx, entry in entries:
            try:
                prompts[idx] = prompt_for(source, entry["item"])
            except TemplateVariableError as e:
                problems[idx] = f"input_messages: {e}"
        order = sorted(prompts)
        outputs = sampler(source.model, [prompts[i] for i in order], source.sampling) if order else []
        generated = dict(zip(order, outputs))
    rows = []
    for idx, entry in entries:
        if source.kind == "completions":
            gen = generated.get(idx)
            sample_json = _sample_json(source, prompts.get(idx, []), gen, problems.get(idx))
            sample = sample_namespace(gen.text) if gen else None
        else:
            given = entry.get("sample") if isinstance(entry.get("sample"), dict) else {}
            sample = sample_namespace(str(given.get("output_text", ""))) | given if given else {}
            sample_json = given or None
        if sample is None:
            results, status, errored = [], "fail", True
        else:
            results, status, errored = grade_entry(criteria, entry, sample, ctx)
        rows.append(
            {
                "datasource_item_id": idx,
                "datasource_item": entry["item"],
                "sample": sample_json,
                "results": results,
                "status": status,
                "errored": errored,
            }
        )
    return rows


def summarise(criteria: list[Grader], items: list[dict], model: str | None) -> dict:
    """result_counts, per_testing_criteria_results and per_model_usage over stored items."""
    counts = {"total": len(items), "errored": 0, "failed": 0, "passed": 0}
    per = {c.name: {"testing_criteria": c.name, "passed": 0, "failed": 0} for c in criteria}
    usage: dict[str, dict] = {}

    def add_usage(name: str, u: dict | None) -> None:
        if not u:
            return
        row = usage.setdefault(
            name,
            {
                "model_name": name,
                "invocation_count": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "cached_tokens": 0,
            },
        )
        row["invocation_count"] += 1
        for k in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"):
            row[k] += int(u.get(k) or 0)

    for it in items:
        errored = bool((it.get("sample") or {}).get("error")) or any(r.get("errors") for r in it["results"])
        if errored or not it["results"]:
            counts["errored"] += 1
        elif it["status"] == "pass":
            counts["passed"] += 1
        else:
            counts["failed"] += 1
        for r in it["results"]:
            if r["name"] in per:
                per[r["name"]]["passed" if r["passed"] else "failed"] += 1
            if r.get("sample"):
                add_usage(r["sample"]["model"], r["sample"].get("usage"))
        if model and it.get("sample") and it["sample"].get("usage"):
            add_usage(model, it["sample"]["usage"])
    return {
        "result_counts": counts,
        "per_testing_criteria_results": list(per.values()),
        "per_model_usage": list(usage.values()),
    }
