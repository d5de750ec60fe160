"""The serving engine in bf16 on the real 135M built-in model (slow tier)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from openft.models.load import load_for_serving, materialise
from openft.models.registry import resolve
from openft.serve.engine import Engine, ModelHandle, SamplingParams

pytestmark = pytest.mark.slow

BUILTIN = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a neural network is in one sentence.",
    "Write a haiku about autumn leaves.",
]


def test_bf16_answers_are_what_the_fp32_model_would_say():
    """A bf16 engine answers four questions batched together (different prompt
    lengths: padding, bucketed widths, cache merging, one-row steps at the end).
    Teacher-forced through the fp32 model, nearly every token it chose is among
    the fp32 model's five most likely, and most are its first choice: bf16 shifts
    close calls, never the answer's sense."""
    path = materialise(resolve(BUILTIN))
    handle = ModelHandle(name=BUILTIN, base_path=path)
    eng = Engine(device="cpu", dtype=torch.bfloat16)
    try:
        prompts = [eng.apply_chat_template(handle, [{"role": "user", "content": q}]) for q in QUESTIONS]

        async def ask():
            params = SamplingParams(max_tokens=32, temperature=0)
            return await asyncio.gather(*[eng.complete(handle, p, params) for p in prompts])

        answers = [choices[0][0] for choices, _ in asyncio.run(ask())]
    finally:
        eng.stop()
    ref = load_for_serving(BUILTIN)
    tok, model = ref.tokenizer, ref.model
    in_top5 = top1 = total = 0
    with torch.inference_mode():
        for p, text in zip(prompts, answers):
            answer = list(tok(text, add_special_tokens=False)["input_ids"])
            assert len(answer) >= 4, f"a short answer: {text!r}"
            logits = model(input_ids=torch.tensor([p + answer])).logits[0, len(p) - 1 : -1]  # (len(answer), vocab)
            chosen = torch.tensor(answer)
            in_top5 += int((logits.topk(5, -1).indices == chosen[:, None]).any(-1).sum())
            top1 += int((logits.argmax(-1) == chosen).sum())
            total += len(answer)
    assert in_top5 >= 0.95 * total, (in_top5, total, answers)
    assert top1 >= 0.8 * total, (top1, total, answers)
