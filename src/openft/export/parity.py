"""The parity check: a question set answered by the trained model (openft, fp32,
greedy) and by the exported GGUF in llama.cpp (greedy), side by side.

An answer matches when its first 10 words are the trained answer's first 10 (all
of them for a shorter answer). Quantisation moves logits a little, and greedy
decoding turns a near tie into another word, so the bar is per quantisation:
f16 (and f32, bf16) at least 90% of questions, q8_0 75%; the coarser ones are
reported without a bar. Every exported answer must stop by itself wherever the
trained one did: a lost template or stop token shows as answers that never end.

Where two answers part, the check says by how much the trained model preferred
its own token there (its logit minus the exported answer's token's): a fine-tune
whose data words one thing two ways ("I'm" / "I am") leaves near ties, which any
rounding of the weights can flip, while a broken export parts at once and by far.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from openft.export import ExportRefused

BARS = {"f32": 0.9, "f16": 0.9, "bf16": 0.9, "q8_0": 0.75}
WORDS = 10


def first_words(text: str, n: int = WORDS) -> list[str]:
    return text.split()[:n]


@dataclass(frozen=True)
class ParityRow:
    question: str
    trained: str
    exported: str
    trained_stopped: bool
    exported_stopped: bool
    margin: float | None = None  # where they part: the trained model's lead of its token, in logits

    @property
    def match(self) -> bool:
        return first_words(self.trained) == first_words(self.exported)

    @property
    def stops(self) -> bool:
        return self.exported_stopped or not self.trained_stopped


@dataclass
class Parity:
    quant: str
    rows: list[ParityRow]

    @property
    def matches(self) -> int:
        return sum(r.match for r in self.rows)

    @property
    def stops(self) -> int:
        return sum(r.stops for r in self.rows)

    @property
    def bar(self) -> float | None:
        return BARS.get(self.quant)

    @property
    def passed(self) -> bool:
        n = len(self.rows)
        return self.stops == n and (self.bar is None or self.matches >= self.bar * n)

    def verdict(self) -> str:
        n = len(self.rows)
        bar = f" (bar: {self.bar:.0%})" if self.bar is not None else " (no bar for this quantisation)"
        margins = sorted(r.margin for r in self.rows if not r.match and r.margin is not None)
        parted = f"; the {len(margins)} that differ part where the trained model led by {fmt(margins)} logits" * bool(
            margins
        )
        return (
            f"{self.quant}: first {WORDS} words match on {self.matches}/{n}{bar}{parted}; "
            f"{self.stops}/{n} answers stop where the trained model's do: {'PASS' if self.passed else 'FAIL'}"
        )


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def check_parity(loaded, gguf_path: Path, quant: str, questions: list[str], *, max_new_tokens: int = 128) -> Parity:
    """`loaded`: the trained model (merged, fp32) whose export is at `gguf_path`."""
    from openft.eval.generate import generate_answers
    from openft.export.llamacpp import answer_all

    chats = [[{"role": "user", "content": q}] for q in questions]
    exported = answer_all(gguf_path, chats, max_new_tokens)  # first: a llama.cpp crash costs no generation
    trained = generate_answers(loaded.model, loaded.tokenizer, chats, max_new_tokens=max_new_tokens)
    rows = [ParityRow(q, t.text, e.text, t.stopped, e.stopped) for q, t, e in zip(questions, trained, exported)]
    rows = [r if r.match else replace(r, margin=parting_margin(loaded, r)) for r in rows]
    return Parity(quant, rows)


def parting_margin(loaded, row: ParityRow) -> float | None:
    """The trained model's logit for its own next token minus that for the exported
    answer's, at the first token where the two answers part (None if one is a prefix)."""
    import torch

    from openft.eval.generate import prompt_ids

    tok = loaded.tokenizer
    head = prompt_ids(tok, [{"role": "user", "content": row.question}])  # the prompt both answers came from
    mine, theirs = (tok(a, add_special_tokens=False)["input_ids"] for a in (row.trained, row.exported))
    k = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    if k is None:
        return None
    with torch.no_grad():
        logits = loaded.model(torch.tensor([head + mine[:k]])).logits[0, -1]
    return float(logits[mine[k]] - logits[theirs[k]])


def questions_of(run_dir: Path, questions: str | None) -> list[str]:
    """`questions` (a question file), else the question set the run was compared on."""
    from openft.eval.questions import load_questions
    from openft.train.export import run_and_adapter

    if questions is None:
        config = json.loads((run_and_adapter(run_dir)[0] / "config.json").read_text())
        questions = (config.get("eval") or {}).get("questions")
        if not questions or not Path(questions).is_file():
            raise ExportRefused("the run has no question set on disk to check with; pass --questions FILE")
    return [q.question for q in load_questions(questions)]
