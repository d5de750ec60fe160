"""`openft jobs|files|chat`: the CLI as a client of a running `openft serve`,
through the official `openai` client (the same API any other caller uses)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

TERMINAL = ("succeeded", "failed", "cancelled")
PAGE_SIZE = 100  # the most one list request asks for (the server's cap for jobs)


def _client(args):
    from openai import OpenAI

    return OpenAI(
        api_key=args.api_key or os.environ.get("OPENFT_API_KEY") or "local",
        base_url=args.base_url or os.environ.get("OPENFT_BASE_URL") or "http://127.0.0.1:8000/v1",
        max_retries=0,
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", help="API base URL (default $OPENFT_BASE_URL or http://127.0.0.1:8000/v1)")
    p.add_argument("--api-key", help="API key (default $OPENFT_API_KEY)")


def _show(obj) -> None:
    print(json.dumps(obj.model_dump() if hasattr(obj, "model_dump") else obj, indent=2, ensure_ascii=False))


def files_upload(args) -> int:
    with open(args.path, "rb") as fh:
        f = _client(args).files.create(file=fh, purpose=args.purpose)
    _show(f)
    return 0 if f.status == "processed" else 1


def files_list(args) -> int:
    for f in _client(args).files.list():
        print(f"{f.id}  {f.filename:30s} {f.bytes:>10d} B  {f.purpose:10s} {f.status}")
    return 0


def jobs_create(args) -> int:
    c = _client(args)
    extra = {
        k: v
        for k, v in {
            "validation_split": args.validation_split,
            "learning_rate": args.learning_rate,
            "lora_rank": args.lora_rank,
            "questions_file": args.questions_file,
            "full_finetune": args.full or None,
            "max_steps": args.max_steps,
        }.items()
        if v is not None
    }
    hp = {k: v for k, v in {"n_epochs": args.epochs, "batch_size": args.batch_size}.items() if v is not None}
    job = c.fine_tuning.jobs.create(
        model=args.model,
        training_file=args.training_file,
        validation_file=args.validation_file,
        suffix=args.suffix,
        seed=args.seed,
        hyperparameters=hp or None,
        extra_body=extra or None,
    )
    _show(job)
    if args.wait:
        return _follow(c, job.id)
    return 0


def _event_line(e, level: bool = False) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e.created_at))
    return f"[{when}] {e.level:5s} {e.message}" if level else f"[{when}] {e.message}"


def _events_after(c, job_id: str, after: str | None) -> list:
    """The job's events after the one with id `after` (all when None), oldest
    first: openft's `order=asc` makes `after` a cursor forward in time, and the
    SDK pages on with the last id it got."""
    kw = {"after": after} if after else {}
    return list(c.fine_tuning.jobs.list_events(job_id, limit=PAGE_SIZE, extra_query={"order": "asc"}, **kw))


def _follow(c, job_id: str) -> int:
    """Print a job's events as they come, each once, until the job ends; every
    poll asks only for the events after the last one printed."""
    last: str | None = None
    while True:
        # The status first: once it is final, the events fetched after it are all there are.
        job = c.fine_tuning.jobs.retrieve(job_id)
        for e in _events_after(c, job_id, last):
            print(_event_line(e), flush=True)
            last = e.id
        if job.status in TERMINAL:
            print(f"status: {job.status}" + (f", model: {job.fine_tuned_model}" if job.fine_tuned_model else ""))
            return 0 if job.status == "succeeded" else 1
        time.sleep(2)


def jobs_list(args) -> int:
    # Iterating the page would fetch every later page too: stop after --limit.
    newest = _client(args).fine_tuning.jobs.list(limit=min(args.limit, PAGE_SIZE))
    for j in itertools.islice(newest, args.limit):
        print(f"{j.id}  {j.status:16s} {j.model:28s} {j.fine_tuned_model or ''}")
    return 0


def jobs_show(args) -> int:
    _show(_client(args).fine_tuning.jobs.retrieve(args.job_id))
    return 0


def jobs_events(args) -> int:
    c = _client(args)
    if args.follow:
        return _follow(c, args.job_id)
    # The --limit newest (the list is newest first), printed oldest first.
    newest = c.fine_tuning.jobs.list_events(args.job_id, limit=min(args.limit, PAGE_SIZE))
    for e in reversed(list(itertools.islice(newest, args.limit))):
        print(_event_line(e, level=True))
    return 0


def jobs_cancel(args) -> int:
    _show(_client(args).fine_tuning.jobs.cancel(args.job_id))
    return 0


def chat(args) -> int:
    c = _client(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        messages.append({"role": "user", "content": line})
        stream = c.chat.completions.create(
            model=args.model, messages=messages, stream=True, temperature=args.temperature, max_tokens=args.max_tokens
        )
        answer = []
        if interactive:
            print("model> ", end="", flush=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                answer.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(answer)})


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def add_client_commands(sub) -> None:
    files = sub.add_parser("files", help="files on a running server").add_subparsers(dest="sub", required=True)
    up = files.add_parser("upload", help="upload a dataset")
    up.add_argument("path")
    up.add_argument("--purpose", default="fine-tune")
    _common(up)
    up.set_defaults(fn=files_upload)
    ls = files.add_parser("list")
    _common(ls)
    ls.set_defaults(fn=files_list)

    jobs = sub.add_parser("jobs", help="fine-tuning jobs on a running server").add_subparsers(dest="sub", required=True)
    cr = jobs.add_parser("create", help="start a fine-tuning job")
    cr.add_argument("--model", default="smollm2-135m-instruct")
    cr.add_argument("--training-file", required=True, help="file id")
    cr.add_argument("--validation-file")
    cr.add_argument("--questions-file", help="file id of a question set for the before/after comparison")
    cr.add_argument("--suffix")
    cr.add_argument("--seed", type=int)
    cr.add_argument("--epochs", type=int)
    cr.add_argument("--batch-size", type=int)
    cr.add_argument("--learning-rate", type=float)
    cr.add_argument("--lora-rank", type=int)
    cr.add_argument("--validation-split", type=float)
    cr.add_argument("--max-steps", type=int)
    cr.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    cr.add_argument("--wait", action="store_true", help="follow the events until the job ends")
    _common(cr)
    cr.set_defaults(fn=jobs_create)
    for name, fn, helptext in (("show", jobs_show, "one job"), ("cancel", jobs_cancel, "cancel a job")):
        p = jobs.add_parser(name, help=helptext)
        p.add_argument("job_id")
        _common(p)
        p.set_defaults(fn=fn)
    ev = jobs.add_parser("events", help="a job's events")
    ev.add_argument("job_id")
    ev.add_argument("--limit", type=_positive, default=50, help="how many of the newest events (default: 50)")
    ev.add_argument("--follow", "-f", action="store_true", help="print every event, then new ones until the job ends")
    _common(ev)
    ev.set_defaults(fn=jobs_events)
    jl = jobs.add_parser("list")
    jl.add_argument("--limit", type=_positive, default=20, help="how many of the newest jobs (default: 20)")
    _common(jl)
    jl.set_defaults(fn=jobs_list)

    ch = sub.add_parser("chat", help="chat with a model on a running server (streaming)")
    ch.add_argument("model")
    ch.add_argument("--system")
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--max-tokens", type=int, default=512)
    _common(ch)
    ch.set_defaults(fn=chat)
