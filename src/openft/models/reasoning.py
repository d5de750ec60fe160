"""Reasoning models (DeepSeek-R1 distills, Qwen3 thinking): `<think>...</think>` blocks.

A reasoning model writes its reasoning inside `<think>...</think>` before the
answer. Some templates open the block in the generation prompt (DeepSeek-R1's
ends with `<｜Assistant｜><think>\\n`), so the generated text may have only the
closing tag. Some templates inject an EMPTY block into answers that have none
(Qwen3 writes `<think>\\n\\n</think>\\n\\n` before the last answer): training never
learns from those tokens (see `openft.train.tokenize.reasoning_spans`).
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# An empty block with the whitespace after it: what a template injects.
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


def is_reasoning_model(tokenizer) -> bool:
    """Whether the model thinks in `<think>` blocks: its chat template writes one,
    or its vocabulary has both tags as tokens."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = "\n".join(t for t in template.values() if isinstance(t, str))
    if isinstance(template, str) and THINK_OPEN in template:
        return True
    vocab = tokenizer.get_vocab()
    return THINK_OPEN in vocab and THINK_CLOSE in vocab


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a generated answer, as DeepSeek's API returns
    `reasoning_content` beside `content`. The opening tag may be missing (the
    prompt opened the block); an unclosed block (cut off by max_tokens) is all
    reasoning. An empty block gives None; text without tags is all content."""
    close = text.find(THINK_CLOSE)
    if close < 0:
        open_ = text.find(THINK_OPEN)
        if open_ < 0 or text[:open_].strip():
            return None, text
        return text[open_ + len(THINK_OPEN) :].strip() or None, ""
    head, content = text[:close], text[close + len(THINK_CLOSE) :]
    open_ = head.find(THINK_OPEN)
    if open_ >= 0:
        head = head[open_ + len(THINK_OPEN) :]
    return head.strip() or None, content.lstrip()


def has_empty_think(text: str) -> bool:
    return EMPTY_THINK.search(text) is not None
