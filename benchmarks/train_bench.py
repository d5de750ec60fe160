"""Training benchmark: openft against TRL SFTTrainer + PEFT on the same work.

Every configuration trains the same model (`--model NAME`: a built-in, a
registered name or a path, as openft.models.registry.resolve takes it; default
the built-in smollm2-135m-instruct, loaded fp32 on CPU) on the same rows of ../shared/datasets/alpaca_en_demo.json, written once as
conversational prompt/completion JSONL (user turn = instruction [+ input],
assistant turn = output), so every side computes the loss on completion tokens
only. Same hyperparameters on every side: LoRA r=16, alpha=32, dropout 0 on every
linear layer of the blocks (PEFT "all-linear"), AdamW lr 5e-4 (full: 2e-5),
weight decay 0, cosine schedule with 5% warm-up, grad-norm clip 1.0, seed 0,
max length 1024 (quick: 512) and the same tokens per optimizer step: TRL packed
takes `--tokens-per-step // max_length` packed rows of max_length per step, and
openft / TRL unpacked take round(tokens_per_step / mean example length) examples.
Each configuration runs in its own subprocess (`python train_bench.py --_child
NAME SPEC.json`), which writes one JSON object of figures to a temp file.

Configurations:
  openft        openft.train.recipe.finetune, the real training path, unchanged
                (length-sorted micro-batches under a token budget, LM head + CE
                only at labelled positions, no gradient checkpointing, precision
                auto, measured (openft.autoprecision): where bf16 runs >= 1.2x fp32,
                as on an AMX CPU, bf16 mixed precision -- base weights stored
                bf16, adapter/optimizer/loss fp32, bf16 matmuls -- else fp32),
                in a process started as openft starts its training processes:
                under tcmalloc where the machine has it (openft.heap; `allocator`
                in --json). The TRL configurations run as their users run
                them, under the system's malloc (to preload the same library
                for them, set LD_PRELOAD when starting the benchmark).
  openft_fp32   the same with precision fp32 (only when named in --configs).
  openft_system_malloc  the same under the system's malloc (OPENFT_MALLOC=system;
                only when named): with `openft` beside it, allocator_* ratios.
  openft_eager  the same with no compiled kernels (OPENFT_COMPILE=0, openft.train.fused;
                only when named): with `openft` beside it, compiled_* ratios.
  trl_packed    SFTTrainer + PEFT, bf16=False (fp32, the peer the targets were
                first set against, which expected bf16 to be 10-50x slower on a
                CPU; with AMX it is not),
                packing=True, rest at TRL's defaults -- which include
                gradient_checkpointing=True (about a third more compute). TRL 1.16
                packs with packing_strategy="bfd" (best-fit decreasing, whole
                examples, no splitting), which forces padding_free: each batch is
                one flattened row with position_ids restarting at 0 per example
                and no attention_mask. With attn_implementation="sdpa" (the
                default here), transformers 5.24 detects the restarts
                (masking_utils.find_packed_sequence_indices) and builds a
                block-diagonal causal mask, so packed examples do NOT attend to
                each other (no cross-contamination) -- but only because TRL's
                compute_loss passes use_cache=False: with a cache object (the
                model default) the detection is skipped and packed rows DO attend
                across examples (checked on the tiny model: a packed example's
                logits change with its neighbour). The cost is dense attention
                over the whole packed row. The collator also masks the first
                label of each packed example, so no example predicts the next.
  trl_packed_bf16  the same with bf16=True (autocast over fp32 weights), so
                TRL also gets this CPU's fast bf16.
  trl_best      what a careful TRL user runs: packing, gradient_checkpointing
                OFF, and bf16 or fp32 whichever this machine runs faster -- the
                same measurement openft's `--precision auto` uses
                (openft.autoprecision; `trl_precision` in --json).
  trl_unpacked  trl_packed without packing (fp32, padded to the longest in each batch).
  trl_defaults  TRL's pure defaults (only the dataset, the same LoRA config,
                report_to="none" and a step cap set): bf16 autocast, lr 2e-5,
                batch 8, 3 epochs. Reference only -- bf16 on this CPU makes it no
                fair comparison -- so it is capped at --defaults-steps optimizer
                steps (1 in --quick, 6 otherwise) and its val loss is after those.

Figures per configuration:
  sup tok/s     completion tokens trained / training seconds (first step start to
                last optimizer step end; no evaluation or checkpoint time inside).
                /cpu-s: the same per CPU-second of the subprocess (cpu_* ratios in
                --json), a cross-check when other work shares the machine.
  padding       1 - real tokens / positions run through the model.
  wall          the subprocess' whole life (imports, load, data prep, train).
  first step    subprocess start to the end of the first optimizer step.
  peak RSS      resource.getrusage(RUSAGE_SELF).ru_maxrss of that subprocess,
                read after training, before the shared evaluation.
  val loss      ONE function (`shared_val_loss`) for all configurations: plain
                forward of each held-out row alone (no padding), full logits,
                mean CE over completion tokens (the tokens after the rendered
                prompt; trailing whitespace-only tokens after <|im_end|> excluded).
  FLOP/s        4N (LoRA) or 6N (full) per processed real (non-padding) token,
                N = all model parameters (134.5M, tied embeddings counted once),
                over training seconds; as a fraction of the fp32 matmul peak
                measured in the same run (2048^3 torch.mm loop in its own
                subprocess, best of several). This is the nominal count: it does
                not credit TRL's gradient-checkpointing recompute, nor charge the
                LM head openft skips at unlabelled positions.

Ratios: openft / the best-configured peer, the FASTEST TRL configuration of the
run (sup tok/s) among trl_packed, trl_packed_bf16, trl_best and trl_unpacked
(throughput_ratio, peak_rss_ratio, val_loss_ratio; `best_peer` names it;
trl_defaults, capped and at other hyperparameters, is never the peer), openft / trl_packed (fp32:
throughput_ratio_fp32_peer), openft / trl_unpacked (throughput_ratio_unpacked);
peak_fraction is openft's, of the fp32 peak as the issue defines it, and
peak_fraction_bf16 the same FLOP/s over the bf16 peak measured beside it (on a
CPU where bf16 is far behind fp32, openft.autoprecision's small-product figure
instead: a 2048^3 bf16 product takes ~50 s there; matmul_peak_flops_bf16_source),
and peak_fraction_chosen that of the precision openft trained in.

Commands (from the repo root; OPENFT_HOME must hold the converted built-in):
  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/train_bench.py --quick
  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/train_bench.py --json
  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/train_bench.py --method full --json
  # another built-in; another kind of CPU on this one (avx512_bf16: AMX off; avx2:
  # AVX512 and AMX off), every configuration re-run with oneDNN, MKL and ATen capped:
  OPENFT_HOME=... .venv/bin/python benchmarks/train_bench.py --quick --model gemma-3-270m --cpu-isa avx2
  # GPU (bf16; all four configurations in bf16 there):
  OPENFT_HOME=... python benchmarks/train_bench.py --device cuda --json
--quick uses 16 short rows (<= 128 tokens) + 8 held-out rows, 1 epoch,
max length 512, 512 tokens per step; the default uses 160 rows + 32 held out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()
REPO = Path(__file__).resolve().parent.parent
DATASET = REPO.parent / "shared" / "datasets" / "alpaca_en_demo.json"
MODEL = "smollm2-135m-instruct"
CONFIGS = ("openft", "trl_packed", "trl_packed_bf16", "trl_best", "trl_unpacked", "trl_defaults")
# The configurations the best-configured peer is chosen from (the fastest of them in the run).
PEERS = ("trl_packed", "trl_packed_bf16", "trl_best", "trl_unpacked")
# On request (--configs), for A/Bs: openft with precision fp32; openft under the
# system's malloc instead of the training allocator (openft.heap); openft with
# its fused kernels eager (openft.train.fused).
EXTRA_CONFIGS = ("openft_fp32", "openft_system_malloc", "openft_eager")
LORA_R, LORA_ALPHA = 16, 32


# ---------------------------------------------------------------- data -------


def to_prompt_completion(row: dict) -> dict:
    user = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
    return {
        "prompt": [{"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": row["output"]}],
    }


def render_ids(tok, row: dict) -> tuple[list[int], int, int]:
    """(ids of prompt+completion, start of completion, end of completion) as TRL
    renders a conversational prompt/completion row."""
    prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    end = len(ids)
    while end > len(p_ids) and not tok.decode(ids[end - 1 : end]).strip():
        end -= 1  # "\n" after <|im_end|>: template glue, not the answer
    return ids, len(p_ids), end


def shared_val_loss(model, tok, rows: list[dict], device: str) -> float:
    """The one evaluation for every configuration: mean CE over completion tokens."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, start, end = render_ids(tok, row)
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x).logits[0].float()
            # logits at t predict token t+1: completion tokens start..end-1.
            total += float(F.cross_entropy(logits[start - 1 : end - 1], x[0, start:end], reduction="sum"))
            n += end - start
    return total / n


def select_rows(tok, quick: bool, n_train: int, n_valid: int, min_length: int = 0) -> tuple[list[dict], list[dict]]:
    rows = [to_prompt_completion(r) for r in json.loads(DATASET.read_text())]
    if quick:  # short rows so the five trainings fit in about two minutes
        rows = [r for r in rows if len(render_ids(tok, r)[0]) <= 128]
    if min_length:  # long rows only (--min-length)
        rows = [r for r in rows if len(render_ids(tok, r)[0]) >= min_length]
    valid, train = rows[:n_valid], rows[n_valid : n_valid + n_train]
    return train, valid


# -------------------------------------------------------------- children -----


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_s() -> float:
    """CPU seconds of this process (all threads): steadier than wall time when
    other work shares the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load_openft_model(spec: dict):
    import torch

    from openft.models.load import load_model

    dtype = torch.bfloat16 if spec["device"] == "cuda" else torch.float32
    loaded = load_model(spec["model"], dtype=dtype)
    if spec["device"] == "cuda":
        loaded.model.to("cuda")
    return loaded


def child_openft(spec: dict, name: str) -> dict:
    from openft.config import DataConfig, JobSpec, LoraConfig, TrainConfig
    from openft.train.recipe import finetune

    loaded = _load_openft_model(spec)
    h = spec["hp"]
    job = JobSpec(
        model=spec["model"],
        data=DataConfig(path=spec["train_path"], validation_split=0.0, layout="prompt_completion"),
        lora=LoraConfig(rank=LORA_R, alpha=float(LORA_ALPHA), dropout=0.0),
        train=TrainConfig(
            method=spec["method"],
            epochs=h["epochs"],
            learning_rate=h["lr"],
            batch_size=h["batch_size"],
            max_seq_length=h["max_length"],
            warmup_ratio=0.05,
            scheduler="cosine",
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=h["seed"],
            eval_every=10**9,
            save_every=10**9,
            precision="fp32" if name == "openft_fp32" else "auto",
        ),
        output_dir=str(Path(spec["tmp"]) / f"{name}-run"),
    )
    marks: dict = {"steps": []}
    n_params = count_params(loaded.model)  # before LoRA's adapters join it

    def on_event(kind: str, data: dict) -> None:
        now = time.time()
        if kind == "started":
            marks["t0"], marks["c0"] = now, cpu_s()
            marks["precision_decision"] = data.get("precision")
        elif kind == "metrics":
            marks["steps"].append((now, data))
            marks["c1"] = cpu_s()

    result = finetune(job, on_event=on_event, progress=False, loaded=loaded)
    t_end, _ = marks["steps"][-1]
    rows = [d for _, d in marks["steps"]]
    return {
        "train_s": t_end - marks["t0"],
        "train_cpu_s": marks["c1"] - marks["c0"],
        "first_step_s": marks["steps"][0][0] - T_START,
        "supervised_tokens": rows[-1]["trained_tokens"],
        "real_tokens": sum(r["tokens"] for r in rows),
        "positions": sum(r["padded_tokens"] for r in rows),
        "steps": len(rows),
        "peak_rss_mb": rss_mb(),
        "precision": result.config["train"]["precision"],
        "precision_decision": marks.get("precision_decision"),
        "n_params": n_params,
        # finetune hands the model back as loaded (fp32 base) + the trained adapter:
        # the shared evaluation scores what `openft serve` would serve.
        "_model": loaded.model,
        "_tok": loaded.tokenizer,
    }


def count_params(model) -> int:
    """Every parameter once (parameters() yields tied embeddings once)."""
    return sum(p.numel() for p in model.parameters())


def trl_bf16(name: str, cuda: bool) -> bool:
    """Whether a TRL configuration trains with bf16 autocast: on a GPU always; trl_best
    where openft.autoprecision measured bf16 faster here (the decision `auto` takes)."""
    if cuda or name == "trl_packed_bf16":
        return True
    if name == "trl_best":
        import torch

        from openft.autoprecision import resolve_precision

        return resolve_precision("auto", torch.device("cpu")) == "bf16"
    return False


class _Counting:
    """Wraps TRL's collator to count what each batch puts through the model."""

    def __init__(self, inner):
        self.inner, self.real, self.positions, self.supervised = inner, 0, 0, 0

    def __call__(self, examples):

        b = self.inner(examples)
        ids, labels = b["input_ids"], b["labels"]
        self.positions += ids.numel()
        if "attention_mask" in b:
            self.real += int(b["attention_mask"].sum())
        else:  # padding-free: one row, padding only at its end (none unless pad_to_multiple_of)
            self.real += ids.numel()
        # labels[t] is predicted from t-1: a label at column 0 trains nothing.
        self.supervised += int((labels[:, 1:] != -100).sum())
        return b


def child_trl(spec: dict, name: str) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from openft.models.load import materialise, setup_torch
    from openft.models.registry import resolve

    setup_torch()  # flush-to-zero: the same CPU setting openft runs with
    path = materialise(resolve(spec["model"]))
    cuda = spec["device"] == "cuda"
    tok = with_template(AutoTokenizer.from_pretrained(path), path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    n_params = count_params(model)
    ds = load_dataset("json", data_files=spec["train_path"], split="train")
    h = spec["hp"]
    out_dir = str(Path(spec["tmp"]) / f"{name}-out")
    common = dict(output_dir=out_dir, report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=not cuda)
    if name == "trl_defaults":
        args = SFTConfig(
            output_dir=out_dir, report_to="none", disable_tqdm=True, max_steps=h["defaults_steps"], use_cpu=not cuda
        )
    else:
        packed = name.startswith("trl_packed") or name == "trl_best"
        # TRL's default (gradient checkpointing on) except in trl_best, which has the memory to spare.
        ckpt = {"gradient_checkpointing": False} if name == "trl_best" else {}
        args = SFTConfig(
            **common,
            **ckpt,
            bf16=trl_bf16(name, cuda),
            packing=packed,
            max_length=h["max_length"],
            per_device_train_batch_size=h["packed_rows"] if packed else h["batch_size"],
            gradient_accumulation_steps=1,
            learning_rate=h["lr"],
            num_train_epochs=h["epochs"],
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=h["seed"],
            logging_steps=1,
        )
    peft_config = None
    if spec["method"] == "lora":
        peft_config = LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    marks: dict = {"steps": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["t0"], marks["c0"] = time.time(), cpu_s()

        def on_step_end(self, *a, **k):
            marks["steps"].append(time.time())
            marks["c1"] = cpu_s()

    trainer = SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[Clock()]
    )
    counter = _Counting(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    return {
        "train_s": marks["steps"][-1] - marks["t0"],
        "train_cpu_s": marks["c1"] - marks["c0"],
        "first_step_s": marks["steps"][0] - T_START,
        "supervised_tokens": counter.supervised,
        "real_tokens": counter.real,
        "positions": counter.positions,
        "steps": len(marks["steps"]),
        "peak_rss_mb": rss_mb(),
        "packing_strategy": args.packing_strategy if args.packing else None,
        "padding_free": bool(getattr(trainer, "padding_free", False)),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "bf16": bool(args.bf16),
        "n_params": n_params,
        "_model": trainer.model,
        "_tok": tok,
    }


def child_peak(spec: dict) -> dict:
    import torch

    def best_of(dtype) -> float:
        if spec["device"] == "cuda":
            a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            b, n, sync = a.clone(), 8192, torch.cuda.synchronize
        else:
            a, n, sync = torch.randn(2048, 2048, dtype=dtype), 2048, (lambda: None)
            b = torch.randn(2048, 2048, dtype=dtype)
        c = torch.mm(a, b)
        best = 0.0
        deadline = time.time() + spec["peak_seconds"]
        while time.time() < deadline:
            sync()
            t = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b, out=c)
            sync()
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
        return best

    # On the CPU both: the issue's peak is fp32's; a CPU with AMX runs bf16 ~4x faster.
    from openft.autoprecision import ROWS, decide

    bf16_source = "mm"
    decision = decide("auto", torch.device(spec["device"]))  # cached by the parent
    if spec["device"] == "cpu" and decision.bf16_rows < ROWS:
        # bf16 far behind fp32 here (no bf16 instructions): one 2048^3 bf16 product would
        # take ~50 s (0.35 GFLOP/s on an AVX2 EPYC), so the decision's own figure stands in.
        peak_bf16, bf16_source = decision.bf16_flops, f"openft.autoprecision ({decision.bf16_rows}-row product)"
    else:
        peak_bf16 = best_of(torch.bfloat16)
    return {
        "peak_flops": best_of(torch.float32),
        "peak_flops_bf16": peak_bf16,
        "peak_flops_bf16_source": bf16_source,
        "threads": torch.get_num_threads(),
    }


def run_child(name: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if name == "peak":
        res = child_peak(spec)
    else:
        res = child_openft(spec, name) if name.startswith("openft") else child_trl(spec, name)
        model, tok = res.pop("_model"), res.pop("_tok")
        valid = [json.loads(x) for x in Path(spec["valid_path"]).read_text().splitlines()]
        t = time.time()
        res["val_loss"] = shared_val_loss(model, tok, valid, spec["device"])
        res["eval_s"] = time.time() - t
        res["wall_s"] = t - T_START  # the evaluation is the benchmark's, not the configuration's
    from openft.heap import allocator_in_use

    res["allocator"] = allocator_in_use()
    Path(out_path).write_text(json.dumps(res))


# ---------------------------------------------------------------- parent -----


def launch(name: str, spec_path: str, tmp: str, timeout: float) -> dict:
    out = Path(tmp) / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name, spec_path, str(out)]
    t = time.time()
    # The repository's src first, what the caller had after it (a profiler's sitecustomize, say).
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    if name.startswith("openft"):
        from openft.heap import training_env

        if name == "openft_system_malloc":
            env["OPENFT_MALLOC"] = "system"
        if name == "openft_eager":
            env["OPENFT_COMPILE"] = "0"
        env = training_env(env)  # as `openft finetune` and the worker start
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"configuration {name} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    res = json.loads(out.read_text())
    res["process_s"] = time.time() - t
    return res


def derive(res: dict, n_params: int, method: str, peak: float, peak_bf16: float) -> dict:
    per_token = (4 if method == "lora" else 6) * n_params
    res["sup_tok_s"] = res["supervised_tokens"] / res["train_s"]
    res["sup_tok_per_cpu_s"] = res["supervised_tokens"] / res["train_cpu_s"]
    res["padding_fraction"] = 1.0 - res["real_tokens"] / res["positions"]
    res["flops"] = per_token * res["real_tokens"] / res["train_s"]
    res["peak_fraction"] = res["flops"] / peak
    res["peak_fraction_bf16"] = res["flops"] / peak_bf16  # of the bf16 peak, for the runs that use it
    return res


def load_tokenizer(model: str):
    """The tokenizer of `model` as the TRL side loads it (converting a GGUF once, for every child)."""
    from transformers import AutoTokenizer

    from openft.models.load import materialise
    from openft.models.registry import resolve

    path = materialise(resolve(model))
    return with_template(AutoTokenizer.from_pretrained(path), path)


def with_template(tok, path: Path):
    """`tok` rendering with the chat template openft trains with: the model's own, or
    for a base without one (Gemma 3 270M) its family's, as a careful TRL user would
    set one; every side then computes the loss on the same tokens."""
    from openft.models.templates import apply_template

    apply_template(tok, json.loads((Path(path) / "config.json").read_text()))
    return tok


def machine_facts() -> dict:
    """The CPU (figures.machine) and its bf16 instructions, for RESULTS.md; the precision
    openft and trl_best use is measured, these are only the facts beside it."""
    import torch
    from figures import machine

    from openft.autoprecision import decide
    from openft.hardware import cpu_bf16_features

    return machine() | {
        "bf16_features": cpu_bf16_features(),
        "auto_precision": decide("auto", torch.device("cpu")).as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short rows, few steps: under 2 minutes on 2 cores")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--method", choices=("lora", "full"), default="lora")
    ap.add_argument("--model", default=MODEL, help=f"a built-in, registered name or path (default {MODEL})")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rows", type=int, help="training rows (default 160; quick 16)")
    ap.add_argument("--valid", type=int, help="held-out rows (default 32; quick 8)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--min-length", type=int, default=0, help="only rows of at least this many tokens (long-row runs)")
    ap.add_argument("--max-length", type=int, help="default 1024; quick 512")
    ap.add_argument("--tokens-per-step", type=int, help="default 2048; quick 512")
    ap.add_argument("--defaults-steps", type=int, help="step cap for trl_defaults (default 6; quick 1)")
    ap.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated, from " + ",".join(CONFIGS + EXTRA_CONFIGS)
    )
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    from figures import add_isa_flag, cap_isa

    add_isa_flag(ap)
    a = ap.parse_args(argv)
    if a._child:  # started by the parent, under its cap already
        run_child(*a._child)
        return 0
    cap_isa(a.cpu_isa)  # every configuration then runs capped: they inherit the environment
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
            return 2
    os.environ.setdefault("OPENFT_HOME", str(REPO / ".openft-home"))
    sys.path.insert(0, str(REPO / "src"))
    tok = load_tokenizer(a.model)
    facts = machine_facts()  # measures (and caches) the auto precision before any configuration runs
    n_train = a.rows or (16 if a.quick else 160)
    n_valid = a.valid or (8 if a.quick else 32)
    max_length = a.max_length or (512 if a.quick else 1024)
    tps = a.tokens_per_step or (512 if a.quick else 2048)
    train, valid = select_rows(tok, a.quick, n_train, n_valid, a.min_length)
    mean_len = sum(len(render_ids(tok, r)[0]) for r in train) / len(train)
    hp = {
        "epochs": a.epochs,
        "lr": 5e-4 if a.method == "lora" else 2e-5,
        "seed": 0,
        "max_length": max_length,
        "packed_rows": max(1, tps // max_length),
        "batch_size": max(1, round(tps / mean_len)),
        "defaults_steps": a.defaults_steps or (1 if a.quick else 6),
    }
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    if a.device == "cuda":  # every TRL configuration is bf16 there already
        configs = [c for c in configs if c != "trl_packed_bf16"]
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        train_path, valid_path = Path(tmp) / "train.jsonl", Path(tmp) / "valid.jsonl"
        train_path.write_text("".join(json.dumps(r) + "\n" for r in train))
        valid_path.write_text("".join(json.dumps(r) + "\n" for r in valid))
        spec = {
            "train_path": str(train_path),
            "valid_path": str(valid_path),
            "method": a.method,
            "model": a.model,
            "device": a.device,
            "hp": hp,
            "tmp": tmp,
            "peak_seconds": 2.0 if a.quick else 5.0,
        }
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        peak = launch("peak", str(spec_path), tmp, 120)
        results = {}
        for name in configs:
            if not a.json:
                print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = launch(name, str(spec_path), tmp, 3600)
    # every parameter of the base model once (tied embeddings once; 134,515,008 for smollm2-135m)
    n_params = next(r["n_params"] for r in results.values())
    for r in results.values():
        derive(r, n_params, a.method, peak["peak_flops"], peak["peak_flops_bf16"])
    report = {
        "method": a.method,
        "model": a.model,
        "n_params": n_params,
        "device": a.device,
        "machine": facts,
        "quick": a.quick,
        "train_rows": len(train),
        "valid_rows": len(valid),
        "mean_example_tokens": mean_len,
        "hyperparameters": hp,
        "matmul_peak_flops": peak["peak_flops"],
        "matmul_peak_flops_bf16": peak["peak_flops_bf16"],
        "matmul_peak_flops_bf16_source": peak["peak_flops_bf16_source"],
        "threads": peak["threads"],
        "configs": results,
    }
    o, u = results.get("openft"), results.get("trl_unpacked")
    # The best-configured peer: the fastest TRL configuration of the run.
    peers = [n for n in PEERS if n in results]
    best = max(peers, key=lambda n: results[n]["sup_tok_s"]) if peers else None
    p = results.get(best) if best else None
    report["best_peer"] = best
    if o and "trl_packed" in results:
        report["throughput_ratio_fp32_peer"] = o["sup_tok_s"] / results["trl_packed"]["sup_tok_s"]
    if o and p:
        report["throughput_ratio"] = o["sup_tok_s"] / p["sup_tok_s"]
        report["peak_rss_ratio"] = o["peak_rss_mb"] / p["peak_rss_mb"]
        report["val_loss_ratio"] = o["val_loss"] / p["val_loss"]
    if o and u:
        report["throughput_ratio_unpacked"] = o["sup_tok_s"] / u["sup_tok_s"]
    # The same ratios per CPU-second: a cross-check when the machine is shared.
    if o and p:
        report["cpu_throughput_ratio"] = o["sup_tok_per_cpu_s"] / p["sup_tok_per_cpu_s"]
    if o and u:
        report["cpu_throughput_ratio_unpacked"] = o["sup_tok_per_cpu_s"] / u["sup_tok_per_cpu_s"]
    if "trl_best" in results:
        report["trl_precision"] = "bf16" if results["trl_best"]["bf16"] else "fp32"
    if o:
        report["peak_fraction"] = o["peak_fraction"]
        report["peak_fraction_bf16"] = o["peak_fraction_bf16"]
        report["openft_precision"] = o["precision"]
        report["openft_precision_decision"] = o.get("precision_decision")
        # of the measured matmul peak of the precision openft trained in (issue 5's >= 50%)
        report["peak_fraction_chosen"] = o["peak_fraction_bf16"] if o["precision"] == "bf16" else o["peak_fraction"]
        report["openft_allocator"] = o.get("allocator")
    sm = results.get("openft_system_malloc")
    if o and sm:  # the training allocator's A/B, same run
        report["allocator_throughput_ratio"] = o["sup_tok_s"] / sm["sup_tok_s"]
        report["allocator_peak_rss_ratio"] = o["peak_rss_mb"] / sm["peak_rss_mb"]
    ea = results.get("openft_eager")
    if o and ea:  # the compiled kernels' A/B, same run
        report["compiled_throughput_ratio"] = o["sup_tok_s"] / ea["sup_tok_s"]
        report["compiled_peak_rss_ratio"] = o["peak_rss_mb"] / ea["peak_rss_mb"]
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


def print_table(r: dict) -> None:
    print(
        f"train_bench: {r['model']} ({r['n_params'] / 1e6:.1f}M), {r['method']} on {r['device']} "
        f"({r['machine']['cpu']}, {r['machine']['cores']} cores, bf16 instructions: "
        f"{', '.join(r['machine']['bf16_features']) or 'none'}), {r['train_rows']} train rows (mean {r['mean_example_tokens']:.0f} "
        f"tokens), {r['valid_rows']} held out, hp {r['hyperparameters']}"
    )
    print(
        f"matmul peak: fp32 {r['matmul_peak_flops'] / 1e9:.1f}, bf16 {r['matmul_peak_flops_bf16'] / 1e9:.1f} GFLOP/s "
        f"({r['threads']} threads); openft trained in {r.get('openft_precision', '-')} "
        f"under {r.get('openft_allocator', '-')} malloc; "
        f"best-configured peer: {r.get('best_peer')}"
    )
    decision = r.get("openft_precision_decision")
    if decision:
        print(f"openft's auto: {decision.get('text')}; trl_best in {r.get('trl_precision', '-')}")
    head = (
        f"{'config':<17}{'sup tok/s':>10}{'/cpu-s':>8}{'padding':>9}{'wall s':>8}{'1st step s':>11}{'peak RSS MB':>12}"
        f"{'val loss':>10}{'GFLOP/s':>9}{'of peak':>9}{'steps':>7}"
    )
    print(head)
    print("-" * len(head))
    for name, c in r["configs"].items():
        print(
            f"{name:<17}{c['sup_tok_s']:>10.1f}{c['sup_tok_per_cpu_s']:>8.1f}{c['padding_fraction']:>9.1%}{c['wall_s']:>8.1f}{c['first_step_s']:>11.1f}"
            f"{c['peak_rss_mb']:>12.0f}{c['val_loss']:>10.4f}{c['flops'] / 1e9:>9.1f}{c['peak_fraction']:>9.1%}"
            f"{c['steps']:>7}"
        )
    targets = [
        ("throughput_ratio", ">= 1.3"),
        ("cpu_throughput_ratio", "(per CPU-second, cross-check)"),
        ("throughput_ratio_unpacked", ">= 2.0"),
        ("peak_rss_ratio", "<= 0.7"),
        ("val_loss_ratio", "<= 1.01"),
        ("peak_fraction_chosen", ">= 0.5 (of the chosen precision's peak)"),
        ("peak_fraction", "(of the fp32 peak)"),
        ("peak_fraction_bf16", "(of the bf16 peak, reference)"),
        ("throughput_ratio_fp32_peer", "(vs trl_packed fp32)"),
        ("allocator_throughput_ratio", "(openft / openft_system_malloc)"),
        ("allocator_peak_rss_ratio", "(openft / openft_system_malloc)"),
        ("compiled_throughput_ratio", "(openft / openft_eager)"),
        ("compiled_peak_rss_ratio", "(openft / openft_eager)"),
    ]
    for key, target in targets:
        if key in r:
            print(f"{key:<28}{r[key]:>8.3f}   target {target}")
    if "trl_defaults" in r["configs"]:
        print(
            f"(trl_defaults: bf16 autocast, capped at {r['hyperparameters']['defaults_steps']} steps; reference only)"
        )


if __name__ == "__main__":
    sys.exit(main())
