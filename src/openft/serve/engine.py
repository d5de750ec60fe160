"""The inference engine behind `/v1/chat/completions`: many models, one batch per base.

Memory. One copy of each base model's weights (LRU, `max_loaded_bases`); every
LoRA adapter of that base is a small pair of matrices per layer inside
`MultiLoraLinear` wrappers (LRU, `max_loaded_adapters`), never merged into the
base, kept compact at rest (fp16 under an fp32 base, int8 per rank component
under a bf16 one: `engine_lora.storage_dtype`); the running batch's adapters
are widened once per batch and freed when it drains. A new adapter directory
is loaded on its first request, from safetensors; an adapter file rewritten in
place is reloaded (its key includes the file's mtime and size).

Batching: continuous. One scheduler thread owns all models and tensors. Between
decode steps it admits waiting requests: they are prefilled together in one
forward pass, their first token sampled, and their KV cache merged into the
running batch of their base (any mix of adapters); rows leave the batch the step
they finish. Each base has its own running batch, stepped in turn. A model whose
cache cannot be merged (sliding-window layers) falls back to waves: new requests
wait until its batch drains. Loading a model happens on the scheduler thread and
pauses decoding for that long (milliseconds for an adapter, about a second for
a small base).

The asyncio side only enqueues requests and reads an `asyncio.Queue` that the
scheduler feeds through `loop.call_soon_threadsafe`; an error in one request
fails that request alone and never the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openft.autoprecision import Decision, decide
from openft.hardware import onednn_shapes, shape_bucket, without_onednn
from openft.heap import release_free_memory
from openft.models.load import load_for_serving, load_tokenizer, setup_torch
from openft.models.padding import left_pad
from openft.models.stop import stop_token_ids
from openft.serve.engine_batch import (
    apply_penalties,
    merge_into,
    mergeable,
    new_cache,
    sample,
    select_rows,
    token_logprob,
)
from openft.serve.engine_lora import (
    WEIGHTS_FILE,
    LoraRouting,
    install_adapter,
    read_adapter,
    release_stacks,
    remove_adapter,
)
from openft.serve.engine_text import Detokenizer, StopMatcher
from openft.serve.engine_types import Choice, Delta, EngineError, ModelHandle, SamplingParams, TokenLogprob, Usage

__all__ = [
    "Choice",
    "Delta",
    "Engine",
    "EngineError",
    "EngineStats",
    "ModelHandle",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
]

log = logging.getLogger("openft.serve.engine")

MAX_CHOICES = 128


def _unloadable(d: Path) -> str:
    """The error code of a model whose files could not be read: missing, or there but broken."""
    return "model_invalid" if d.is_dir() else "model_not_found"


# --------------------------------------------------------------------------- state


@dataclass
class EngineStats:
    """Counters for diagnostics and tests (written by the scheduler thread only)."""

    prefills: int = 0  # prefill forward passes
    joins: int = 0  # prefills merged into an already running batch (continuous batching)
    steps: int = 0  # decode steps
    max_rows: int = 0  # most rows decoded in one step
    mixed_steps: int = 0  # decode steps whose rows used more than one adapter (the bare base counts as one)


@dataclass(eq=False)
class _Base:
    key: str  # resolved weights directory
    model: torch.nn.Module
    tokenizer: object  # the scheduler's own instance (the asyncio side uses another)
    stop_ids: frozenset[int]
    pad_id: int
    routing: LoraRouting
    cache_kw: str  # "cache" (transformers >= 5.x) or "past_key_values"
    nbytes: int
    refs: int = 0  # requests admitted or waiting on this base
    names: set[str] = field(default_factory=set)  # served model names that used it (for forget)


@dataclass(eq=False)
class _Adapter:
    key: str  # "<dir>@<mtime_ns>:<size>|<base dir>"
    path: Path
    base_key: str
    nbytes: int
    refs: int = 0
    names: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Request:
    handle: ModelHandle
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int  # max_tokens after clamping to the context
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    base: _Base | None = None
    adapter: _Adapter | None = None
    rows_left: int = 0
    completion_tokens: int = 0
    cancelled: bool = False  # the caller went away: drop its rows
    done: bool = False


@dataclass(eq=False)
class _Row:
    """One choice of one request: one row of a running batch."""

    req: _Request
    index: int
    generator: torch.Generator | None  # None for greedy rows
    detok: Detokenizer
    stopper: StopMatcher
    pos: int  # position id of the token this row feeds next
    count: int = 0  # tokens sampled so far
    finished: bool = False
    counts: torch.Tensor | None = None  # (vocab,) how often each token was sampled (for the penalties)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # sampled, not yet sent in a Delta

    @property
    def penalised(self) -> bool:
        p = self.req.params
        return bool(p.presence_penalty or p.frequency_penalty)

    def take_logprobs(self) -> list[TokenLogprob] | None:
        if self.req.params.logprobs is None:
            return None
        out, self.logprobs = self.logprobs, []
        return out


@dataclass(eq=False)
class _Batch:
    """A base's running batch. cache: (B, kv_heads, L, head_dim) per layer; mask: (B, L)."""

    base: _Base
    rows: list[_Row]
    cache: object
    mask: torch.Tensor
    next_ids: torch.Tensor  # (B,) tokens sampled last step, fed next step

    @property
    def adapter_keys(self) -> list[str | None]:
        return [r.req.adapter.key if r.req.adapter else None for r in self.rows]


# --------------------------------------------------------------------------- engine

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def _tokenizer_signature(d: Path) -> str | None:
    """A digest of a directory's tokenizer files (None if unreadable: load it alone)."""
    import hashlib

    h = hashlib.sha256()
    try:
        for name in TOKENIZER_FILES:
            f = d / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    except OSError:
        return None
    return "sig:" + h.hexdigest()


def prefill_groups(reqs: list[_Request], budget: int) -> list[list[_Request]]:
    """Cut the requests admitted together into prefill forwards of at most
    `budget` padded tokens (rows x longest prompt; a longer request goes alone).
    One forward over 16 prompts of ~400 tokens ran 25% slower on this CPU than
    four of four (its full-width temporaries and masks outgrow the caches), and
    the first group's first tokens go out before the rest are prefilled."""
    groups: list[list[_Request]] = []
    cur: list[_Request] = []
    rows = longest = 0
    for req in reqs:
        r, n = rows + req.params.n, max(longest, len(req.prompt_ids))
        if cur and r * n > budget:
            groups.append(cur)
            cur, r, n = [], req.params.n, len(req.prompt_ids)
        cur.append(req)
        rows, longest = r, n
    if cur:
        groups.append(cur)
    return groups


class Engine:
    def __init__(
        self,
        *,
        max_batch_size: int = 8,
        max_loaded_bases: int = 2,
        max_loaded_adapters: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype | None = None,
        prefill_tokens: int | None = None,
    ):
        self.max_batch_size = max_batch_size
        self.max_loaded_bases = max_loaded_bases
        self.max_loaded_adapters = max_loaded_adapters
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 where this machine measurably runs it faster (openft.autoprecision, the
        # same decision training makes: on an AMX CPU prefill ran ~3x, a 16-row decode
        # step ~1.25x faster than fp32, benchmarks/prefill_ab.py --precision), fp32
        # elsewhere (a CPU without bf16 hardware runs it 10-50x slower).
        if dtype is None:
            self.precision = decide("auto", self.device)
            dtype = torch.bfloat16 if self.precision.precision == "bf16" else torch.float32
        else:
            self.precision = Decision("bf16" if dtype == torch.bfloat16 else "fp32", "forced", forced_by="--precision")
        self.dtype = dtype
        log.info("serving engine on %s: %s", self.device, self.precision.describe())
        # oneDNN (bf16 on a CPU) compiles a kernel per matmul shape: prompts are
        # padded to a few bucketed widths so later prefills reuse earlier kernels.
        self._onednn = onednn_shapes(self.dtype, self.device)
        self._prefill_width = shape_bucket if self._onednn else (lambda n: n)
        # Padded tokens per prefill forward (see prefill_groups); a GPU wants big ones.
        self.prefill_tokens = prefill_tokens or (16384 if self.device.type == "cuda" else 2048)
        # How adapters are kept at rest (default: engine_lora.storage_dtype of the model's dtype).
        self.adapter_dtype = adapter_dtype
        if self.device.type == "cpu":
            # transformers' SDPA path expands grouped K/V heads to every query head
            # (a copy of the whole cache per layer per step) whenever a padding mask
            # is passed, which a mixed-length batch always does; torch's CPU kernel
            # takes grouped heads with a mask directly (same results, ~3x faster
            # attention). On CUDA a masked GQA call falls back to the math kernel, so
            # this stays CPU only. Read by transformers at every attention call.
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        self._cv = threading.Condition()  # guards _pending, _stopping, and the model dicts for loaded()
        self._pending: list[_Request] = []
        self._forget: set[str] = set()  # model names to drop from memory once idle
        self._stopping = False
        self._stopped = False  # stop() was called: refuse requests until start() is called again
        self._thread: threading.Thread | None = None
        self._bases: OrderedDict[str, _Base] = OrderedDict()  # LRU order, scheduler thread only writes
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()
        self._batches: dict[str, _Batch] = {}
        self._meta_lock = threading.Lock()
        self._tokenizers: dict[str, object] = {}  # asyncio side's tokenizers, by directory
        self._contexts: dict[str, int] = {}
        self.stats = EngineStats()

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = self._stopped = False
            self._thread = threading.Thread(target=self._run, name="openft-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = self._stopped = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None

    def check_accepting(self) -> None:
        """Raise engine_stopped (503) once stop() was called, until start() is called again
        (so a streamed answer can be refused before its 200 is sent)."""
        with self._cv:
            if self._stopping or self._stopped:
                raise EngineError("the engine is stopped (the server is shutting down)", "engine_stopped")

    # ------------------------------------------------------------- model metadata (any thread)

    def tokenizer(self, handle: ModelHandle):
        """The tokenizer and chat template of this model: an adapter's own saved
        tokenizer if its directory has one (training may change the template), else its base's."""
        d = handle.weights_path
        if handle.adapter_path is not None and (Path(handle.adapter_path) / "tokenizer_config.json").is_file():
            d = Path(handle.adapter_path)
        key = str(Path(d).resolve())
        with self._meta_lock:
            if key not in self._tokenizers:
                # Every fine-tune saves a copy of its base's tokenizer; one instance
                # per identical set of files, not one per adapter (~15 MB each).
                sig = _tokenizer_signature(Path(key))
                tok = self._tokenizers.get(sig)
                if tok is None:
                    try:
                        tok = load_tokenizer(Path(key))
                    except Exception as e:  # noqa: BLE001 - any failure means the model is unusable
                        raise EngineError(
                            f"cannot load the tokenizer of {handle.name} from {key}: {e}", _unloadable(Path(key))
                        ) from e
                    if sig is not None:
                        self._tokenizers[sig] = tok
                self._tokenizers[key] = tok
            return self._tokenizers[key]

    def apply_chat_template(
        self, handle: ModelHandle, messages: list[dict], tools: list[dict] | None = None, prefill: str = ""
    ) -> list[int]:
        """The prompt's ids: `tools` rendered by the template (where given), and
        `prefill`, text the answer is made to start with (a forced tool call), after
        the generation prompt."""
        tok = self.tokenizer(handle)
        kwargs = {"tools": tools} if tools else {}
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs) + prefill
        # The template writes every special token itself (BOS included where the
        # model wants one); letting the tokenizer add its own would double them.
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def context_length(self, handle: ModelHandle) -> int:
        key = str(handle.weights_path.resolve())
        with self._meta_lock:
            if key not in self._contexts:
                try:
                    config = json.loads((Path(key) / "config.json").read_text())
                except (OSError, ValueError) as e:
                    raise EngineError(
                        f"model {handle.name}: no readable config.json in {key}", _unloadable(Path(key))
                    ) from e
                config = config.get("text_config", config)  # multimodal configs nest the LM's
                for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
                    if isinstance(config.get(name), int):
                        self._contexts[key] = config[name]
                        break
                else:
                    self._contexts[key] = 2048
            return self._contexts[key]

    def forget(self, name: str) -> None:
        """Drop a deleted model (its adapter, or a full fine-tune's weights) from
        memory at the next step boundary, once no request is using it."""
        with self._cv:
            self._forget.add(name)
            self._cv.notify_all()

    def loaded(self) -> dict:
        with self._cv:
            return {
                "bases": [
                    {
                        "path": b.key,
                        "bytes": b.nbytes,
                        "device": str(self.device),
                        "running_rows": len(self._batches[b.key].rows) if b.key in self._batches else 0,
                    }
                    for b in self._bases.values()
                ],
                "adapters": [
                    {"path": str(a.path), "key": a.key, "base": a.base_key, "bytes": a.nbytes}
                    for a in self._adapters.values()
                ],
            }

    # ------------------------------------------------------------- requests (asyncio side)

    async def stream(
        self, handle: ModelHandle, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta | Usage]:
        """Deltas as tokens are produced (each choice ends with one carrying its
        finish_reason), then exactly one Usage. Raises EngineError on failure."""
        req = self._submit(handle, prompt_ids, params)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Usage):
                    return
        finally:
            if not req.done:
                req.cancelled = True  # the caller stopped reading: free its rows
                with self._cv:
                    self._cv.notify_all()

    async def complete(
        self, handle: ModelHandle, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[list[tuple[str, str]], Usage]:
        """(text, finish_reason) of each choice, and the Usage."""
        choices, usage = await self.choices(handle, prompt_ids, params)
        return [(c.text, c.finish_reason) for c in choices], usage

    async def choices(
        self, handle: ModelHandle, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[list[Choice], Usage]:
        """Every choice whole (with its log-probs when asked for), and the Usage."""
        out = [Choice(index=i, text="", finish_reason="", logprobs=None) for i in range(params.n)]
        usage = None
        async for item in self.stream(handle, prompt_ids, params):
            if isinstance(item, Usage):
                usage = item
                continue
            c = out[item.index]
            c.text += item.text
            c.finish_reason = item.finish_reason or c.finish_reason
            if item.logprobs is not None:
                c.logprobs = c.logprobs if c.logprobs is not None else []
                c.logprobs.extend(item.logprobs)
        return out, usage

    def _submit(self, handle: ModelHandle, prompt_ids: list[int], params: SamplingParams) -> _Request:
        if not prompt_ids:
            raise EngineError("the prompt is empty", "invalid_request")
        if not 1 <= params.n <= MAX_CHOICES:
            raise EngineError(f"n must be between 1 and {MAX_CHOICES}, got {params.n}", "invalid_request")
        if params.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {params.temperature}", "invalid_request")
        if not 0 < params.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {params.top_p}", "invalid_request")
        if params.top_k < 0:
            raise EngineError(f"top_k must be >= 0, got {params.top_k}", "invalid_request")
        if params.logprobs is not None and params.logprobs < 0:
            raise EngineError(f"logprobs must be >= 0, got {params.logprobs}", "invalid_request")
        if params.max_tokens is not None and params.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {params.max_tokens}", "invalid_request")
        context = self.context_length(handle)
        room = context - len(prompt_ids)
        if room < 1:
            raise EngineError(
                f"the prompt has {len(prompt_ids)} tokens, which leaves no room in {handle.name}'s "
                f"context of {context} tokens",
                "context_length_exceeded",
            )
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        req = _Request(
            handle=handle,
            prompt_ids=[int(t) for t in prompt_ids],
            params=params,
            max_new=max_new,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
        )
        # A stopped engine (the server shutting down) refuses rather than starting its
        # scheduler again; one never started starts on its first request.
        self.check_accepting()
        self.start()
        with self._cv:
            if self._stopping:
                raise EngineError("the engine is stopped (the server is shutting down)", "engine_stopped")
            self._pending.append(req)
            self._cv.notify_all()
        return req

    # ------------------------------------------------------------- scheduler thread

    def _run(self) -> None:
        setup_torch()
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._pending and not self._batches and not self._forget:
                        self._cv.wait()
                    if self._stopping:
                        break
                    incoming, self._pending = self._pending, []
                if self._forget:
                    self._drop_forgotten()
                try:
                    self._admit(incoming)
                    for key in list(self._batches):
                        self._step(self._batches[key])
                except Exception as e:  # noqa: BLE001 - a bug here must not kill serving
                    log.exception("engine scheduler error")
                    # Answer every admitted request not in a running batch, so no caller waits forever.
                    running = {id(r.req) for b in self._batches.values() for r in b.rows}
                    with self._cv:
                        waiting = {id(r) for r in self._pending}
                    for req in incoming:
                        if id(req) not in running and id(req) not in waiting:
                            self._fail(req, EngineError(f"internal error: {type(e).__name__}: {e}", "internal_error"))
        err = EngineError("the engine stopped", "engine_stopped")
        for batch in list(self._batches.values()):
            for row in batch.rows:
                self._fail(row.req, err)
        self._batches.clear()
        with self._cv:
            pending, self._pending = self._pending, []
        for req in pending:
            self._fail(req, err)

    def _admit(self, incoming: list[_Request]) -> None:
        """Prefill what fits into each base's running batch; the rest waits, in order."""
        waiting: list[_Request] = []
        joining: dict[str, list[_Request]] = {}
        for req in incoming:
            if req.cancelled:
                self._finish(req)
                continue
            try:
                if req.base is None:
                    base = self._ensure_base(req.handle)
                    if base is None:  # every loaded base is busy: wait for one to drain
                        waiting.append(req)
                        continue
                    req.base = base
                    base.refs += 1
                    if req.handle.adapter_path is None:
                        base.names.add(req.handle.name)
                if req.handle.adapter_path is not None and req.adapter is None:
                    req.adapter = self._ensure_adapter(req.base, Path(req.handle.adapter_path))
                    req.adapter.refs += 1
                    req.adapter.names.add(req.handle.name)
            except EngineError as e:
                self._fail(req, e)
                continue
            except Exception as e:  # noqa: BLE001
                log.exception("loading %s failed", req.handle.name)
                self._fail(
                    req, EngineError(f"loading {req.handle.name} failed: {type(e).__name__}: {e}", "internal_error")
                )
                continue
            batch = self._batches.get(req.base.key)
            rows = (len(batch.rows) if batch else 0) + sum(r.params.n for r in joining.get(req.base.key, []))
            full = rows > 0 and rows + req.params.n > self.max_batch_size
            if full or (batch is not None and not mergeable(batch.cache)):
                waiting.append(req)
            else:
                joining.setdefault(req.base.key, []).append(req)
        if waiting:
            with self._cv:
                self._pending[:0] = waiting
        for reqs in joining.values():
            for group in prefill_groups(reqs, self.prefill_tokens):
                self._prefill(group)

    def _prefill(self, reqs: list[_Request]) -> None:
        base = reqs[0].base
        rows: list[_Row] = []
        for req in reqs:
            req.rows_left = req.params.n
            for i in range(req.params.n):
                gen = None
                if req.params.temperature > 0:
                    seed = req.params.seed + i if req.params.seed is not None else secrets.randbits(63)
                    gen = torch.Generator(device=self.device).manual_seed(seed)
                rows.append(
                    _Row(
                        req=req,
                        index=i,
                        generator=gen,
                        detok=Detokenizer(base.tokenizer, req.prompt_ids),
                        stopper=StopMatcher(req.params.stop),
                        pos=len(req.prompt_ids),
                    )
                )
        # input_ids, mask, positions: (rows, longest prompt), prompts right-aligned
        prompts = [r.req.prompt_ids for r in rows]
        ids, mask, pos = left_pad(prompts, base.pad_id, self.device, self._prefill_width(max(map(len, prompts))))
        new = _Batch(base=base, rows=rows, cache=None, mask=mask, next_ids=ids[:, -1])
        self.stats.prefills += 1
        try:
            logits, new.cache = self._forward(base, new, ids, mask, pos, cache=new_cache(base.model))
            self._sample_and_emit(new, logits)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail these requests only
            self._fail_batch(new, e)
            return
        if not new.rows:
            return
        running = self._batches.get(base.key)
        if running is None:
            self._batches[base.key] = new
            return
        try:
            running.mask = merge_into(running.cache, running.mask, new.cache, new.mask)
        except Exception as e:  # noqa: BLE001
            # A failed merge may leave the running cache half-updated: fail both.
            self._fail_batch(new, e)
            self._fail_batch(running, e)
            return
        self.stats.joins += 1
        running.rows += new.rows
        running.next_ids = torch.cat([running.next_ids, new.next_ids])

    def _step(self, batch: _Batch) -> None:
        """One decode step of a running batch: feed each row's last token, sample the next."""
        try:
            # The fed token is a real token for every row: one more mask column (B, L+1).
            mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], 1)
            pos = torch.tensor([[r.pos] for r in batch.rows], dtype=torch.long, device=self.device)  # (B, 1)
            logits, batch.cache = self._forward(batch.base, batch, batch.next_ids[:, None], mask, pos, batch.cache)
            batch.mask = mask
            for r in batch.rows:
                r.pos += 1
            self.stats.steps += 1
            self.stats.max_rows = max(self.stats.max_rows, len(batch.rows))
            self.stats.mixed_steps += len(set(batch.adapter_keys)) > 1
            self._sample_and_emit(batch, logits)
        except Exception as e:  # noqa: BLE001
            self._fail_batch(batch, e)

    def _forward(self, base: _Base, batch: _Batch, ids, mask, pos, cache):
        """logits (B, vocab) for each row's last position, and the updated cache."""
        base.routing.set_rows(batch.adapter_keys, self.device)
        kwargs = {base.cache_kw: cache}
        one_row = self._onednn and ids.numel() == 1
        with without_onednn() if one_row else contextlib.nullcontext():
            out = base.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kwargs
            )
        new_cache = out.cache if base.cache_kw == "cache" else out.past_key_values
        return out.logits[:, -1, :], new_cache

    def _sample_and_emit(self, batch: _Batch, logits: torch.Tensor) -> None:
        rows = batch.rows
        logits = self._penalise(rows, logits)
        tokens = sample(
            logits,
            [r.req.params.temperature for r in rows],
            [r.req.params.top_p for r in rows],
            [r.generator for r in rows],
            [r.req.params.top_k for r in rows],
        )
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if row.req.cancelled or row.req.done:
                row.finished = True
                continue
            self._record(row, logits[i], token, batch.base.stop_ids)
            self._advance(row, token, batch.base.stop_ids)
        for row in rows:
            if not row.req.done and (row.req.cancelled or row.req.rows_left == 0):
                self._finish(row.req)
        keep = [i for i, r in enumerate(rows) if not r.finished]
        if not keep:
            self._drop_batch(batch)
            return
        batch.next_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        if len(keep) < len(rows):
            batch.mask = select_rows(batch.cache, batch.mask, keep)
            batch.next_ids = batch.next_ids[keep]
            batch.rows = [rows[i] for i in keep]

    @staticmethod
    def _penalise(rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """The logits with each row's presence/frequency penalties applied."""
        if not any(r.penalised and r.counts is not None for r in rows):
            return logits
        logits = logits.float().clone()
        for i, r in enumerate(rows):
            if r.penalised and r.counts is not None:
                p = r.req.params
                logits[i] = apply_penalties(logits[i], r.counts, p.presence_penalty, p.frequency_penalty)
        return logits

    @staticmethod
    def _record(row: _Row, logits: torch.Tensor, token: int, stop_ids: frozenset[int]) -> None:
        """Count the token for the penalties and keep its log-prob, when asked for.
        logits: (vocab,), the (penalised) distribution the token was sampled from."""
        params = row.req.params
        if row.penalised:
            if row.counts is None:
                row.counts = torch.zeros(logits.numel(), dtype=torch.float32, device=logits.device)
            row.counts[token] += 1
        if params.logprobs is not None and token not in stop_ids:
            lp, top = token_logprob(logits, token, params.logprobs)
            row.logprobs.append(TokenLogprob(token_id=token, logprob=lp, top=top))

    def _advance(self, row: _Row, token: int, stop_ids: frozenset[int]) -> None:
        """Account one sampled token to its row and emit the text it makes stable."""
        req = row.req
        row.count += 1
        req.completion_tokens += 1
        if token in stop_ids:
            self._end_row(row, "", "stop")
            return
        text, hit = row.stopper.push(row.detok.push(token))
        if hit:
            self._end_row(row, text, "stop", flush=False)
        elif row.count >= req.max_new:
            self._end_row(row, text, "length")
        elif text:
            self._emit(req, Delta(index=row.index, text=text, finish_reason=None, logprobs=row.take_logprobs()))

    def _end_row(self, row: _Row, text: str, reason: str, *, flush: bool = True) -> None:
        if flush:
            # Release what was held back: the detokenizer's tail (minus a character
            # left incomplete), then the stopper's possible stop-string start,
            # unless the tail completes a stop string after all.
            tail, hit = row.stopper.push(row.detok.flush())
            text += tail if hit else tail + row.stopper.flush()
            reason = "stop" if hit else reason
        row.finished = True
        row.req.rows_left -= 1
        self._emit(row.req, Delta(index=row.index, text=text, finish_reason=reason, logprobs=row.take_logprobs()))

    def _finish(self, req: _Request) -> None:
        """All choices done (or the caller left): send Usage, release the models."""
        if req.done:
            return
        req.done = True
        if not req.cancelled:
            n = len(req.prompt_ids)
            self._emit(
                req,
                Usage(prompt_tokens=n, completion_tokens=req.completion_tokens, total_tokens=n + req.completion_tokens),
            )
        self._release(req)

    def _fail(self, req: _Request, err: EngineError) -> None:
        if req.done:
            return
        req.done = True
        self._emit(req, err)
        self._release(req)

    def _fail_batch(self, batch: _Batch, e: Exception) -> None:
        log.exception("generation failed for a batch of %d rows", len(batch.rows), exc_info=e)
        err = (
            e
            if isinstance(e, EngineError)
            else EngineError(f"generation failed: {type(e).__name__}: {e}", "internal_error")
        )
        for row in batch.rows:
            self._fail(row.req, err)
        self._drop_batch(batch)

    def _drop_batch(self, batch: _Batch) -> None:
        if self._batches.get(batch.base.key) is batch:
            del self._batches[batch.base.key]
            # Free the mixed-adapter stacks (copies of the adapters the batch mixed).
            batch.base.routing.clear()
            release_stacks(batch.base.model)
            if not self._batches:
                release_free_memory()
        batch.rows = []

    def _release(self, req: _Request) -> None:
        if req.base is not None:
            req.base.refs -= 1
        if req.adapter is not None:
            req.adapter.refs -= 1

    def _emit(self, req: _Request, item) -> None:
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed
            req.cancelled = True

    # ------------------------------------------------------------- model cache (scheduler thread)

    def _ensure_base(self, handle: ModelHandle) -> _Base | None:
        path = handle.weights_path
        key = str(path.resolve())
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key]
        if len(self._bases) >= self.max_loaded_bases:
            idle = [k for k, b in self._bases.items() if b.refs == 0 and k not in self._batches]
            if not idle:
                return None
            self._evict_base(idle[0])  # least recently used idle base
        if not path.is_dir():
            raise EngineError(f"model {handle.name}: {path} does not exist", "model_not_found")
        try:
            loaded = load_for_serving(key, dtype=self.dtype)
        except Exception as e:  # noqa: BLE001 - ModelNotFound, bad config, unreadable weights...
            raise EngineError(f"cannot load model {handle.name} from {path}: {e}", "model_invalid") from e
        model = loaded.model.to(self.device)
        tok = loaded.tokenizer
        stop_ids = self._stop_ids(model, tok)
        base = _Base(
            key=key,
            model=model,
            tokenizer=tok,
            stop_ids=stop_ids,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else min(stop_ids),
            routing=LoraRouting(),
            cache_kw="cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values",
            nbytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        )
        with self._cv:
            self._bases[key] = base
        return base

    @staticmethod
    def _stop_ids(model, tok) -> frozenset[int]:
        try:
            return frozenset(stop_token_ids(tok, getattr(model, "generation_config", None)))
        except ValueError as e:
            raise EngineError(str(e), "model_invalid") from None

    def _drop_forgotten(self) -> None:
        with self._cv:
            names = set(self._forget)
        busy: set[str] = set()
        for key, a in list(self._adapters.items()):
            if a.names & names:
                if a.refs:
                    busy |= a.names & names
                    continue
                if a.base_key in self._bases:
                    remove_adapter(self._bases[a.base_key].model, key)
                with self._cv:
                    del self._adapters[key]
        for key, b in list(self._bases.items()):
            if b.names & names:
                if b.refs or key in self._batches:
                    busy |= b.names & names
                else:
                    self._evict_base(key)
        with self._cv:
            self._forget -= names - busy  # busy ones are retried at the next boundary

    def _evict_base(self, key: str) -> None:
        with self._cv:
            self._bases.pop(key)
            for akey in [k for k, a in self._adapters.items() if a.base_key == key]:
                del self._adapters[akey]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ensure_adapter(self, base: _Base, path: Path) -> _Adapter:
        weights = path / WEIGHTS_FILE
        try:
            st = weights.stat()
            # A rewritten adapter is a new adapter; the same adapter on two bases is two.
            key = f"{path.resolve()}@{st.st_mtime_ns}:{st.st_size}|{base.key}"
        except OSError:
            key = None  # read_adapter raises the precise error
        if key is not None and key in self._adapters:
            self._adapters.move_to_end(key)
            return self._adapters[key]
        loaded = read_adapter(path, base.model, self.adapter_dtype)
        key = key or f"{path.resolve()}@unknown|{base.key}"
        # Evict least recently used adapters that no request holds (a soft limit:
        # adapters in use are never dropped mid-answer).
        while len(self._adapters) >= self.max_loaded_adapters:
            idle = next((k for k, a in self._adapters.items() if a.refs == 0), None)
            if idle is None:
                break
            old = self._adapters[idle]
            if old.base_key in self._bases:
                remove_adapter(self._bases[old.base_key].model, idle)
            with self._cv:
                del self._adapters[idle]
        install_adapter(base.model, base.routing, key, loaded)
        adapter = _Adapter(key=key, path=path, base_key=base.key, nbytes=loaded.nbytes)
        with self._cv:
            self._adapters[key] = adapter
        return adapter
