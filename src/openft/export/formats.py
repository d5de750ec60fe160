"""One entry for every export format, used by the CLI and the HTTP API alike: each
returns what it wrote, the line that runs it and its notes, or raises
ExportRefused with the reasons."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from openft.export import ExportRefused

FORMATS = ("hf", "adapter", "vllm", "gguf", "gguf-lora", "ollama")
FILE_FORMATS = ("gguf", "gguf-lora")  # one file; the others write a folder
CHECKED_FORMATS = ("gguf", "ollama")  # the merged GGUF, which the parity check runs in llama.cpp
QUANT_FORMATS = ("gguf", "gguf-lora", "ollama")  # the formats that take a quantisation
ADAPTER_FORMATS = ("adapter", "gguf-lora")  # need an adapter: a full fine-tune has none


def default_quant(fmt: str) -> str:
    """Ollama's GGUF is q8_0 by default (half the f16 file, what Ollama's own library
    ships); a plain GGUF and a LoRA GGUF stay f16, the lossless one."""
    return "q8_0" if fmt == "ollama" else "f16"


def quants_for(fmt: str) -> tuple[str, ...]:
    """The quantisations this installation can write in `fmt` (none for the others)."""
    if fmt not in QUANT_FORMATS:
        return ()
    if fmt == "gguf-lora":
        from openft.export.gguf_lora import LORA_QUANTS

        return LORA_QUANTS
    from openft.export.gguf import available_quants

    return available_quants()


def export_options(run_dir: str | Path) -> dict:
    """What a run (or checkpoint) can be exported as: its formats, each format's
    quantisations and default, for the API's model details and the console."""
    from openft.train.export import run_and_adapter

    has_adapter = run_and_adapter(run_dir)[1] is not None
    formats = [f for f in FORMATS if has_adapter or f not in ADAPTER_FORMATS]
    return {
        "formats": formats,
        "quants": {f: list(quants_for(f)) for f in formats if f in QUANT_FORMATS},
        "default_quant": {f: default_quant(f) for f in formats if f in QUANT_FORMATS},
    }


@dataclass
class Exported:
    format: str
    path: Path  # the file or folder written
    summary: str  # what was written, in a few words
    command: str | None = None  # the line that runs it, where there is one
    notes: list[str] = field(default_factory=list)
    gguf: Path | None = None  # the GGUF file, for the formats that write one
    parity: object | None = None  # openft.export.parity.Parity, when checked


def export_as(
    fmt: str,
    run_dir: str | Path,
    out: str | Path,
    *,
    quant: str | None = None,
    name: str | None = None,
    merge: bool = False,
    check: list[str] | None = None,
    max_new_tokens: int = 128,
) -> Exported:
    """Write the run (or checkpoint) at `run_dir` to `out` in format `fmt`. With
    `check` (questions), the written GGUF answers them in llama.cpp beside the
    trained model (openft.export.parity); the model is loaded once for both."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    quant = quant or default_quant(fmt)
    loaded = None
    if check is not None:
        from openft.export.llamacpp import llama_cpp
        from openft.train.export import load_run

        if fmt not in CHECKED_FORMATS:
            raise ExportRefused(f"the parity check runs a merged GGUF: use it with {' or '.join(CHECKED_FORMATS)}")
        llama_cpp()  # installed, or refused before anything is written
        loaded = load_run(run_dir, merged=True)
    done = _WRITERS[fmt](Path(run_dir), Path(out), quant=quant, name=name, merge=merge, loaded=loaded)
    if check is not None:
        from openft.export.parity import check_parity

        done.parity = check_parity(loaded, done.gguf, quant, check, max_new_tokens=max_new_tokens)
    return done


def _hf(run_dir: Path, out: Path, **_) -> Exported:
    from openft.train.export import export

    path = export(run_dir, out)
    return Exported("hf", path, "merged model (safetensors + tokenizer)")


def _adapter(run_dir: Path, out: Path, **_) -> Exported:
    from openft.train.export import export

    path = export(run_dir, out, adapter_only=True)
    return Exported("adapter", path, "PEFT adapter")


def _vllm(run_dir: Path, out: Path, *, name, merge, **_) -> Exported:
    from openft.export.vllm import export_vllm

    done = export_vllm(run_dir, out, name=name, merge=merge)
    what = "merged model" if done.merged else f"adapter (rank {done.check.rank}, {', '.join(done.check.modules)})"
    return Exported("vllm", done.out, f"{what} for vLLM", done.command)


def _gguf(run_dir: Path, out: Path, *, quant, name, loaded, **_) -> Exported:
    from openft.export.gguf import export_gguf

    done = export_gguf(run_dir, out, quant=quant, name=name, loaded=loaded)
    notes = list(done.notes)
    if done.kept_f16:
        notes.append(f"{len(done.kept_f16)} matrices kept in f16 (rows not a whole number of {quant} blocks)")
    summary = f"GGUF, {quant}, {done.bytes / 2**20:.1f} MiB"
    return Exported("gguf", done.path, summary, shlex.join(["llama-server", "-m", str(done.path)]), notes, done.path)


def _gguf_lora(run_dir: Path, out: Path, *, quant, name, **_) -> Exported:
    from openft.export.gguf_lora import export_gguf_lora

    done = export_gguf_lora(run_dir, out, quant=quant, name=name)
    command = shlex.join(["llama-server", "-m", str(done.base_gguf or "BASE.gguf"), "--lora", str(done.path)])
    summary = f"LoRA GGUF, {done.quant}, {done.bytes / 2**20:.1f} MiB, {done.n_tensors} tensors"
    return Exported("gguf-lora", done.path, summary, command, done.notes, done.path)


def _ollama(run_dir: Path, out: Path, *, quant, name, loaded, **_) -> Exported:
    from openft.export.ollama import export_ollama

    done = export_ollama(run_dir, out, quant=quant, name=name, loaded=loaded)
    return Exported(
        "ollama", done.out, f"{done.gguf.name} and {done.modelfile.name}", done.command, done.notes, done.gguf
    )


_WRITERS = {"hf": _hf, "adapter": _adapter, "vllm": _vllm, "gguf": _gguf, "gguf-lora": _gguf_lora, "ollama": _ollama}
