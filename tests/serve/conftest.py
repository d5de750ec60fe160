"""A real `openft serve` on loopback, and OpenAPI schema validation."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

SPEC = Path(__file__).resolve().parents[2].parent / "shared" / "openai-openapi.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The name every test server knows the tiny test model by: over HTTP a base model is a
# name (built-in or registered with `openft models add`), never a path.
TINY = "tiny-llama"


def register(home: Path, name: str, path: Path) -> None:
    """What `openft models add PATH --name NAME` does, for the server whose home is `home`
    (once: a server restarted on the same home keeps its registry)."""
    from openft.models.registry import add, registered

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENFT_HOME", str(home))
        if name not in registered():
            add(path, name)


class Server:
    def __init__(self, home: Path, *extra: str, models: dict[str, Path] | None = None):
        """`models`: names to register (as `openft models add` would) before the server starts."""
        self.home, self.extra = home, extra
        for name, path in (models or {}).items():
            register(home, name, path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = open(home / f"server-{self.port}.log", "ab")

    def start(self) -> Server:
        env = {**os.environ, "OPENFT_HOME": str(self.home)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openft.cli", "serve", "--port", str(self.port), *self.extra],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.home / f'server-{self.port}.log').read_text()[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError("server did not start")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, api_key: str = "local"):
        from openai import OpenAI

        return OpenAI(api_key=api_key, base_url=self.url + "/v1", max_retries=0, timeout=120)


def _nullable_to_json_schema(node):
    """The spec still marks some fields OpenAPI-3.0 style (`nullable: true`), which
    JSON Schema ignores; rewrite those as anyOf [schema, null]."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_json_schema(v) for k, v in node.items()}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        # OpenAPI 3.0's boolean form (`minimum: 0, exclusiveMinimum: true`) is a number in JSON Schema.
        if isinstance(node.get(bound), bool):
            exclusive = node.pop(bound)
            if exclusive and limit in node:
                node[bound] = node.pop(limit)
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="session")
def openapi():
    if not SPEC.exists():
        pytest.skip("../shared/openai-openapi.yaml is not present")
    import yaml
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    doc = _nullable_to_json_schema(yaml.load(SPEC.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    registry = Registry().with_resource("openapi", Resource.opaque(doc))

    def validate(obj, schema_name: str) -> None:
        if hasattr(obj, "model_dump"):
            obj = obj.model_dump(mode="json", exclude_unset=True, by_alias=True)  # the wire names
        schema = {"$ref": f"openapi#/components/schemas/{schema_name}"}
        errors = sorted(Draft202012Validator(schema, registry=registry).iter_errors(obj), key=lambda e: e.path)
        assert not errors, f"{schema_name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])

    return validate


@pytest.fixture(scope="module")
def server(tmp_path_factory, session_home, tiny_model_dir):
    home = tmp_path_factory.mktemp("serve-home")
    # Share the converted built-in model cache with the rest of the session.
    (home / "models").symlink_to(Path(session_home) / "models", target_is_directory=True)
    s = Server(home, models={TINY: tiny_model_dir}).start()
    yield s
    s.stop()


def wait_for(predicate, timeout: float = 300, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def jsonl(rows) -> bytes:
    return ("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n").encode()


@contextlib.contextmanager
def in_process_app(home: Path, models: dict[str, Path]):
    """The real app and engine in this process (no server process, no worker) with
    `models` registered in `home`; for routes whose answers a test scripts."""
    from openft.serve.app import ServeConfig, create_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENFT_HOME", str(home))
        for name, path in models.items():
            register(home, name, path)
        application = create_app(ServeConfig(run_worker=False))
        try:
            yield application
        finally:
            application.state.engine.stop()


def scripted_sampler(monkeypatch, tokenizer, end_token: str):
    """set_script(text): the engine's next answers are `text` then `end_token`, whatever
    the logits (the real sampler still runs, so its state advances as usual); one
    request at a time. A tiny random model never writes a given answer, so this is how
    the route, engine, detokenizer and parsers are run on one."""
    from openft.serve import engine as engine_mod

    real = engine_mod.sample
    state = {"ids": [], "i": 0}

    def scripted(logits, *rest):
        real(logits, *rest)
        i, state["i"] = state["i"], state["i"] + 1
        # Cycled: an answer ends at the script's last token (the end of turn), so the
        # next request starts the script again.
        return [state["ids"][i % len(state["ids"])]] * logits.shape[0]

    def set_script(text: str) -> None:
        end = tokenizer.convert_tokens_to_ids(end_token)
        state["ids"], state["i"] = tokenizer(text, add_special_tokens=False)["input_ids"] + [end], 0

    monkeypatch.setattr(engine_mod, "sample", scripted)
    return set_script
