"""A serving tokenizer straight from `tokenizer.json`, without importing transformers.

transformers' AutoTokenizer is a thin layer over the Rust `tokenizers` library
plus a Jinja chat template, but importing it costs 2-4 s on this machine. The
server needs only: encode without special tokens, decode, the vocabulary, the
special tokens, and the chat template rendered as transformers renders it
(sandboxed Jinja, trim_blocks/lstrip_blocks, `tojson`, `raise_exception`,
`strftime_now`). `load` returns None when a directory has no `tokenizer.json`
or a template this cannot render the same way; the caller then uses
AutoTokenizer. tests/models/test_fasttok.py checks the outputs against
AutoTokenizer's on the built-in model's files.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from datetime import datetime
from functools import cache, lru_cache
from pathlib import Path
from types import MappingProxyType

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...} in older configs
        value = value.get("content")
    return value if isinstance(value, str) else None


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # transformers' `{% generation %}` marks assistant text for training masks;
        # rendering it is just rendering its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


_BACKENDS: dict[str, object] = {}  # sha256 of a tokenizer.json -> its Tokenizer
_BACKENDS_LOCK = threading.Lock()


def shared_backend(tokenizer_json: Path):
    """The Rust tokenizer of `tokenizer_json`, one per content in the process.
    Every fine-tune saves a copy of its base's tokenizer, whose template may
    differ (the family template is written into it); the tables are the same:
    185 MB resident for each Gemma 3 tokenizer (262k entries), which was most of
    what 8 Gemma adapters added to a server (1.15x its memory)."""
    from tokenizers import Tokenizer

    h = hashlib.sha256()
    with open(tokenizer_json, "rb") as fh:  # in pieces: a 33 MB file held whole would stay in the heap
        for piece in iter(lambda: fh.read(1 << 20), b""):
            h.update(piece)
    key = h.hexdigest()
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            _BACKENDS[key] = Tokenizer.from_file(str(tokenizer_json))
        return _BACKENDS[key]


@cache
def _vocab_of(backend) -> dict[str, int]:
    """The whole vocabulary as a dict, made once per backend when first asked for:
    0.36 s for Gemma 3's 262k entries, which neither encoding nor the special
    tokens need."""
    return backend.get_vocab(with_added_tokens=True)


class LightTokenizer:
    """The subset of a transformers tokenizer that serving uses. The backend and
    its vocabulary may be shared with other instances (`shared_backend`): neither
    is ever changed here."""

    def __init__(self, backend, specials: dict[str, str], chat_template: str | None):
        self._tok = backend
        self.chat_template = chat_template
        self._specials = specials
        for name in SPECIAL_NAMES:
            setattr(self, name, specials.get(name))
            setattr(self, name + "_id", backend.token_to_id(specials[name]) if name in specials else None)

    @property
    def _vocab(self) -> dict[str, int]:
        return _vocab_of(self._tok)

    def get_vocab(self) -> Mapping[str, int]:
        return MappingProxyType(self._vocab)  # read-only, not a copy of 262k entries per call

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> dict:
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": enc.ids, "attention_mask": enc.attention_mask}
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets  # character spans in `text`, as transformers gives them
        return out

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True, **kwargs
    ):
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        text = _compile(self.chat_template).render(
            messages=[dict(m) for m in messages],
            tools=kwargs.pop("tools", None),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self._specials, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load(path: Path) -> LightTokenizer | None:
    """The tokenizer saved in `path`, or None when only transformers can load it."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return None
    try:
        config = (
            json.loads((path / "tokenizer_config.json").read_text())
            if (path / "tokenizer_config.json").is_file()
            else {}
        )
        specials_map = (
            json.loads((path / "special_tokens_map.json").read_text())
            if (path / "special_tokens_map.json").is_file()
            else {}
        )
    except (OSError, ValueError):
        return None
    template = config.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if not (template is None or isinstance(template, str)):
        return None  # named template sets: transformers picks among them
    # Tokenizers that transformers rebuilds rather than reads as-is (slow-only
    # classes, legacy SentencePiece options) may encode differently: leave them to it.
    if config.get("legacy") is True or config.get("add_prefix_space") is not None:
        return None
    specials = {}
    for name in SPECIAL_NAMES:
        text = _token_text(config.get(name)) or _token_text(specials_map.get(name))
        if text is not None:
            specials[name] = text
    try:
        backend = shared_backend(path / "tokenizer.json")
        if template is not None:
            _compile(template)
    except Exception:  # noqa: BLE001 - anything odd: transformers knows more cases
        return None
    return LightTokenizer(backend, specials, template)


def token_id(tokenizer, text: str) -> int | None:
    """The id of `text` as one vocabulary entry, None where it is none (transformers'
    convert_tokens_to_ids answers the unknown token's id instead)."""
    if isinstance(tokenizer, LightTokenizer):
        return tokenizer.convert_tokens_to_ids(text)
    return tokenizer.get_vocab().get(text)
