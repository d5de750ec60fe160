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

from openft.models.fasttok import token_id

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
    return token_id(tokenizer, THINK_OPEN) is not None and token_id(tokenizer, THINK_CLOSE) is not None


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


class ReasoningStream:
    """`split_reasoning` for a streamed answer: each `push(text)` returns the
    (reasoning, content) that can be sent now. A tag may arrive split across
    pieces, so a tail that could still become one is held until the next piece
    (or `finish`). `opened`: the prompt itself ended inside a block (DeepSeek-R1's
    generation prompt writes `<think>\\n`)."""

    def __init__(self, opened: bool = False):
        self.state = "think" if opened else "start"  # start -> think -> after -> content
        self.buf = ""

    def push(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            lead = self.buf.lstrip()
            if lead.startswith(THINK_OPEN):
                self.state, self.buf = "think", lead[len(THINK_OPEN) :].lstrip()
            elif THINK_OPEN.startswith(lead):
                return "", ""  # only whitespace or the tag's first characters so far
            else:
                self.state = "content"
        if self.state == "think":
            close = self.buf.find(THINK_CLOSE)
            if close < 0:
                keep = _partial_tail(self.buf, THINK_CLOSE)
                reasoning, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
                return reasoning, ""
            reasoning, self.buf = self.buf[:close], self.buf[close + len(THINK_CLOSE) :]
            self.state = "after"
        if self.state == "after":  # the whitespace between the block and the answer is neither
            self.buf = self.buf.lstrip()
            if self.buf:
                self.state = "content"
        if self.state == "content":
            content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held at the end: an unclosed block is reasoning, else content."""
        rest, self.buf = self.buf, ""
        return (rest, "") if self.state == "think" else ("", rest)


def _partial_tail(text: str, tag: str) -> int:
    """How many trailing characters of `text` are a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def prompt_opens_block(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the rendered prompt ends inside a `<think>` block (its last few tokens)."""
    tail = tokenizer.decode(prompt_ids[-8:]).rstrip()
    return tail.endswith(THINK_OPEN)
