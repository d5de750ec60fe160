"""Which token ids end a model's answer.

Serving (`serve/engine.py`) and the before/after comparison (`eval/generate.py`)
both ask this one function, so the comparison shows the answer the served model
gives: an answer stops at the tokenizer's eos, at any end token the checkpoint's
generation config names (Llama 3 ends turns with `<|eot_id|>`, which is not its
tokenizer's eos), and at the end-of-turn token the model's own chat template
writes (ChatML's `<|im_end|>`): a model whose eos is `<|endoftext|>` but whose
template closes turns with `<|im_end|>` would otherwise run on into a new turn. The family templates that
`openft.models.templates` gives base models end turns with tokens of this list
(Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`), and its
plain-text template with the eos itself, so whichever template a model is trained
and served with, its end of turn stops generation.
"""

from __future__ import annotations

from openft.models.fasttok import token_id

# End-of-turn tokens of common chat templates; one counts when the template writes it
# (Llama 3.1 ends a turn that calls a tool with <|eom_id|>).
END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The ids, the tokenizer's eos first (callers pad with the first when the
    tokenizer has no pad token). Raises ValueError when there is none at all."""
    ids: list[int] = []

    def add(i) -> None:
        if isinstance(i, int) and i not in ids:
            ids.append(i)

    add(tokenizer.eos_token_id)
    extra = getattr(generation_config, "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        add(i)
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    for t in END_OF_TURN:
        if t in template:
            add(token_id(tokenizer, t))
    if not ids:
        raise ValueError("the model's tokenizer has no end-of-sequence token, so answers would never stop")
    return ids
