"""The inference engine's public types (re-exported by `openft.serve.engine`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelHandle:
    """What a served model name resolves to (the HTTP layer builds these)."""

    name: str  # "smollm2-135m-instruct", "ft:<base>:<owner>:<suffix>:<id>", "...:ckpt-step-20"
    base_path: Path  # local HF safetensors dir of the base
    adapter_path: Path | None = None  # a PEFT-format LoRA adapter dir, or None for the plain base
    full_model_path: Path | None = None  # a full fine-tune's HF dir: it is its own base, base_path is ignored

    @property
    def weights_path(self) -> Path:
        """The directory whose weights the forward pass runs on."""
        return Path(self.full_model_path if self.full_model_path is not None else self.base_path)


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None or more than fits -> clamped to (context - prompt), never refused
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the output
    seed: int | None = None  # same seed + same request -> same output (choice i uses seed + i)
    n: int = 1  # number of choices
    top_k: int = 0  # keep only the k most likely tokens (0: no limit)
    # OpenAI's penalties, over the tokens this choice generated so far:
    # logits[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: no log-probs; k >= 0: each sampled token's log-prob and the k most likely alternatives
    logprobs: int | None = None


@dataclass
class TokenLogprob:
    """One sampled token's log-probability under the model's distribution for that
    step (log-softmax of the logits after the penalties, before temperature, top-k and
    top-p), with the `top` most likely tokens of that step, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-prob)


@dataclass
class Delta:
    """One streamed piece of one choice."""

    index: int  # choice index
    text: str  # never a broken UTF-8 character (held until whole; bytes no token completes are dropped)
    finish_reason: str | None  # None while running; "stop" (end token or stop string) or "length"
    # With SamplingParams.logprobs: the tokens sampled since this choice's previous Delta
    # (an end token excepted), whether or not their text is in this piece yet.
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Choice:
    """One whole choice of a finished request."""

    index: int
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Usage:
    prompt_tokens: int  # counted once, whatever n is (as OpenAI does)
    completion_tokens: int  # every sampled token of every choice, an end-of-turn token included
    total_tokens: int


# EngineError.code -> the HTTP status it suggests.
STATUS = {
    "invalid_request": 400,
    "context_length_exceeded": 400,
    "model_not_found": 404,
    "model_invalid": 422,  # its files are there but cannot be loaded (bad config, unreadable weights)
    "adapter_not_found": 404,
    "adapter_invalid": 422,
    "adapter_incompatible": 422,
    "engine_stopped": 503,
    "internal_error": 500,
}


class EngineError(Exception):
    """A request the engine could not serve; it fails that request only."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def status(self) -> int:
        return STATUS.get(self.code, 500)
