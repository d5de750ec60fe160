"""DPO benchmark: openft's DPO against TRL's DPOTrainer + PEFT on the same work.

Both sides train the same model (`--model NAME`, as openft.models.registry.resolve
takes it; default the built-in smollm2-135m-instruct, fp32 on CPU, loaded by TRL as
train_bench loads it: AutoModelForCausalLM.from_pretrained of the converted
safetensors) on the same preference pairs: the first `--pairs` pairs of
../shared/datasets/dpo_en_demo.json (LLaMA-Factory ShareGPT pairs) whose two sides
both fit in `--max-length` tokens, so neither side truncates anything (pairs that
do not fit are skipped and counted). openft reads those records as they are (its
`sharegpt_preference` layout); TRL gets them in its conversational
prompt/chosen/rejected form, built from the messages openft parsed, so both render
them through the model's chat template from the same messages.

Same hyperparameters on both sides: LoRA r=16, alpha=32, dropout 0 on every linear
layer of the blocks (openft's default targets, given to PEFT by name), the same
initial LoRA weights (openft's initialisation, written by the openft process before
its first step and loaded into PEFT's adapter, so both start at loss log 2 and
move alike), precision fp32 (`--precision bf16`: openft's bf16 mixed precision,
TRL's bf16=True autocast), sigmoid DPO loss with beta 0.1, `--pairs-per-step`
pairs per optimizer step in one batch (TRL: per_device_train_batch_size, no
gradient accumulation; openft cuts a step into micro-batches under its token
budget, which leaves the gradient unchanged), AdamW (betas 0.9/0.999, eps 1e-8,
weight decay 0; torch's fused kernel on both), constant learning rate with no
warm-up, grad-norm clip 1.0, seed 0. The pairs of every step are the same: openft
plans its steps (openft.train.batching.plan_steps, a seeded shuffle per epoch) and
TRL's trainer is handed a sampler that yields openft's order of each epoch (the
orders it yielded are checked against the plan, and the real tokens of every
step against openft's).

Configurations (each in its own subprocess, `dpo_bench.py --_child NAME SPEC`):
  openft     openft.train.recipe.finetune with objective dpo, the real path: the
             reference log-probs of every pair computed once before the first
             step (LoRA: the base with its adapters off), both answers of a group
             of pairs in one forward under the token budget, the LM head only at
             answer positions; started under tcmalloc where the machine has it, as
             openft starts its training processes (openft.heap).
  trl        DPOTrainer + PEFT, gradient checkpointing OFF (faster on a CPU for
             this model; TRL's default is on), the reference by disabling the
             adapter in every step (TRL's PEFT path), run under the system malloc.
  trl_ckpt   the same with TRL's default gradient_checkpointing=True (less
             activation memory, one more forward per step).
  trl_precompute  `trl` with precompute_ref_log_probs=True: the reference
             log-probs computed once before training, as openft does (timed as
             training: the pass runs inside DPOTrainer's constructor).
The peer of the ratios is the fastest TRL configuration of the run (pairs/s);
the RSS ratio against the TRL configuration with the lowest peak RSS is printed too.

Figures per configuration:
  loss       the DPO loss of every optimizer step (mean over its pairs, computed
             in the step's forward, i.e. before that step's update): openft's
             metrics rows, TRL's logged `loss` (logging_steps=1); with rewards and
             the reward margin beside it. max_rel_loss_diff: max over steps of
             |openft - trl| / |trl|.
  pairs/s    pairs trained (steps x pairs per step) / training seconds: openft
             from the start of its reference pass to its last step, TRL from
             on_train_begin to its last step plus trl_precompute's reference pass
             (each side's reference work included, tokenisation and loading not).
             /cpu-s: the same per CPU-second of the process, the cross-check when
             other work shares the machine.
  peak RSS   resource.getrusage(RUSAGE_SELF).ru_maxrss of the process after training.
  padding    1 - real tokens / positions the forwards ran.

Data check (printed): every pair's token ids as openft encodes them and as TRL
tokenised them (its processed dataset), and which tokens each sums log-probs over.

What the comparison found (TRL 1.16, transformers 5.24, smollm2's ChatML template):
the input ids are identical, but TRL sums one more token per side: its completion
is everything after the tokenised prompt, so it includes the "\\n" the template
writes after <|im_end|>, which openft leaves out (tokenize.assistant_spans drops
trailing whitespace after the end-of-turn token). In fp32 the per-step losses agree
to ~1e-5 relative (--quick: max 1.4e-5, the default run 8.5e-5); with that token masked out of TRL's sums
(an ad-hoc collator, not part of this file) the gap fell to 2.5e-6, fp32 rounding
of the different batch shapes. In bf16 (--precision bf16) the losses part by a few
percent from step 2 on (8% at step 2 of --quick), both sides as far from the fp32
run as from each other: a summed answer log-prob moves 0.1-0.5 nats between fp32
and bf16 and up to 0.15 nats with the batch it runs in, i.e. 0.01-0.05 of reward
margin at beta 0.1, about the size of the first steps' margins; and openft's bf16
stores the frozen base in bf16 where TRL autocasts over fp32 weights. Compare
losses in fp32.

Commands (from the repo root; OPENFT_HOME must hold the converted built-in):
  OPENFT_HOME=/root/.openft .venv/bin/python benchmarks/dpo_bench.py --quick
  OPENFT_HOME=/root/.openft .venv/bin/python benchmarks/dpo_bench.py --json
--quick: 6 pairs of <= 160 tokens a side, 2 per step, 2 epochs (6 steps), openft, trl and
trl_precompute;
the default: 24 pairs of <= 384 tokens a side, 4 per step, 2 epochs (12 steps), every configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()
REPO = Path(__file__).resolve().parent.parent
DATASET = REPO.parent / "shared" / "datasets" / "dpo_en_demo.json"
MODEL = "smollm2-135m-instruct"
CONFIGS = ("openft", "trl", "trl_ckpt", "trl_precompute")
QUICK_CONFIGS = ("openft", "trl", "trl_precompute")
LORA_R, LORA_ALPHA = 16, 32
INIT_ADAPTER = "openft_init_adapter.safetensors"  # openft's LoRA weights before its first step


# ---------------------------------------------------------------- data -------


def parent_tokenizer(model: str):
    """The tokenizer as openft.models.load.load_model sets it up (pad token, resolved chat template)."""
    from transformers import AutoTokenizer

    from openft.models.load import materialise
    from openft.models.registry import resolve
    from openft.models.templates import apply_template

    path = materialise(resolve(model))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    apply_template(tok, json.loads((Path(path) / "config.json").read_text()))
    return tok


def select_pairs(tok, dataset: Path, n: int, limit: int) -> tuple[list[int], list, int]:
    """The first `n` pairs of `dataset` whose two sides (prompt + answer, as openft
    encodes them) are both at most `limit` tokens: (their record indices, their
    openft Examples, how many earlier pairs were skipped as too long)."""
    from openft.data.load import load_dataset
    from openft.train import dpo

    res = load_dataset(str(dataset))
    records = json.loads(dataset.read_text())
    if not res.ok or len(res.examples) != len(records) or not all(e.is_pair for e in res.examples):
        raise SystemExit(f"{dataset}: expected {len(records)} preference pairs, openft read {len(res.examples)}")
    picked, examples, skipped = [], [], 0
    for i, ex in enumerate(res.examples):
        p = dpo.encode_pair(tok, ex, 1 << 30, i)
        if max(len(p.chosen), len(p.rejected)) <= limit:
            picked.append(i)
            examples.append(ex)
            if len(picked) == n:
                break
        else:
            skipped += 1
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} pairs of {dataset} fit in {limit} tokens a side (asked for {n})")
    return picked, examples, skipped


def to_trl(ex) -> dict:
    """TRL's conversational preference row, from the messages openft parsed."""
    from openft.train.tokenize import chat_messages

    prompt = ex.prompt
    return {
        "prompt": chat_messages(prompt),
        "chosen": chat_messages(ex.messages[len(prompt) :]),
        "rejected": chat_messages(ex.rejected),
    }


def data_check(tok, examples: list, trl_rows: list[dict]) -> dict:
    """openft's encoding of each pair against TRL's tokenised dataset (row i is pair
    i): same input ids? which tokens does each side sum log-probs over?"""
    from collections import Counter

    from openft.train import dpo
    from openft.train.tokenize import IGNORE

    ids_same, answers_same, sides = 0, 0, 0
    openft_tokens = trl_tokens = 0
    only_trl: Counter = Counter()
    only_openft: Counter = Counter()
    for i, row in enumerate(trl_rows):
        p = dpo.encode_pair(tok, examples[i], 1 << 30, i)
        for enc, key in ((p.chosen, "chosen_ids"), (p.rejected, "rejected_ids")):
            sides += 1
            full = row["prompt_ids"] + row[key]
            ids_same += enc.input_ids == full
            mine = {t for t, lab in enumerate(enc.labels) if lab != IGNORE}
            theirs = set(range(len(row["prompt_ids"]), len(full)))
            answers_same += mine == theirs
            openft_tokens += len(mine)
            trl_tokens += len(theirs)
            for t in theirs - mine:
                only_trl[repr(tok.decode(full[t : t + 1]))] += 1
            for t in mine - theirs:
                only_openft[repr(tok.decode(enc.input_ids[t : t + 1]))] += 1
    return {
        "pairs": len(trl_rows),
        "sides": sides,
        "input_ids_identical": ids_same,
        "answer_tokens_identical": answers_same,
        "openft_answer_tokens": openft_tokens,
        "trl_answer_tokens": trl_tokens,
        "only_trl_sums": dict(only_trl),
        "only_openft_sums": dict(only_openft),
    }


# -------------------------------------------------------------- children -----


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_openft(spec: dict) -> dict:
    import torch
    from safetensors.torch import save_file

    from openft.config import DataConfig, JobSpec, LoraConfig, TrainConfig
    from openft.models.load import load_model
    from openft.train import dpo
    from openft.train.lora import adapter_state
    from openft.train.recipe import finetune

    cuda = spec["device"] == "cuda"  # (untested: no GPU machine has run this benchmark yet)
    loaded = load_model(spec["model"], dtype=torch.float32)  # fp32 weights; bf16 is the precision's doing
    if cuda:
        loaded.model.to("cuda")
    h = spec["hp"]
    job = JobSpec(
        model=spec["model"],
        data=DataConfig(path=spec["openft_path"], validation_split=0.0, layout="sharegpt_preference"),
        lora=LoraConfig(rank=LORA_R, alpha=float(LORA_ALPHA), dropout=0.0),
        train=TrainConfig(
            method="lora",
            objective="dpo",
            beta=h["beta"],
            epochs=h["epochs"],
            learning_rate=h["lr"],
            batch_size=h["pairs_per_step"],
            max_seq_length=h["max_length"],
            warmup_ratio=0.0,
            scheduler="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=h["seed"],
            eval_every=10**9,
            save_every=10**9,
            precision=h["precision"],
        ),
        output_dir=str(Path(spec["tmp"]) / "openft-run"),
    )
    marks: dict = {"steps": [], "ref": []}
    inner = dpo.reference_logps

    def timed_reference(*a, **k):  # the recipe calls it through the module: the start of its DPO work
        t, c = time.time(), cpu_s()
        out = inner(*a, **k)
        marks["ref"].append((t, c, time.time()))
        return out

    dpo.reference_logps = timed_reference

    def on_event(kind: str, data: dict) -> None:
        if kind == "started":  # LoRA applied, reference done, no step yet: the initial adapter
            marks["init"] = {k: v.detach().to("cpu", copy=True) for k, v in adapter_state(loaded.model).items()}
            marks["precision"] = data.get("precision", {}).get("text")
        elif kind == "metrics":
            marks["steps"].append((time.time(), data))
            marks["c1"] = cpu_s()

    finetune(job, on_event=on_event, progress=False, loaded=loaded)
    rss = rss_mb()
    save_file(marks["init"], str(Path(spec["tmp"]) / INIT_ADAPTER))
    t0, c0, _ = marks["ref"][0]
    rows = [d for _, d in marks["steps"]]
    t_end = marks["steps"][-1][0]
    return {
        "train_s": t_end - t0,
        "train_cpu_s": marks["c1"] - c0,
        "reference_s": sum(e - s for s, _, e in marks["ref"]),
        "first_step_s": marks["steps"][0][0] - T_START,
        "steps": len(rows),
        "pairs_trained": len(rows) * h["pairs_per_step"],
        "real_tokens": sum(r["tokens"] for r in rows),
        "positions": sum(r["padded_tokens"] for r in rows),
        "step_tokens": [r["tokens"] for r in rows],
        "step_s": _durations(marks["ref"][-1][2], [t for t, _ in marks["steps"]]),
        "loss": [r["train_loss"] for r in rows],
        "chosen_reward": [r["train_chosen_reward"] for r in rows],
        "rejected_reward": [r["train_rejected_reward"] for r in rows],
        "reward_margin": [r["train_reward_margin"] for r in rows],
        "reward_accuracy": [r["train_reward_accuracy"] for r in rows],
        "learning_rate": [r["learning_rate"] for r in rows],
        "peak_rss_mb": rss,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "precision": marks.get("precision"),
        "lora_init": "openft",
    }


def _durations(t0: float, ends: list[float]) -> list[float]:
    """Seconds of each step from its end times (the first from `t0`)."""
    return [b - a for a, b in zip([t0] + ends[:-1], ends)]


class _Counting:
    """Wraps TRL's collator: the real tokens and positions of every batch it builds."""

    def __init__(self, inner):
        self.inner, self.real, self.positions = inner, [], []

    def __call__(self, examples):
        b = self.inner(examples)
        self.positions.append(b["input_ids"].numel())
        self.real.append(int(b["attention_mask"].sum()))
        return b


def load_init_adapter(model, path: Path) -> int:
    """openft's initial LoRA weights (PEFT key names) into PEFT's default adapter."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    done = 0
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            key = name.replace(".default.", ".")
            if key not in state:
                raise KeyError(f"openft's initial adapter has no {key}")
            param.data.copy_(state[key])
            done += 1
    if done != len(state):
        raise ValueError(f"loaded {done} LoRA weights of openft's {len(state)}")
    return done


def child_trl(spec: dict, name: str) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from openft.models.load import materialise, setup_torch
    from openft.models.registry import resolve
    from openft.train.lora import default_targets

    setup_torch()  # flush-to-zero: the CPU setting openft runs with
    cuda = spec["device"] == "cuda"
    path = materialise(resolve(spec["model"]))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    targets = default_targets(model)
    ds = load_dataset("json", data_files=spec["trl_path"], split="train")  # row i = pair i
    h = spec["hp"]
    orders = spec["epoch_orders"]
    args = DPOConfig(
        output_dir=str(Path(spec["tmp"]) / f"{name}-out"),
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=not cuda,
        bf16=h["precision"] == "bf16",  # autocast over the fp32 weights
        gradient_checkpointing=name == "trl_ckpt",
        per_device_train_batch_size=h["pairs_per_step"],
        gradient_accumulation_steps=1,
        num_train_epochs=h["epochs"],
        learning_rate=h["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=h["seed"],
        logging_steps=1,
        beta=h["beta"],
        loss_type=["sigmoid"],
        max_length=h["max_length"],
        precompute_ref_log_probs=name == "trl_precompute",
    )
    peft_config = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
    )
    marks: dict = {"steps": [], "logs": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["t0"], marks["c0"] = time.time(), cpu_s()

        def on_step_end(self, *a, **k):
            marks["steps"].append(time.time())
            marks["c1"] = cpu_s()

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                marks["logs"].append(dict(logs))

    class Planned(torch.utils.data.Sampler):
        """openft's order of each epoch (plan_steps), one epoch per pass."""

        def __init__(self):
            self.yielded: list[list[int]] = []

        def __len__(self) -> int:
            return len(orders[0])

        def __iter__(self):
            order = orders[min(len(self.yielded), len(orders) - 1)]
            self.yielded.append(order)
            return iter(order)

    sampler = Planned()
    pre: list[tuple[float, float]] = []

    class BenchDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return sampler

        def _precompute_ref_logps(self, *a, **k):  # trl_precompute's reference pass, timed as training
            t, c = time.time(), cpu_s()
            out = super()._precompute_ref_logps(*a, **k)
            pre.append((time.time() - t, cpu_s() - c))
            return out

    trainer = BenchDPOTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[Clock()]
    )
    init = Path(spec["tmp"]) / INIT_ADAPTER
    lora_init = "peft"
    if init.exists():
        load_init_adapter(trainer.model, init)
        lora_init = "openft"
    counter = _Counting(trainer.data_collator)
    trainer.data_collator = counter
    processed = trainer.train_dataset
    tokenised = [
        {k: processed[j][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for j in range(len(processed))
    ]
    trainer.train()
    rss = rss_mb()
    logs = marks["logs"]
    steps = len(marks["steps"])
    return {
        "train_s": marks["steps"][-1] - marks["t0"] + sum(x for x, _ in pre),
        "train_cpu_s": marks["c1"] - marks["c0"] + sum(c for _, c in pre),
        "reference_s": sum(x for x, _ in pre) if pre else None,
        "sampler_orders": sampler.yielded,
        "first_step_s": marks["steps"][0] - T_START,
        "steps": steps,
        "pairs_trained": steps * h["pairs_per_step"],
        "real_tokens": sum(counter.real[:steps]),
        "positions": sum(counter.positions[:steps]),
        "step_tokens": counter.real[:steps],
        "step_s": _durations(marks["t0"], marks["steps"]),
        "loss": [g["loss"] for g in logs],
        "chosen_reward": [g.get("rewards/chosen") for g in logs],
        "rejected_reward": [g.get("rewards/rejected") for g in logs],
        "reward_margin": [g.get("rewards/margins") for g in logs],
        "reward_accuracy": [g.get("rewards/accuracies") for g in logs],
        "learning_rate": [g.get("learning_rate") for g in logs],
        "grad_norm": [g.get("grad_norm") for g in logs],
        "peak_rss_mb": rss,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "precompute_ref_log_probs": bool(args.precompute_ref_log_probs),
        "lora_targets": targets,
        "lora_init": lora_init,
        "_tokenised": tokenised,
    }


def run_child(name: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = child_openft(spec) if name == "openft" else child_trl(spec, name)
    res["wall_s"] = time.time() - T_START
    from openft.heap import allocator_in_use

    res["allocator"] = allocator_in_use()
    Path(out_path).write_text(json.dumps(res))


# ---------------------------------------------------------------- parent -----


def launch(name: str, spec_path: str, tmp: str, timeout: float) -> dict:
    out = Path(tmp) / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name, spec_path, str(out)]
    t = time.time()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "src")}
    if name == "openft":
        from openft.heap import training_env

        env = training_env(env)  # as `openft finetune` and the job worker start
    else:  # datasets' caches (tokenised rows, precomputed reference log-probs) live and die with the run
        env["HF_DATASETS_CACHE"] = str(Path(tmp) / "hf-datasets")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"configuration {name} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    res = json.loads(out.read_text())
    res["process_s"] = time.time() - t
    return res


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(o: dict, t: dict) -> dict:
    """openft against one TRL configuration: the loss of every step, throughput, memory."""
    n = min(len(o["loss"]), len(t["loss"]))
    diffs = [rel(o["loss"][i], t["loss"][i]) for i in range(n)]
    margin_diffs = [abs(o["reward_margin"][i] - t["reward_margin"][i]) for i in range(n)]
    return {
        "steps_compared": n,
        "same_steps": len(o["loss"]) == len(t["loss"]),
        "same_step_tokens": o["step_tokens"] == t["step_tokens"],
        "same_order": t["sampler_orders"] == o["epoch_orders"],
        "rel_loss_diff": diffs,
        "max_rel_loss_diff": max(diffs) if diffs else None,
        "max_abs_margin_diff": max(margin_diffs) if margin_diffs else None,
        "throughput_ratio": o["pairs_per_s"] / t["pairs_per_s"],
        "cpu_throughput_ratio": o["pairs_per_cpu_s"] / t["pairs_per_cpu_s"],
        "peak_rss_ratio": o["peak_rss_mb"] / t["peak_rss_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="6 short pairs, 6 steps, three configurations: ~2-3 min on 2 cores"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--model", default=MODEL, help=f"a built-in, registered name or path (default {MODEL})")
    ap.add_argument("--dataset", type=Path, default=DATASET, help="LLaMA-Factory ShareGPT preference pairs (JSON)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--pairs", type=int, help="pairs trained (default 24; quick 6)")
    ap.add_argument("--pairs-per-step", type=int, help="pairs per optimizer step (default 4; quick 2)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-length", type=int, help="longest side in tokens; longer pairs are skipped (384; quick 160)")
    ap.add_argument("--lr", type=float, default=5e-5, help="constant learning rate (default 5e-5, openft's DPO auto)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--configs", help="comma-separated, from " + ",".join(CONFIGS) + " (quick: openft,trl,trl_precompute)"
    )
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        run_child(*a._child)
        return 0
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
            return 2
    os.environ.setdefault("OPENFT_HOME", str(REPO / ".openft-home"))
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from figures import machine

    from openft.train.batching import plan_steps

    n_pairs = a.pairs or (6 if a.quick else 24)
    pps = a.pairs_per_step or (2 if a.quick else 4)
    max_length = a.max_length or (160 if a.quick else 384)
    if n_pairs % pps:
        ap.error(f"--pairs ({n_pairs}) must be a multiple of --pairs-per-step ({pps}): every step the same size")
    configs = [c.strip() for c in (a.configs or ",".join(QUICK_CONFIGS if a.quick else CONFIGS)).split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    configs.sort(key=lambda c: c != "openft")  # openft first: TRL starts from its initial adapter

    tok = parent_tokenizer(a.model)
    picked, examples, skipped = select_pairs(tok, a.dataset, n_pairs, max_length)
    records = json.loads(a.dataset.read_text())
    plan = plan_steps([0] * n_pairs, pps, a.epochs, a.seed)  # the order depends on the count only
    epoch_orders = [[i for s in plan if s.epoch == e for i in s.examples] for e in range(a.epochs)]
    from openft.train import dpo

    lengths = [len(dpo.encode_pair(tok, ex, 1 << 30, i)) for i, ex in enumerate(examples)]
    hp = {
        "pairs": n_pairs,
        "pairs_per_step": pps,
        "epochs": a.epochs,
        "steps": len(plan),
        "lr": a.lr,
        "scheduler": "constant, no warm-up",
        "beta": a.beta,
        "seed": a.seed,
        "max_length": max_length,
        "precision": a.precision,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0},
        "adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "fused": True},
        "max_grad_norm": 1.0,
    }
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        openft_path, trl_path = Path(tmp) / "pairs.json", Path(tmp) / "trl_train.jsonl"
        openft_path.write_text(json.dumps([records[i] for i in picked], ensure_ascii=False))
        trl_path.write_text("".join(json.dumps(to_trl(ex), ensure_ascii=False) + "\n" for ex in examples))
        spec = {
            "openft_path": str(openft_path),
            "trl_path": str(trl_path),
            "model": a.model,
            "device": a.device,
            "hp": hp,
            "epoch_orders": epoch_orders,
            "tmp": tmp,
        }
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        results = {}
        for name in configs:
            if not a.json:
                print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = launch(name, str(spec_path), tmp, 3600)
    if "openft" in results:
        results["openft"]["epoch_orders"] = epoch_orders
    for r in results.values():
        r["pairs_per_s"] = r["pairs_trained"] / r["train_s"]
        r["pairs_per_cpu_s"] = r["pairs_trained"] / r["train_cpu_s"]
        r["padding_fraction"] = 1.0 - r["real_tokens"] / r["positions"]
    trl_names = [n for n in results if n != "openft"]
    check = None
    if trl_names:
        check = data_check(tok, examples, results[trl_names[0]]["_tokenised"])
    for n in trl_names:
        results[n].pop("_tokenised")
    report = {
        "model": a.model,
        "device": a.device,
        "machine": machine(),
        "quick": a.quick,
        "dataset": str(a.dataset),
        "pair_records": picked,
        "pairs_skipped_too_long": skipped,
        "mean_pair_tokens": sum(lengths) / len(lengths),
        "hyperparameters": hp,
        "log2": math.log(2),
        "data_check": check,
        "configs": results,
    }
    o = results.get("openft")
    if o and trl_names:
        report["vs"] = {n: compare(o, results[n]) for n in trl_names}
        best = max(trl_names, key=lambda n: results[n]["pairs_per_s"])
        lean = min(trl_names, key=lambda n: results[n]["peak_rss_mb"])
        report["best_peer"], report["leanest_peer"] = best, lean
        v = report["vs"][best]
        report["max_rel_loss_diff"] = max(x["max_rel_loss_diff"] for x in report["vs"].values())
        report["throughput_ratio"] = v["throughput_ratio"]
        report["cpu_throughput_ratio"] = v["cpu_throughput_ratio"]
        report["peak_rss_ratio"] = v["peak_rss_ratio"]
        report["peak_rss_ratio_leanest"] = report["vs"][lean]["peak_rss_ratio"]
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


def print_table(r: dict) -> None:
    hp, m = r["hyperparameters"], r["machine"]
    print(
        f"dpo_bench: {r['model']}, LoRA r={LORA_R} alpha={LORA_ALPHA} dropout 0, {hp['precision']} on {r['device']} "
        f"({m['cpu']}, {m['cores']} cores); {hp['pairs']} pairs (the first of {Path(r['dataset']).name} with both "
        f"sides <= {hp['max_length']} tokens, {r['pairs_skipped_too_long']} longer skipped; mean "
        f"{r['mean_pair_tokens']:.0f} tokens a pair, both sides), {hp['pairs_per_step']} pairs/step, {hp['epochs']} "
        f"epochs = {hp['steps']} steps, lr {hp['lr']:g} constant, beta {hp['beta']}, seed {hp['seed']}"
    )
    c = r.get("data_check")
    if c:
        extra = ", ".join(f"{k} x{v}" for k, v in c["only_trl_sums"].items()) or "none"
        extra_o = ", ".join(f"{k} x{v}" for k, v in c["only_openft_sums"].items()) or "none"
        print(
            f"data check ({c['pairs']} pairs, {c['sides']} sides): input ids identical {c['input_ids_identical']}/"
            f"{c['sides']}; summed answer tokens identical {c['answer_tokens_identical']}/{c['sides']} (openft "
            f"{c['openft_answer_tokens']}, TRL {c['trl_answer_tokens']}; only TRL sums: {extra}; only openft: {extra_o})"
        )
    cw = max(len(n) for n in r["configs"]) + 2
    head = (
        f"{'config':<{cw}}{'pairs/s':>9}{'/cpu-s':>8}{'padding':>9}{'ref s':>7}{'train s':>9}{'1st step s':>11}"
        f"{'wall s':>8}{'peak RSS MB':>12}{'steps':>7}  precision / init"
    )
    print(head)
    print("-" * len(head))
    for name, x in r["configs"].items():
        ref = f"{x['reference_s']:.1f}" if x.get("reference_s") is not None else "-"
        extra = f"{x['precision']}, {x['allocator']} malloc, LoRA init {x['lora_init']}"
        if name != "openft":
            extra += f", grad ckpt {'on' if x['gradient_checkpointing'] else 'off'}"
        print(
            f"{name:<{cw}}{x['pairs_per_s']:>9.3f}{x['pairs_per_cpu_s']:>8.3f}{x['padding_fraction']:>9.1%}{ref:>7}"
            f"{x['train_s']:>9.1f}{x['first_step_s']:>11.1f}{x['wall_s']:>8.1f}{x['peak_rss_mb']:>12.0f}"
            f"{x['steps']:>7}  {extra}"
        )
    names = list(r["configs"])
    o = r["configs"].get("openft")
    if o is None:
        return
    trl_names = [n for n in names if n != "openft"]
    widths = {n: max(14, len(n) + 8) for n in trl_names}
    cols = "".join(f"{n + ' loss':>{widths[n]}}{'rel diff':>10}" for n in trl_names)
    mcols = "".join(f"{n + ' margin':>{widths[n] + 2}}" for n in trl_names)
    head = f"{'step':>5}{'openft loss':>13}{cols}{'openft margin':>15}{mcols}"
    print(head)
    print("-" * len(head))
    for i, loss in enumerate(o["loss"]):
        line = f"{i + 1:>5}{loss:>13.6f}"
        for n in trl_names:
            t, w = r["configs"][n]["loss"], widths[n]
            line += f"{t[i]:>{w}.6f}{rel(loss, t[i]):>10.4%}" if i < len(t) else f"{'-':>{w}}{'-':>10}"
        line += f"{o['reward_margin'][i]:>15.5f}"
        for n in trl_names:
            t = r["configs"][n]["reward_margin"]
            line += f"{t[i]:>{widths[n] + 2}.5f}" if i < len(t) else f"{'-':>{widths[n] + 2}}"
        print(line)
    print(f"(log 2 = {r['log2']:.6f}: the loss of every pair while the adapter is still zero)")
    for n, v in r.get("vs", {}).items():
        print(
            f"vs {n}: same pairs in every step (sampler order {v['same_order']}, step tokens "
            f"{v['same_step_tokens']}), max rel loss diff {v['max_rel_loss_diff']:.4%}, "
            f"max |margin diff| {v['max_abs_margin_diff']:.5f}, pairs/s ratio {v['throughput_ratio']:.2f} "
            f"(per CPU-s {v['cpu_throughput_ratio']:.2f}), peak RSS ratio {v['peak_rss_ratio']:.3f}"
        )
    targets = [
        ("max_rel_loss_diff", "<= 0.01"),
        ("throughput_ratio", f">= 1.5 (vs {r.get('best_peer')}, the fastest TRL)"),
        ("cpu_throughput_ratio", "(per CPU-second, cross-check)"),
        ("peak_rss_ratio", f"<= 0.7 (vs {r.get('best_peer')})"),
        ("peak_rss_ratio_leanest", f"(vs {r.get('leanest_peer')}, the TRL with the lowest peak RSS)"),
    ]
    for key, target in targets:
        if key in r:
            print(f"{key:<24}{r[key]:>10.4g}   target {target}")


if __name__ == "__main__":
    sys.exit(main())
