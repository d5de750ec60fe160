"""/v1/chat/completions and /v1/completions, streaming (SSE) or not.

The route only validates the request, resolves the model name the caller may
use, renders the prompt with the model's own chat template, and hands it to the
engine, which batches concurrent requests (mixed adapters in one batch).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.engine import Delta, EngineError, SamplingParams, Usage
from openft.serve.errors import APIError
from openft.serve.models import handle_for

router = APIRouter(prefix="/v1", tags=["chat"])
MAX_TOKENS = 1 << 20
SEED_RANGE = (-(2**63), 2**63 - 9)  # torch seeds are 64-bit; choice i uses seed + i (n <= 8)


def _streamed(model) -> dict:
    """A JSON answer, or with `stream: true` server-sent events."""
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    # strict: a wrong type is a 400 naming the field, not coerced ("yes" is no
    # boolean, true no max_tokens); unknown OpenAI fields are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # More than fits in the context is clamped (finish_reason "length"), as OpenAI
    # clients commonly ask for 4096 whatever the model; beyond any context at all
    # it is a mistake.
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids, got {token[:40]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be between -100 and 100, got {bias:g} for token {token}")
        return v

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=list(self.stop or []),
            seed=self.seed,
            n=self.n,
        )


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def _prepare(request: Request, who: str, body: SamplingFields, prompt_ids_fn):
    """Runs in a worker thread: loading a model and tokenising a long prompt must
    not stall the event loop (and with it every stream in flight)."""
    engine = request.app.state.engine
    handle = handle_for(request, who, body.model)
    if body.logit_bias:
        raise APIError(
            400, "logit_bias is not supported by this server", param="logit_bias", code="unsupported_parameter"
        )
    try:
        ids = prompt_ids_fn(engine, handle)
        context = engine.context_length(handle)
    except EngineError as e:
        raise APIError(400 if e.code != "model_unavailable" else 503, str(e), param="model", code=e.code) from None
    if len(ids) >= context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens; the prompt has {len(ids)}",
            param="messages",
            code="context_length_exceeded",
        )
    return engine, handle, ids


@router.post("/chat/completions", responses=_streamed(S.ChatCompletion))
async def chat_completions(request: Request, body: ChatRequest, who: str = Depends(owner)):
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    engine, handle, ids = await run_in_threadpool(
        _prepare, request, who, body, lambda e, h: e.apply_chat_template(h, messages)
    )
    return await _respond(engine, handle, ids, body, chat=True)


@router.post("/completions", responses=_streamed(S.Completion))
async def completions(request: Request, body: CompletionRequest, who: str = Depends(owner)):
    prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    engine, handle, ids = await run_in_threadpool(
        _prepare, request, who, body, lambda e, h: e.tokenizer(h)(prompt, add_special_tokens=False)["input_ids"]
    )
    return await _respond(engine, handle, ids, body, chat=False)


async def _respond(engine, handle, ids, body: SamplingFields, *, chat: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    params = body.sampling()
    if not body.stream:
        try:
            choices, usage = await engine.complete(handle, ids, params)
        except EngineError as e:
            raise APIError(500 if e.code == "internal_error" else 400, str(e), param="model", code=e.code) from None
        if chat:
            out = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": fr,
                    "logprobs": None,
                }
                for i, (text, fr) in enumerate(choices)
            ]
            obj = "chat.completion"
        else:
            out = [
                {"index": i, "text": text, "finish_reason": fr, "logprobs": None}
                for i, (text, fr) in enumerate(choices)
            ]
            obj = "text_completion"
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": body.model,
            "choices": out,
            "usage": _usage(usage),
            "system_fingerprint": "openft",
        }
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _stream(engine, handle, ids, params, body.model, rid, created, chat, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _stream(engine, handle, ids, params, model, rid, created, chat, include_usage) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None):
        c = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "system_fingerprint": "openft",
            "choices": choices,
        }
        if include_usage:
            c["usage"] = usage
        return _sse(c)

    def choice(index, text, finish=None, first=False):
        if chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    if chat:
        yield chunk([choice(i, "", first=True) for i in range(params.n)])
    try:
        async for item in engine.stream(handle, ids, params):
            if isinstance(item, Delta):
                # The final chunk carries content "" (not null), so a client that
                # prints delta.content prints nothing extra.
                yield chunk([choice(item.index, item.text, item.finish_reason)])
            elif isinstance(item, Usage) and include_usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": model,
                        "system_fingerprint": "openft",
                        "choices": [],
                        "usage": _usage(item),
                    }
                )
    except EngineError as e:
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": e.code}})
    yield _sse("[DONE]")
