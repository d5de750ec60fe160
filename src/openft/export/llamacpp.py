"""llama.cpp itself, through llama-cpp-python (an optional dependency:
`pip install 'openft[llamacpp]'`), for checking what an export answers.

Chats go through llama-cpp-python's chat handler, which renders the chat template
stored in the GGUF (as llama-server and LM Studio do) and stops at the tokens the
file marks as end of generation: a file whose template or stop tokens were lost
answers wrongly or runs to max_tokens here, as it would for a user.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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


class LlamaCppCrashed(ExportRefused):
    """llama.cpp died in native code (a signal, not a Python error) while answering."""


def answer_all(path: Path, chats: list[list[dict]], max_tokens: int) -> list[Reply]:
    """Each chat answered by the GGUF at `path`, in a child process: llama.cpp is
    native code, and a crash there (ggml's AMX kernels segfault on some Xeons,
    ggml-org/llama.cpp#20824) must end this check with an error that says so, not
    take the caller's process, and a server's jobs, with it."""
    llama_cpp()  # installed, or refused here rather than in the child
    with tempfile.TemporaryDirectory(prefix="openft-llamacpp-") as tmp:
        out = Path(tmp) / "answers.json"
        child = multiprocessing.get_context("spawn").Process(
            target=_answer_to_file, args=(str(path), chats, max_tokens, str(out)), daemon=True
        )
        child.start()
        child.join()
        if child.exitcode != 0 or not out.is_file():
            raise LlamaCppCrashed(_crash_message(path, child.exitcode))
        return [Reply(**r) for r in json.loads(out.read_text())]


def _answer_to_file(path: str, chats: list[list[dict]], max_tokens: int, out: str) -> None:
    with open_gguf(Path(path)) as llm:
        replies = [asdict(chat(llm, c, max_tokens)) for c in chats]
    Path(out).write_text(json.dumps(replies))


def _crash_message(path: Path, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        how = f"crashed ({signal.Signals(-exitcode).name})"
        hint = (
            "; on a CPU with AMX, ggml's AMX kernels are a known cause: rebuild llama-cpp-python without them "
            "(CMAKE_ARGS=\"-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
            "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" pip install --no-cache-dir "
            "--force-reinstall llama-cpp-python), or run `make llamacpp`"
        )
    else:
        how, hint = f"failed (exit code {exitcode}; its error is printed above)", ""
    return f"llama.cpp {how} while answering the questions with {path}, so the parity check could not run{hint}"
