"""The HTTP API fuzzed from its own OpenAPI document (schemathesis), against a
real `openft serve` on loopback with an API key: no answer is a 5xx, and every
answer has a status the document declares and a body that matches the declared
schema (the document declares the real response models and the error envelope;
see openft/serve/schemas.py). Generated requests are valid ones (positive) and
invalid ones (negative, which must be refused with a 4xx); a pass with the ids
of real objects (a file, a finished job, its model) checks the 200 answers too.

`fuzz()` is shared with benchmarks/fuzz_api.py, which runs a larger campaign.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from .conftest import SPEC, TINY, Server, jsonl, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"


@dataclass
class FuzzReport:
    requests: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    by_pass: dict[str, dict[str, int]] = field(default_factory=dict)  # pass name -> operation -> requests
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, pass_name: str, label: str, status: int) -> None:
        self.requests += 1
        self.by_operation[label] = self.by_operation.get(label, 0) + 1
        done = self.by_pass.setdefault(pass_name, {})
        done[label] = done.get(label, 0) + 1
        self.statuses[status] = self.statuses.get(status, 0) + 1


def _checks(negative: bool):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    return checks + [negative_data_rejection] if negative else checks


def _label(op) -> str:
    return f"{op.method.upper()} {op.path}"


def _run_case(case, url: str, headers: dict, report: FuzzReport, pass_name: str, negative: bool) -> None:
    label = _label(case.operation)
    try:
        response = case.call(base_url=url, headers=headers, timeout=180)
    except Exception as e:  # a dropped connection is a failure too, not a crash of the campaign
        report.failures.append(f"{label}: no response ({type(e).__name__}: {e})"[:600])
        return
    report.add(pass_name, label, response.status_code)
    try:
        case.validate_response(response, checks=_checks(negative))
    except (Exception, BaseExceptionGroup) as e:  # schemathesis' FailureGroup is a BaseExceptionGroup
        report.failures.append(f"{label} -> {response.status_code}: {str(e)[:1500]}")


def fuzz(url: str, api_key: str, *, examples: int, seed: int = 0, real_ids: dict[str, str] | None = None) -> FuzzReport:
    """Generate at most `examples` requests per operation and mode (passes
    "positive" and "negative"), then a pass ("real") over the lists and every
    operation whose path ids are in `real_ids` (path parameter name -> id), with
    those ids. The campaign is bounded by that count, not by a clock: every
    operation gets its examples however fast the machine is. Deletes come last,
    so they do not remove what the other operations look at."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    ops = sorted((r.ok() for r in schema.get_all_operations()), key=lambda o: (o.method == "delete", o.path))
    headers = {"Authorization": f"Bearer {api_key}"}
    report = FuzzReport()
    passes = [("positive", GenerationMode.POSITIVE, None), ("negative", GenerationMode.NEGATIVE, None)]
    if real_ids:
        passes.append(("real", GenerationMode.POSITIVE, real_ids))
    for pass_name, mode, ids in passes:
        for op in ops:
            names = {p.name for p in op.path_parameters}
            if ids is not None and not (names <= set(ids) and (names or op.method == "get")):
                continue  # the real-id pass: the operations on the real objects, and the lists
            _fuzz_operation(
                op, mode, ids and {k: ids[k] for k in names}, examples, seed, url, headers, report, pass_name
            )
    return report


def _fuzz_operation(op, mode, path_ids, examples, seed, url, headers, report, pass_name) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    negative = mode == GenerationMode.NEGATIVE
    strategy = op.as_strategy(generation_mode=mode, path_parameters=path_ids)

    @hseed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(case):
        _run_case(case, url, headers, report, pass_name, negative)

    try:
        run()
    except Unsatisfiable:
        pass  # nothing invalid to generate (e.g. only free-form string ids): no negative case
    except (Exception, BaseExceptionGroup) as e:  # the schema could not be turned into data: a failure of ours
        report.failures.append(f"{_label(op)} ({pass_name}): {type(e).__name__}: {e}"[:600])


# ----------------------------------------------------------------- fixtures


def create_key(home: Path, owner: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "openft.cli", "keys", "create", "--owner", owner],
        env={**os.environ, "OPENFT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def real_objects(s: Server, key: str, model: str) -> dict[str, str]:
    """A processed file, a finished one-step job and its model, an eval with a
    completed run and its output item, owned by `key`."""
    c = s.client(key)
    rows = [json.loads(x) for x in (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()[:12]]
    f = c.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=model, training_file=f.id, extra_body={"max_steps": 1})
    done = wait_for(
        lambda: (j := c.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j, timeout=400
    )
    assert done.status == "succeeded", done.error
    # Load the built-in model's tokenizer once, before the clock of the campaign starts.
    httpx.get(f"{s.url}/v1/files/{f.id}/preview", headers={"Authorization": f"Bearer {key}"}, timeout=300)
    ev = c.evals.create(
        data_source_config={"type": "custom", "item_schema": {"type": "object"}},
        testing_criteria=[
            {
                "type": "string_check",
                "name": "s",
                "input": "{{sample.output_text}}",
                "reference": "{{item.a}}",
                "operation": "eq",
            }
        ],
    )
    rows = [{"item": {"a": "x"}, "sample": {"output_text": "x"}}]
    run = c.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": rows}})
    wait_for(lambda: c.evals.runs.retrieve(run.id, eval_id=ev.id).status == "completed", timeout=400)
    item = c.evals.runs.output_items.list(run.id, eval_id=ev.id).data[0]
    return {
        "file_id": f.id,
        "job_id": job.id,
        "model_id": done.fine_tuned_model,
        "eval_id": ev.id,
        "run_id": run.id,
        "output_item_id": item.id,
    }


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, session_home, tiny_model_dir):
    home = tmp_path_factory.mktemp("fuzz-home")
    (home / "models").symlink_to(Path(session_home) / "models", target_is_directory=True)
    key = create_key(home, "fuzzer")
    s = Server(home, "--max-upload-mb", "1", models={TINY: tiny_model_dir}).start()
    yield s, key
    s.stop()


# -------------------------------------------------------------------- tests


def test_openapi_document_declares_responses_and_errors(keyed):
    s, _ = keyed
    doc = httpx.get(s.url + "/openapi.json", timeout=30).json()
    n = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            ok = op["responses"]["200"]["content"]
            assert ok and any(v.get("schema") for v in ok.values()), (method, path)  # a real shape, not `{}`
            # Validation errors are 400s; a 422 is only openft's own (a model whose files cannot be loaded).
            if "422" in op["responses"]:
                ref = op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/Error", (method, path)
            if path != "/health":
                for code in ("400", "401", "404"):
                    ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (method, path, code)
            n += 1
    assert n >= 24, n
    err = doc["components"]["schemas"]["ErrorBody"]
    assert set(err["required"]) == {"message", "type", "param", "code"}


# Our declared shape -> OpenAI's, for every OpenAI-compatible object.
OPENAI_SHAPES = {
    "FileObject": "OpenAIFile",
    "FileList": "ListFilesResponse",
    "Deleted": "DeleteFileResponse",
    "Job": "FineTuningJob",
    "JobList": "ListPaginatedFineTuningJobsResponse",
    "Event": "FineTuningJobEvent",
    "EventList": "ListFineTuningJobEventsResponse",
    "Checkpoint": "FineTuningJobCheckpoint",
    "CheckpointList": "ListFineTuningJobCheckpointsResponse",
    "Model": "Model",
    "ModelList": "ListModelsResponse",
    "ChatCompletion": "CreateChatCompletionResponse",
    "Completion": "CreateCompletionResponse",
    "Error": "ErrorResponse",
    "ErrorBody": "Error",
}


def test_declared_shapes_stay_compatible_with_openai(keyed):
    """Every field OpenAI's spec requires is one our document requires too, with
    the same `object` tag, so an answer valid for our document is one an OpenAI
    client accepts (the e2e tests validate real answers against OpenAI's spec)."""
    if not SPEC.exists():
        pytest.skip("../shared/openai-openapi.yaml is not present")
    import yaml

    s, _ = keyed
    ours = httpx.get(s.url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    theirs = yaml.load(SPEC.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["components"]["schemas"]
    for mine, openai_name in OPENAI_SHAPES.items():
        a, b = ours[mine], theirs[openai_name]
        missing = set(b.get("required", [])) - set(a.get("required", []))
        assert not missing, (mine, openai_name, missing)
        tag = b.get("properties", {}).get("object", {}).get("enum")
        if tag and "object" in a.get("properties", {}):
            declared = a["properties"]["object"].get("const", a["properties"]["object"].get("enum"))
            assert declared in (tag[0], tag) or (mine == "Deleted"), (mine, declared, tag)


def test_schemathesis_finds_no_server_error_and_no_schema_break(keyed, tiny_model_dir):
    s, key = keyed
    ids = real_objects(s, key, TINY)
    examples = 8
    report = fuzz(s.url, key, examples=examples, real_ids=ids)
    print(
        f"\nschemathesis: {report.requests} requests over {len(report.by_operation)} operations; "
        f"statuses {dict(sorted(report.statuses.items()))}; {len(report.failures)} failures"
    )
    assert not report.failures, "\n\n".join(report.failures[:10])
    doc = httpx.get(s.url + "/openapi.json", timeout=30).json()
    operations = {f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops}
    # Every operation got valid requests, none more than its examples per pass.
    assert set(report.by_pass["positive"]) == operations, operations ^ set(report.by_pass["positive"])
    assert all(1 <= n <= examples for calls in report.by_pass.values() for n in calls.values()), report.by_pass
    # Every read of a real object (the file, the job, its model) was checked against it.
    reads = {op for op in operations if op.startswith("GET ") and "{" in op}
    assert reads <= set(report.by_pass["real"]), reads - set(report.by_pass["real"])
    assert report.statuses.get(200, 0) > 0 and sum(v for k, v in report.statuses.items() if 400 <= k < 500) > 0
    assert not any(k >= 500 for k in report.statuses)
    # The server is still fine afterwards, and the fuzzing never reached another owner's view.
    assert s.health()["status"] == "ok"
