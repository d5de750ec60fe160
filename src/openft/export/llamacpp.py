"""llama.cpp itself, through llama-cpp-python (an optional dependency:
`pip install 'openft[llamacpp]'`), for checking what an export answers.

Chats go through llama-cpp-python's chat handler, which renders the chat template
stored in the GGUF (as llama-server and LM Studio do) and stops at the tokens the
file marks as end of generation: a file whose template or stop tokens were lost
answers wrongly or runs to max_tokens here, as it would for a user.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from openft.export import ExportRefused

INSTALL = "pip install 'openft[llamacpp]'"


def llama_cpp():
    """The llama_cpp module, or a refusal that says how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportRefused(f"llama.cpp is not installed; {INSTALL}") from None
    return llama_cpp


@contextlib.contextmanager
def open_gguf(path: Path, *, lora: Path | None = None, n_ctx: int = 2048, logits_all: bool = False) -> Iterator:
    """A llama.cpp model on the CPU, freed on exit (its own finaliser fails at interpreter exit)."""
    llm = llama_cpp().Llama(
        str(path),
        lora_path=str(lora) if lora else None,
        n_ctx=n_ctx,
        n_threads=os.cpu_count() or 1,
        logits_all=logits_all,
        verbose=False,
    )
    try:
        yield llm
    finally:
        llm.close()


@dataclass(frozen=True)
class Reply:
    text: str
    stopped: bool  # finish_reason "stop": the model ended its turn


def chat(llm, messages: list[dict], max_tokens: int) -> Reply:
    """Greedy: temperature 0, top-k 1, no repetition penalty (openft's comparison decodes greedily)."""
    out = llm.create_chat_completion(
        messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0
    )
    choice = out["choices"][0]
    return Reply((choice["message"]["content"] or "").strip(), choice["finish_reason"] == "stop")
