"""Answer a list of questions with a causal LM, deterministically.

The before/after comparison is only fair if both models see exactly the same
prompts and decoding settings, so this module pins everything: the tokenizer's
own chat template, greedy decoding (no sampling, no temperature), one explicit
generation config that ignores whatever sampling defaults a checkpoint ships, and
eval mode (dropout off). The same model and questions give the same answers on
every run and for every batch size.

The model is any `nn.Module` with a transformers-style `generate` (a plain
`AutoModelForCausalLM`, or one whose linear layers were wrapped for LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openft.models.padding import left_pad
from openft.models.stop import stop_token_ids


def answer_questions(
    model,
    tokenizer,
    questions: list[str],
    *,
    max_new_tokens: int = 96,
    system: str | None = None,
    batch_size: int = 8,
    tools: list[list[dict] | None] | None = None,
) -> list[str]:
    """One answer per question, in the questions' order (greedy, special tokens dropped).
    `tools[i]`: the tool definitions question i offers (rendered by the model's template)."""
    head = [{"role": "system", "content": system}] if system else []
    conversations = [head + [{"role": "user", "content": q}] for q in questions]
    return answer_conversations(
        model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size, tools=tools
    )


def answer_conversations(model, tokenizer, conversations: list[list[dict]], **options) -> list[str]:
    """The assistant's next answer to each conversation, greedy, in their order
    (`options` as generate_answers takes them)."""
    return [a.text for a in generate_answers(model, tokenizer, conversations, **options)]


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # ended at a stop token, not at max_new_tokens


def generate_answers(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    tools: list[list[dict] | None] | None = None,
) -> list[Answer]:
    """The assistant's next answer to each conversation, greedy, in their order, with
    whether each stopped by itself. `tools[i]`: the tool definitions conversation i offers."""
    from transformers import GenerationConfig

    if not conversations:
        return []
    tools = tools or [None] * len(conversations)
    prompts = [prompt_ids(tokenizer, c, t) for c, t in zip(conversations, tools)]
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    device = next(model.parameters()).device

    # Longest first: prompts of similar length share a batch (little padding), and
    # a batch that does not fit in memory fails at once rather than at the end.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[Answer] = [Answer("", False)] * len(prompts)
    was_training = model.training
    model.eval()  # dropout on would make greedy decoding random
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                input_ids, attention_mask, _ = left_pad([prompts[i] for i in idx], pad_id)
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                )
                # out: (batch, prompt_len + new) with the padded prompt in front.
                new_tokens = out[:, input_ids.shape[1] :].tolist()
                for i, tokens in zip(idx, new_tokens):
                    answers[i] = Answer(_decode(tokenizer, tokens, eos_ids), any(t in eos_ids for t in tokens))
    finally:
        model.train(was_training)
    return answers


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    kwargs = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    # The template already wrote every special token (BOS included where the
    # model wants one); letting the tokenizer add its own would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the same as the server stops at
    (`openft.models.stop`), so the comparison shows the answer the served model gives."""
    return stop_token_ids(tokenizer, getattr(model, "generation_config", None))  # absent on bare nn.Modules


def _decode(tokenizer, tokens: list[int], eos_ids: list[int]) -> str:
    # Cut at the first end token ourselves: what follows is padding, and the pad
    # token is not always a special token that skip_special_tokens would drop.
    for pos, t in enumerate(tokens):
        if t in eos_ids:
            tokens = tokens[:pos]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()
