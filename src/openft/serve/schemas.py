"""The response shapes the API declares in its OpenAPI document.

Routes return plain dicts (fast, and free to carry openft's extra fields); these
models only *document* what comes back, so a client generator or a fuzzer
(schemathesis, tests/serve/test_api_fuzz.py) can check every answer against the
declared shape. Every model allows extra fields: openft's extensions ride along
in the same objects, as OpenAI's own objects grow new fields over time. The
required fields of the OpenAI-compatible ones are a superset of those in
OpenAI's spec (checked in the fuzz test), so OpenAI clients parse them.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------ errors


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    """The one error envelope every failure answers with."""

    error: ErrorBody


# ------------------------------------------------------------------- files


class FileObject(_Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    validation: dict[str, Any] | None = None


class FileList(_Open):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Deleted(_Open):
    id: str
    object: str
    deleted: bool


# ------------------------------------------------------------- fine-tuning

JobStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]


class JobError(_Open):
    code: str
    message: str
    param: str | None = None


class Job(_Open):
    id: str
    object: Literal["fine_tuning.job"]
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: JobStatus
    validation_file: str | None
    training_file: str
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    error: JobError | None
    seed: int
    integrations: list[Any] | None = None
    estimated_finish: int | None = None
    method: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    resources: dict[str, int] | None = None  # openft: the ranks it trains on, {"nproc_per_node": 2}


class JobList(_Open):
    object: Literal["list"]
    data: list[Job]
    has_more: bool


class Event(_Open):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: str
    data: dict[str, Any]


class EventList(_Open):
    object: Literal["list"]
    data: list[Event]
    has_more: bool


class Checkpoint(_Open):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, float]
    fine_tuning_job_id: str


class CheckpointList(_Open):
    object: Literal["list"]
    data: list[Checkpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool


class JobComparison(_Open):
    object: Literal["fine_tuning.job.comparison"]
    fine_tuning_job_id: str


# ------------------------------------------------------------------ models


class Model(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[Model]


# -------------------------------------------------------------------- chat


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CalledFunction(_Open):
    name: str
    arguments: str  # JSON text of an object


class ToolCall(_Open):
    id: str  # call_...
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(_Open):
    """With tools in play and a call made: `tool_calls`, and `content` null unless
    the model also wrote text."""

    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    tool_calls: list[ToolCall] | None = None
    # A reasoning model's `<think>` block (DeepSeek's API field); absent for other models.
    reasoning_content: str | None = None


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Open):
    """With `logprobs: true`: each generated token's log-probability under the model
    (log-softmax of its logits after the penalties, before temperature, top_k, top_p)."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChatLogprobs | None


class ChatCompletion(_Open):
    """Or, with `stream: true`, server-sent `chat.completion.chunk` events."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(_Open):
    """With `logprobs: k`: per generated token its text, log-probability, the k most
    likely tokens of that step, and where its text starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Open):
    """Choice i of prompt p has index p * n + i."""

    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


# -------------------------------------------------------------- the rest


class ApiKey(_Open):
    id: str
    object: Literal["api_key"]
    owner: str
    created_at: int
    key: str | None = None


class ApiKeyList(_Open):
    object: Literal["list"]
    data: list[ApiKey]


class Health(_Open):
    status: Literal["ok"]
    version: str
    worker_pid: int | None
    worker_restarts: int
    precision: Literal["fp32", "bf16"]  # the dtype chat completions run in


class FleetJob(_Open):
    id: str | None  # None: another owner's job
    model: str | None
    ranks: int


class FleetMember(_Open):
    id: str
    kind: Literal["worker", "replica"]
    host: str
    pid: int
    address: str | None  # a replica's listen address
    capabilities: dict | None  # a worker's cpus, gpus, max_ranks
    state: Literal["alive", "lost", "stopped"]
    started_at: int
    heartbeat_age_s: float
    job: FleetJob | None


class Fleet(_Open):
    object: Literal["openft.fleet"]
    store: dict[str, str]  # dialect, url (without its password)
    replicas: list[FleetMember]
    workers: list[FleetMember]
    jobs: dict[str, int]  # queued, running


# ------------------------------------------------------------------ graders


class GraderErrors(_Open):
    formula_parse_error: bool
    sample_parse_error: bool
    truncated_observation_error: bool
    unresponsive_reward_error: bool
    invalid_variable_error: bool
    other_error: bool
    python_grader_server_error: bool
    python_grader_server_error_type: str | None
    python_grader_runtime_error: bool
    python_grader_runtime_error_details: str | None
    model_grader_server_error: bool
    model_grader_refusal_error: bool
    model_grader_parse_error: bool
    model_grader_server_error_details: str | None


class GraderRunMetadata(_Open):
    name: str
    type: str
    errors: GraderErrors
    execution_time: float
    scores: dict[str, Any]
    token_usage: int | None
    sampled_model_name: str | None


class RunGraderResponse(_Open):
    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, Any]
    model_grader_token_usage_per_model: dict[str, Any]


class ValidateGraderResponse(_Open):
    grader: dict[str, Any]


# ------------------------------------------------------------------ evals


class EvalObject(_Open):
    object: Literal["eval"]
    id: str
    name: str
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]
    created_at: int
    metadata: dict[str, str] | None


class EvalList(_Open):
    object: Literal["list"]
    data: list[EvalObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class EvalDeleted(_Open):
    object: str
    deleted: bool
    eval_id: str


class EvalRunObject(_Open):
    object: Literal["eval.run"]
    id: str
    eval_id: str
    status: str
    model: str
    name: str
    created_at: int
    report_url: str
    result_counts: dict[str, int]
    per_model_usage: list[dict[str, Any]]
    per_testing_criteria_results: list[dict[str, Any]]
    data_source: dict[str, Any]
    metadata: dict[str, str] | None
    error: dict[str, Any] | None


class EvalRunList(_Open):
    object: Literal["list"]
    data: list[EvalRunObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class EvalRunDeleted(_Open):
    object: str
    deleted: bool
    run_id: str


class EvalOutputItem(_Open):
    object: Literal["eval.run.output_item"]
    id: str
    run_id: str
    eval_id: str
    created_at: int
    status: str
    datasource_item_id: int
    datasource_item: dict[str, Any]
    results: list[dict[str, Any]]
    sample: dict[str, Any] | None


class EvalOutputItemList(_Open):
    object: Literal["list"]
    data: list[EvalOutputItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileStats(_Open):
    object: Literal["file.stats"]
    file_id: str
    model: str
    histogram: dict[str, list[int]]
    warnings: list[dict[str, Any]]


class PreviewExample(_Open):
    where: str
    tokens: int
    trained_tokens: int
    segments: list[dict[str, Any]]


class PreviewTemplate(_Open):
    name: str  # chatml, gemma, llama3, mistral, plain, or a file's stem
    source: Literal["model", "family", "plain", "file"]
    description: str  # the same words as `openft data preview`


class FilePreview(_Open):
    object: Literal["file.preview"]
    file_id: str
    model: str
    chat_template: PreviewTemplate | None = None  # which template renders the examples, and from where
    examples: list[PreviewExample]


class Estimate(_Open):
    object: Literal["fine_tuning.estimate"]
    examples: int
    epochs: int
    steps: int
    batch_size: int
    learning_rate: float
    max_seq_length: int
    total_tokens: int
    supervised_tokens: int
    method: str


class Comparison(_Open):
    object: Literal["comparison"]


def ok(model: type[BaseModel], media_type: str = "application/json") -> dict:
    """`responses=` entry documenting a 200 answer (without filtering it)."""
    return (
        {200: {"model": model, "content": {media_type: {}}}}
        if media_type != "application/json"
        else {200: {"model": model}}
    )


# Which failures each operation may answer with, besides the 400/401/403/404 of all.
_EXTRA_ERRORS = {
    ("post", "/v1/files"): (413,),
    ("post", "/v1/chat/completions"): (422, 503),
    ("post", "/v1/completions"): (422, 503),
    ("post", "/v1/comparisons"): (422, 503),
    ("post", "/v1/evals/{eval_id}/runs/{run_id}"): (409,),
    ("post", "/v1/evals/{eval_id}/runs/{run_id}/cancel"): (409,),
}
_ERROR_TEXT = {
    400: "Bad request: the `param` names the field",
    401: "Missing or wrong API key",
    403: "Not allowed",
    404: "No such object (or not the caller's)",
    409: "The object is not in a state that allows this (a finished run cannot be cancelled)",
    413: "Upload over the size limit",
    422: "The model's files are there but cannot be loaded (bad config, unreadable weights)",
    503: "The server is shutting down",
}


def document(app) -> dict:
    """The app's OpenAPI document with the errors it really answers: FastAPI
    declares a 422 for validation failures, which openft answers as a 400 in the
    error envelope (OpenAI's convention)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = Error.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schemas["Error"].pop("$defs", {}))
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            codes = () if path == "/health" else (400, 401, 403, 404) + _EXTRA_ERRORS.get((method, path), ())
            for code in codes:
                responses[str(code)] = {
                    "description": _ERROR_TEXT[code],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    app.openapi_schema = doc
    return doc
