"""Load a base model and its tokenizer, converting GGUF once to a safetensors cache.

transformers de-quantises a GGUF file (any quantisation gguf reads: Q4_1, Q8_0, the
K-quants) into a plain model of its family (`LlamaForCausalLM`, `Qwen2ForCausalLM`, the
text-only `Gemma3ForCausalLM`, ...; 30 s to a few minutes for the built-ins); we then save
it as safetensors under OPENFT_HOME/models/<name>, so every later load takes seconds.
A built-in's GGUF is assembled and its sha256 checked first (models/builtins.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from openft.fileio import sha256_files
from openft.models.builtins import gguf_target, verified_gguf
from openft.models.registry import BUILTINS, DEFAULT_MODEL, ModelNotFound, ModelSource, builtin_gguf_path, resolve
from openft.models.templates import ChatTemplate, apply_template

# transformers builds models under process-global patches (meta-device init, GGUF
# hooks), so two threads loading at once can corrupt each other's weights (seen in
# the server: "Cannot copy out of meta tensor"). Every load and conversion in this
# process takes this lock.
LOAD_LOCK = threading.RLock()


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    path: Path  # the safetensors directory the weights came from
    template: ChatTemplate | None = None  # the chat template the tokenizer renders with, and where it came from


def setup_torch() -> None:
    # Denormals slow CPU training and decoding 2-5x on this class of machine.
    torch.set_flush_denormal(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_builtin_tokenizer():
    """The built-in model's tokenizer (and chat template), cached after the first read."""
    from transformers import AutoTokenizer

    src = resolve(DEFAULT_MODEL)
    cached = src.cache_dir
    with LOAD_LOCK:
        if (cached / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(cached)
        b = BUILTINS[DEFAULT_MODEL]
        path = builtin_gguf_path(b)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _normalise_tokenizer(tok)
    return tok


def _normalise_tokenizer(tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        if getattr(tok, "pad_token_id", None) is None:  # fasttok's plain attributes
            tok.pad_token_id = tok.eos_token_id


def materialise(source: ModelSource) -> Path:
    """Return a local safetensors directory for `source`, converting if needed."""
    with LOAD_LOCK:
        return _materialise(source)


def _materialise(source: ModelSource) -> Path:
    if source.kind == "hf_dir":
        return source.path
    if source.kind == "hub":
        return _from_hub(source)
    if not is_materialised(source):
        _convert_gguf(_checked_gguf(source), source.cache_dir)
    return source.cache_dir


def _checked_gguf(source: ModelSource) -> Path:
    """The GGUF to convert: a built-in's file assembled (if it is not yet) and its size
    and sha256 checked first, so a corrupt file is refused before anything converts;
    any other GGUF as it is."""
    builtin = BUILTINS.get(source.name)
    if builtin is not None and source.path == gguf_target(builtin):
        return verified_gguf(builtin)
    return source.path


def is_materialised(source: ModelSource) -> bool:
    """Whether `source` has a local safetensors directory now, without converting or
    downloading anything: always for a HF directory, never for a hub id, and for a
    GGUF file once its conversion is cached (and was made from this same file: a
    name registered anew for another file is converted anew)."""
    if source.kind == "hf_dir":
        return True
    if source.kind == "hub":
        return False
    target = source.cache_dir
    if not ((target / "config.json").exists() and any(target.glob("*.safetensors"))):
        return False
    made_from = target / "SOURCE"
    # The real files compared: a home whose builtins folder links to another's (the
    # serving benchmark's scratch home) names the same GGUF by another path, and
    # comparing the names made the two homes convert the shared cache back and forth.
    return not made_from.exists() or Path(made_from.read_text().strip()).resolve() == Path(source.path).resolve()


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to safetensors (once; cached in {target}) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _normalise_tokenizer(tok)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **gguf_config_overrides(gguf)
    )
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its
    # config without quantization_config and copy the de-quantised weights in.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.architectures = [type(loaded).__name__]
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temp dir and rename: a crash mid-conversion never leaves a cache
    # that looks complete.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Architectures whose transformers GGUF mapping drops `<arch>.attention.key_length`, so the
# config falls back to the class default head_dim (Qwen3Config: 128) whatever the file says.
HEAD_DIM_FROM_KEY_LENGTH = frozenset({"qwen3", "qwen3moe"})


def gemma3_attention_scalar(n_layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """Gemma 3's query_pre_attn_scalar as llama.cpp computes it (a GGUF does not store
    it): the head size, but hidden/heads for the 27B (62 layers)."""
    return hidden // heads if n_layers == 62 else head_dim


def gguf_config_overrides(gguf: Path) -> dict:
    """Config values a GGUF states that transformers' mapping would lose: head_dim for
    Qwen3 files whose heads are not 128 wide; Gemma 3's attention scale, which
    transformers leaves at its 256 default whatever the heads are."""
    # transformers' own header reader takes ~0.1 s (it skips the vocabulary's arrays);
    # gguf.GGUFReader parses every token and took 20-30 s on the built-ins.
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # an older transformers 5.x: convert as it would on its own
        return {}
    metadata, _ = read_gguf_metadata(str(gguf))
    arch = metadata["general.architecture"]
    key_length = metadata.get(f"{arch}.attention.key_length")
    if arch in HEAD_DIM_FROM_KEY_LENGTH and key_length is not None:
        return {"head_dim": int(key_length)}
    if arch == "gemma3" and key_length is not None:
        hidden, heads = metadata["gemma3.embedding_length"], metadata["gemma3.attention.head_count"]
        n_layers = metadata["gemma3.block_count"]
        return {"query_pre_attn_scalar": gemma3_attention_scalar(n_layers, hidden, heads, int(key_length))}
    return {}


def _from_hub(source: ModelSource) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            source.hub_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
        )
    except Exception as e:  # noqa: BLE001 - any hub failure means the same to the user
        raise ModelNotFound(
            f"'{source.hub_id}' looks like a hub id, but the model hub is not reachable from this machine "
            f"({type(e).__name__}). Use a built-in model, a local model directory or a .gguf file."
        ) from e
    return Path(path)


def load_model(
    arg: str | ModelSource, *, dtype: torch.dtype = torch.float32, chat_template: str | Path | None = None
) -> LoadedModel:
    """The model and its tokenizer, which renders with the resolved chat template
    (`openft.models.templates`; `chat_template` is a Jinja file that overrides it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    setup_torch()
    source = resolve(arg) if isinstance(arg, str) else arg
    with LOAD_LOCK:
        path = materialise(source)
        tok = AutoTokenizer.from_pretrained(path)
        # use_kernels=False: transformers would otherwise "kernelize" the model on
        # every train()/eval(), fetching layer kernels from the Hugging Face Hub where
        # it can (openft reaches no hub at run time) and swapping layers' forwards
        # back to its own, undoing openft's training kernels (openft.train.fused).
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, use_kernels=False)
    _normalise_tokenizer(tok)
    template = apply_template(tok, model.config.to_dict(), chat_template)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, source=source, path=path, template=template)


def load_tokenizer(path: Path):
    """The tokenizer saved in `path`: the light one when it can stand in for
    transformers' (see fasttok), AutoTokenizer otherwise. Pad and chat template
    resolved as load_model does (the architecture read from `path`/config.json)."""
    from openft.models import fasttok

    tok = fasttok.load(path)
    if tok is None:
        from transformers import AutoTokenizer

        with LOAD_LOCK:  # transformers' loading patches process-wide state
            tok = AutoTokenizer.from_pretrained(path)
    _normalise_tokenizer(tok)
    apply_template(tok, _config_of(path))
    return tok


def _config_of(path: Path) -> dict:
    """config.json of a model directory ({} for an adapter folder, which has none)."""
    import json

    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def load_for_serving(arg: str | ModelSource, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """load_model for inference: the families openft's own forward covers (Llama,
    Qwen2, Qwen3, Gemma 3, Mistral; see openft.models.decoder) run on it and on its
    own tokenizer (fasttok), which spare the server 3-5 s of transformers imports;
    every other model goes through transformers."""
    from openft.models import decoder

    setup_torch()
    source = resolve(arg) if isinstance(arg, str) else arg
    with LOAD_LOCK:
        path = materialise(source)
        model = decoder.load(path, dtype)
    if model is None:
        return load_model(source, dtype=dtype)
    return LoadedModel(model=model, tokenizer=load_tokenizer(path), source=source, path=path)


def hash_weights(path: Path) -> str:
    """sha256 over the model's safetensors files (lineage: which exact base)."""
    return sha256_files(sorted(Path(path).glob("*.safetensors")))
