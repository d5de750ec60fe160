"""/v1/chat/completions and /v1/completions, streaming (SSE) or not.

The route only validates the request, resolves the model name the caller may
use, renders the prompt with the model's own chat template, and hands it to the
engine, which batches concurrent requests (mixed adapters in one batch).

Every OpenAI parameter is either honoured or refused with a 400 naming it
(code `unsupported_parameter`); a field OpenAI does not define is refused too
(code `unknown_parameter`), as OpenAI does. The few accepted without effect
change nothing an answer could show: `user`, `safety_identifier`, `metadata`,
`store` (openft keeps no completions), the prompt-cache hints, `prediction` (a
latency hint: OpenAI's answer is the same without it),
`stream_options.include_obfuscation`.

Tools (`tools`, `tool_choice`) work for models whose chat template renders them
in the Qwen/Hermes form (`<tool_call>{...}</tool_call>`): the template writes the
definitions into the prompt, and the calls the model writes come back as
`tool_calls` (finish_reason "tool_calls"), never as markup in `content`. Other
models answer 400 naming `tools`. With `stream: true` and tools in play, text
streams as it comes until a `<tool_call>` may begin; from there the choice is held
and its calls are sent in its last delta, in OpenAI's streamed shape.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from openft.models.reasoning import THINK_OPEN, ReasoningStream, is_reasoning_model, prompt_opens_block, split_reasoning
from openft.models.tools import (
    HERMES,
    CallHoldBack,
    ToolStyle,
    forced_call_prefill,
    parse_tool_calls,
    template_message,
    tool_style,
)
from openft.serve import schemas as S
from openft.serve.auth import owner
from openft.serve.engine import Choice, Delta, EngineError, SamplingParams, TokenLogprob, Usage
from openft.serve.engine_text import token_bytes
from openft.serve.errors import APIError, engine_error
from openft.serve.models import handle_for

router = APIRouter(prefix="/v1", tags=["chat"])
MAX_TOKENS = 1 << 20
MAX_ROWS = 128  # choices of one request, over all its prompts (n x prompts)
SEED_RANGE = (-(2**63), 2**63 - 9)  # torch seeds are 64-bit; choice i uses seed + i (n <= 8)


def _streamed(model) -> dict:
    """A JSON answer, or with `stream: true` server-sent events."""
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def unsupported(what: str) -> PydanticCustomError:
    """A 400 naming the field (the validation handler takes `param` from where it is raised)."""
    return PydanticCustomError("unsupported_parameter", "{what} is not supported by this server", {"what": what})


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCallIn(BaseModel):
    """An earlier assistant turn's call, as the client sends the conversation back."""

    model_config = ConfigDict(strict=True)
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool replies

    def for_template(self) -> dict:
        calls = [c.model_dump() for c in self.tool_calls or []]
        role = "system" if self.role == "developer" else self.role
        name = self.name if self.role == "tool" else None
        return template_message(role, self.text(), calls, self.tool_call_id, name)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # schema-exact arguments: asked of the model, not enforced on its output


class ToolDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: ChosenFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool = False  # openft pads no chunks: nothing to obfuscate


class SamplingFields(BaseModel):
    """What both endpoints take. strict: a wrong type is a 400 naming the field, not
    coerced ("yes" is no boolean, true no max_tokens)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=MAX_TOKENS)  # an extension (vLLM's): the k most likely tokens
    # More than fits in the context is clamped (finish_reason "length"), as OpenAI
    # clients commonly ask for 4096 whatever the model; beyond any context at all
    # it is a mistake.
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
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
        if v:
            raise unsupported("logit_bias")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_wanted(self) -> int | None:
        return None

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_new_tokens(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            stop=list(self.stop or []),
            seed=self.seed,
            n=self.n,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=self.logprobs_wanted(),
        )


# Fields refused unless absent or one of these values (which ask for nothing this
# server does not do: no legacy functions, text only, the one service tier there is).
HARMLESS: dict[str, tuple] = {
    "functions": ([],),
    "function_call": ("none",),
    "audio": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "moderation": (),
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),
    "echo": (False,),
    "suffix": ("",),
}


def _refuse_unless_harmless(cls, v, info: ValidationInfo):
    if v is None or v in HARMLESS[info.field_name]:
        return v
    shown = f"{info.field_name} {json.dumps(v)}" if isinstance(v, (str, bool, int, float)) else info.field_name
    raise unsupported(shown)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    # Accepted without effect (see the module's docstring).
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # false: the first call only
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    # Refused unless absent or HARMLESS (legacy functions: use tools).
    service_tier: str | None = None
    modalities: list[str] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None

    _refused = field_validator(*[f for f in HARMLESS if f not in ("echo", "suffix")])(
        classmethod(_refuse_unless_harmless)
    )

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        kind = (v or {}).get("type", "text")
        if kind == "text":
            return v
        if kind in ("json_object", "json_schema"):
            raise unsupported(f"response_format {kind}")
        raise ValueError(f"type must be text, json_object or json_schema, got {str(kind)[:40]!r}")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=8)

    _refused = field_validator("echo", "suffix")(classmethod(_refuse_unless_harmless))

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v, info: ValidationInfo):
        prompts = _prompts(v)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must not be empty (nor any prompt in the list)")
        if any(isinstance(t, int) and t < 0 for p in prompts if isinstance(p, list) for t in p):
            raise ValueError("token ids must be >= 0")
        if len(prompts) * info.data.get("n", 1) > MAX_ROWS:
            raise ValueError(f"at most {MAX_ROWS} choices in all (prompts x n)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info: ValidationInfo):
        if v is not None and v != info.data.get("n", 1):
            raise PydanticCustomError("unsupported_parameter", "best_of other than n is not supported by this server")
        return v

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        return _prompts(self.prompt)


def _prompts(prompt) -> list[str | list[int]]:
    """A completion request's prompts: one text or token-id list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def _total(usages: list[Usage]) -> Usage:
    p, c = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


@dataclass
class ToolUse:
    """What a chat request does with tools: `tools` rendered into the prompt (None:
    no tools in play, the answer is plain text), and `prefill`, the forced start of
    the answer (tool_choice "required" or a named function), in the model's `style`
    of writing calls, which is known once the model's template is (`_chat_ids`)."""

    tools: list[dict] | None = None
    prefill: str = ""
    parallel: bool = True  # parallel_tool_calls: false keeps the first call only
    forced: str | None = None  # tool_choice: None (auto), "" ("required") or the named tool
    style: ToolStyle = HERMES


@dataclass
class Prepared:
    engine: Any
    handle: Any
    tokenizer: Any
    prompts: list[list[int]]  # token ids, one list per prompt
    tools: ToolUse = field(default_factory=ToolUse)
    # A reasoning model (DeepSeek-R1 distills, Qwen3): its `<think>` block comes back as
    # `reasoning_content` beside `content`, as DeepSeek's API returns it.
    reasoning: bool = False
    think_opened: bool = False  # the rendered prompt ends inside a `<think>` block (R1's template)


def _prepare(request: Request, who: str, body: SamplingFields, prompt_ids_fn, prompt_param: str) -> Prepared:
    """Runs in a worker thread: loading a model and tokenising a long prompt must
    not stall the event loop (and with it every stream in flight)."""
    engine = request.app.state.engine
    handle = handle_for(request, who, body.model)
    try:
        engine.check_accepting()
        tok = engine.tokenizer(handle)
        prompts = prompt_ids_fn(engine, handle, tok)
        context = engine.context_length(handle)
    except EngineError as e:
        raise engine_error(e, prompt_param) from None
    for ids in prompts:
        if len(ids) >= context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has {len(ids)}",
                param=prompt_param,
                code="context_length_exceeded",
            )
    reasoning = is_reasoning_model(tok)
    opened = reasoning and bool(prompts) and prompt_opens_block(tok, prompts[0])
    return Prepared(engine, handle, tok, prompts, reasoning=reasoning, think_opened=opened)


def _completion_ids(body: CompletionRequest):
    def encode(engine, handle, tok) -> list[list[int]]:
        out = []
        for p in body.prompts():
            if isinstance(p, str):
                out.append(list(tok(p, add_special_tokens=False)["input_ids"]))
                continue
            if any(t >= len(tok) for t in p):
                raise APIError(
                    400,
                    f"prompt: token ids must be below the vocabulary size, {len(tok)}",
                    param="prompt",
                    code="invalid_value",
                )
            out.append([int(t) for t in p])
        return out

    return encode


def _tool_use(body: ChatRequest) -> ToolUse:
    """The request's tools and tool_choice, checked against each other (not yet the model)."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    if choice not in (None, "none") and not tools:
        raise APIError(400, "tool_choice: needs a non-empty tools list", param="tool_choice", code="invalid_value")
    if not tools or choice == "none":
        return ToolUse()
    forced = None
    if choice == "required":
        forced = ""
    elif isinstance(choice, NamedToolChoice):
        forced = choice.function.name
        if forced not in {t["function"]["name"] for t in tools}:
            raise APIError(
                400, f"tool_choice: no tool named {forced[:64]!r} in tools", param="tool_choice", code="invalid_value"
            )
    return ToolUse(tools, parallel=body.parallel_tool_calls is not False, forced=forced)


def _chat_ids(body: ChatRequest, use: ToolUse):
    messages = [m.for_template() for m in body.messages]
    history_calls = any(m.tool_calls for m in body.messages)

    def encode(engine, handle, tok) -> list[list[int]]:
        style = tool_style(getattr(tok, "chat_template", None))
        if (use.tools is not None or history_calls) and style is None:
            param = "tools" if body.tools else "messages"
            raise APIError(
                400,
                f"{param}: model {body.model} cannot use tools: its chat template does not render tool definitions "
                "and calls in a form openft reads (Qwen2.5's <tool_call> blocks, Llama 3.1's JSON calls, "
                "Mistral's [TOOL_CALLS])",
                param=param,
                code="unsupported_parameter",
            )
        if style is not None:
            use.style = style
            use.prefill = "" if use.forced is None else forced_call_prefill(use.forced or None, style)
        from jinja2.exceptions import TemplateError

        try:
            return [engine.apply_chat_template(handle, messages, use.tools, use.prefill)]
        except TemplateError as e:  # the template's own raise_exception: a conversation it does not take
            raise APIError(
                400, f"messages: the model's chat template refused them: {e}", param="messages", code="invalid_value"
            ) from None

    return encode


@router.post("/chat/completions", responses=_streamed(S.ChatCompletion))
async def chat_completions(request: Request, body: ChatRequest, who: str = Depends(owner)):
    use = _tool_use(body)
    prep = await run_in_threadpool(_prepare, request, who, body, _chat_ids(body, use), "messages")
    prep.tools = use
    return await _respond(prep, body, chat=True)


@router.post("/completions", responses=_streamed(S.Completion))
async def completions(request: Request, body: CompletionRequest, who: str = Depends(owner)):
    prep = await run_in_threadpool(_prepare, request, who, body, _completion_ids(body), "prompt")
    return await _respond(prep, body, chat=False)


# ------------------------------------------------------------------ log-probs


def _chat_logprobs(tok, entries: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    if entries is None:
        return None

    def one(token_id: int, logprob: float) -> dict:
        text, raw = token_bytes(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    content = [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def _legacy_logprobs(tok, entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """The completions endpoint's (legacy) shape: parallel lists; text_offset is where
    each token's text starts, counted in characters of the choice's text."""
    if entries is None:
        return None
    tokens = [token_bytes(tok, e.token_id)[0] for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{token_bytes(tok, t)[0]: lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


# ------------------------------------------------------------------ answers


def assistant_message(
    use: ToolUse, text: str, finish: str | None, reasoning: bool = False, opened: bool = False
) -> tuple[dict, str | None]:
    """The answer's message and finish_reason from the model's raw text.

    The one place the raw text is split into message fields: tool calls here; the
    reasoning of a thinking model (`<think>` ... `</think>` as `reasoning_content`)
    is split off the same text, before the tool calls, in this function.
    """
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if reasoning:
        message["reasoning_content"], text = split_reasoning(THINK_OPEN + text if opened else text)
        message["content"] = text
    if use.tools is None:
        return message, finish
    content, calls = parse_tool_calls(use.prefill + text, {t["function"]["name"] for t in use.tools}, use.style)
    calls = calls if use.parallel else calls[:1]
    message["content"] = content or (None if calls else "")
    if calls:
        message["tool_calls"] = calls
        finish = "tool_calls" if finish == "stop" else finish
    return message, finish


def _choice_json(prep: Prepared, c: Choice, index: int, chat: bool) -> dict:
    if chat:
        message, finish = assistant_message(prep.tools, c.text, c.finish_reason, prep.reasoning, prep.think_opened)
        return {
            "index": index,
            "message": message,
            "finish_reason": finish,
            "logprobs": _chat_logprobs(prep.tokenizer, c.logprobs),
        }
    return {
        "index": index,
        "text": c.text,
        "finish_reason": c.finish_reason,
        "logprobs": _legacy_logprobs(prep.tokenizer, c.logprobs),
    }


async def _respond(prep: Prepared, body: SamplingFields, *, chat: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    params = body.sampling()
    head = {"id": rid, "created": created, "model": body.model, "system_fingerprint": "openft"}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(prep, params, head, chat, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        # Each prompt is its own engine request (they batch together); choice i of
        # prompt p is choices[p * n + i], as OpenAI numbers them.
        results = await asyncio.gather(*(prep.engine.choices(prep.handle, ids, params) for ids in prep.prompts))
    except EngineError as e:
        raise engine_error(e, "messages" if chat else "prompt") from None
    out = [
        _choice_json(prep, c, p * params.n + c.index, chat) for p, (choices, _) in enumerate(results) for c in choices
    ]
    return {
        **head,
        "object": "chat.completion" if chat else "text_completion",
        "choices": out,
        "usage": _usage(_total([u for _, u in results])),
    }


async def _merged(prep: Prepared, params: SamplingParams) -> AsyncIterator[tuple[int, Delta | Usage]]:
    """The engine streams of every prompt, interleaved as they produce: (prompt index, item).
    Raises the first EngineError; leaving early cancels every stream (freeing its rows)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(p: int, ids: list[int]) -> None:
        try:
            async for item in prep.engine.stream(prep.handle, ids, params):
                queue.put_nowait((p, item))
        except EngineError as e:
            queue.put_nowait((p, e))
        finally:
            queue.put_nowait((p, done))

    tasks = [asyncio.create_task(pump(p, ids)) for p, ids in enumerate(prep.prompts)]
    try:
        left = len(tasks)
        while left:
            p, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, EngineError):
                raise item
            else:
                yield p, item
    finally:
        for t in tasks:
            t.cancel()


async def _stream(prep: Prepared, params: SamplingParams, head: dict, chat: bool, include_usage: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"
    n = params.n

    def chunk(choices, usage=None):
        c = {**head, "object": obj, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return _sse(c)

    def choice(index, text, finish=None, first=False, logprobs=None):
        if chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            lp = _chat_logprobs(prep.tokenizer, logprobs)
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
        lp = _legacy_logprobs(prep.tokenizer, logprobs, offsets.get(index, 0))
        if lp is not None:
            offsets[index] = offsets.get(index, 0) + sum(map(len, lp["tokens"]))
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": lp}

    def tooled(index, item: Delta):
        """With tools in play: the content that can only be content now; at the end the
        held rest, with its calls in OpenAI's streamed shape (each call with its `index`)."""
        hold = held.setdefault(index, CallHoldBack(prep.tools.prefill, bare=True, style=prep.tools.style))
        text = hold.push(item.text)
        if item.finish_reason is None:
            if not text and item.logprobs is None:
                return None
            return choice(index, text, logprobs=item.logprobs)
        del held[index]
        message, finish = assistant_message(replace(prep.tools, prefill=""), hold.held, item.finish_reason)
        delta = {"content": text + (message["content"] or "") if text or message["content"] else None}
        if "tool_calls" in message:
            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
        elif delta["content"] is None:
            delta["content"] = ""
        lp = _chat_logprobs(prep.tokenizer, item.logprobs)
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}

    def thought(index, item: Delta) -> tuple[dict | None, Delta]:
        """A reasoning model's piece: its reasoning as a `reasoning_content` delta, the
        rest passed on as the content to send."""
        rs = thinking.setdefault(index, ReasoningStream(opened=prep.think_opened))
        reasoning, content = rs.push(item.text)
        if item.finish_reason is not None:
            r, c = rs.finish()
            reasoning, content = reasoning + r, content + c
        piece = {"index": index, "delta": {"reasoning_content": reasoning}, "finish_reason": None, "logprobs": None}
        return (piece if reasoning else None), replace(item, text=content)

    offsets: dict[int, int] = {}  # per choice: characters of token text sent so far (text_offset)
    thinking: dict[int, ReasoningStream] = {}  # per choice, for a reasoning model
    held: dict[int, CallHoldBack] = {}  # per choice, with tools in play: the text not sent yet
    if chat:
        yield chunk([choice(i, "", first=True) for i in range(n)])
    usages: list[Usage] = []
    try:
        async for p, item in _merged(prep, params):
            if isinstance(item, Delta) and chat and prep.reasoning:
                piece, item = thought(p * n + item.index, item)
                if piece is not None:
                    yield chunk([piece])
                if not item.text and item.finish_reason is None and item.logprobs is None:
                    continue
            if isinstance(item, Delta) and chat and prep.tools.tools is not None:
                piece = tooled(p * n + item.index, item)
                if piece is not None:
                    yield chunk([piece])
            elif isinstance(item, Delta):
                # The final chunk carries content "" (not null), so a client that
                # prints delta.content prints nothing extra.
                yield chunk([choice(p * n + item.index, item.text, item.finish_reason, logprobs=item.logprobs)])
            elif isinstance(item, Usage):
                usages.append(item)
    except EngineError as e:
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": e.code}})
    else:
        if include_usage:
            yield _sse({**head, "object": obj, "choices": [], "usage": _usage(_total(usages))})
    yield _sse("[DONE]")
