"""Hostile input through a real `openft serve` (API key, 1 MB upload limit):
uploads far over the limit are cut off while they stream in and leave nothing
behind; names, ids and model names never reach a file system path unchecked;
pickle weights are never loaded; absurd chat parameters are 400s naming the
field, and the server still answers normally afterwards."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import TINY, Server, jsonl
from .test_api_fuzz import create_key

pytestmark = pytest.mark.integration

MB = 1 << 20
EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"
BUILTIN = "smollm2-135m-instruct"


def _rows(n=12):
    return [json.loads(x) for x in (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, session_home, tiny_model_dir):
    home = tmp_path_factory.mktemp("limits-home")
    (home / "models").symlink_to(Path(session_home) / "models", target_is_directory=True)
    tmp = tmp_path_factory.mktemp("limits-tmp")  # the server's TMPDIR: spooled uploads land here
    key = create_key(home, "L")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp))
        s = Server(home, "--max-upload-mb", "1", models={TINY: tiny_model_dir}).start()
    s.key, s.tmp = key, tmp
    s.h = {"Authorization": f"Bearer {key}"}
    yield s
    s.stop()


def _envelope(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def _tree(root: Path, skip=()) -> set[str]:
    return {
        str(p.relative_to(root)) for p in root.rglob("*") if not any(str(p).startswith(str(root / s)) for s in skip)
    }


def _file_ids(s) -> set[str]:
    return {f["id"] for f in httpx.get(s.url + "/v1/files", headers=s.h, timeout=30).json()["data"]}


def _job_ids(s) -> set[str]:
    return {
        j["id"] for j in httpx.get(s.url + "/v1/fine_tuning/jobs?limit=100", headers=s.h, timeout=30).json()["data"]
    }


# ------------------------------------------------------------------ uploads


class RssWatch:
    """Samples the server's resident memory while a request is in flight."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.base = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _multipart(name: bytes, chunks, boundary="openftlimits"):
    yield (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'
        ).encode()
        + name
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    yield from chunks
    yield f"\r\n--{boundary}--\r\n".encode()


def test_upload_ten_times_the_limit_is_cut_off_while_streaming_and_leaves_nothing(srv):
    before_ids, before_files, before_tmp = _file_ids(srv), _tree(srv.home / "files"), _tree(srv.tmp)
    sent = 0

    def body():  # 10 MB in 256 KB chunks, no Content-Length: only the streaming check can stop it
        nonlocal sent
        for _ in range(40):
            sent += MB // 4
            yield b"z" * (MB // 4)

    headers = {**srv.h, "content-type": "multipart/form-data; boundary=openftlimits"}
    with RssWatch(srv.proc.pid) as rss:
        try:
            r = httpx.post(srv.url + "/v1/files", content=_multipart(b"big.bin", body()), headers=headers, timeout=120)
            status, err = r.status_code, _envelope(r)
        except httpx.TransportError:  # the server may close the connection before the client sent it all
            status, err = None, None
    if status is not None:
        assert status == 413 and err["code"] == "file_too_large" and err["param"] == "file", err
    grown = (rss.peak - rss.base) / MB
    print(f"\n10 MB upload against a 1 MB limit: server RSS grew by {grown:.1f} MB at most (sent {sent / MB:.1f} MB)")
    assert grown < 5, grown  # nowhere near the 10 MB sent: nothing was buffered
    # Declared up front: refused before a byte of the body is read.
    r = httpx.post(
        srv.url + "/v1/files",
        headers=srv.h,
        files={"file": ("big.jsonl", b"x" * (10 * MB))},
        data={"purpose": "user_data"},
        timeout=120,
    )
    assert r.status_code == 413 and _envelope(r)["code"] == "file_too_large"
    # Nothing behind: no rows, no folders, no partial or spooled temp files.
    assert _file_ids(srv) == before_ids
    assert _tree(srv.home / "files") == before_files
    assert _tree(srv.tmp) == before_tmp
    # And the server takes a normal upload right after.
    ok = httpx.post(
        srv.url + "/v1/files",
        headers=srv.h,
        files={"file": ("t.jsonl", jsonl(_rows()))},
        data={"purpose": "fine-tune"},
        timeout=120,
    )
    assert ok.status_code == 200 and ok.json()["status"] == "processed", ok.text


# ----------------------------------------------------------- path traversal

TRAVERSALS = [
    "../../etc/passwd",
    "..%2f..%2fopenft.db",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/etc/passwd",
    "..\\..\\openft.db",
    "file-x%00.jsonl",
    "ft:x:y:z:../../../etc",
]


def test_upload_names_never_become_paths(srv):
    outside_before = _tree(srv.home, skip=("files",))
    names = [
        b"../../etc/passwd",
        b"/etc/passwd",
        b"..\\..\\evil.jsonl",
        b"..",
        b"a\x00b.jsonl",
        b"x" * 400 + b".jsonl",
        b"%2e%2e%2fup.jsonl",
        b"ok/../../../../tmp/escape.jsonl",
    ]
    for name in names:
        chunks = [jsonl(_rows(2))]
        r = httpx.post(
            srv.url + "/v1/files",
            content=_multipart(name, chunks),
            timeout=60,
            headers={**srv.h, "content-type": "multipart/form-data; boundary=openftlimits"},
        )
        assert r.status_code == 200, (name, r.text)
        f = r.json()
        assert "/" not in f["filename"] and "\\" not in f["filename"] and "\x00" not in f["filename"], f
        assert 0 < len(f["filename"]) <= 255
        stored = [p for p in (srv.home / "files" / f["id"]).iterdir()]
        assert len(stored) == 1 and stored[0].parent == srv.home / "files" / f["id"], stored
        got = httpx.get(f"{srv.url}/v1/files/{f['id']}/content", headers=srv.h, timeout=30)
        assert got.status_code == 200 and got.content == chunks[0]
    # Nothing was written anywhere but inside the files folder (the store aside).
    new = {p for p in _tree(srv.home, skip=("files",)) - outside_before if not p.startswith(("openft.db", "server-"))}
    assert not new, new
    assert not Path("/tmp/escape.jsonl").exists()


def test_traversal_in_ids_and_model_names_fails_cleanly(srv, tiny_model_dir):
    fid = httpx.post(
        srv.url + "/v1/files",
        headers=srv.h,
        files={"file": ("t.jsonl", jsonl(_rows()))},
        data={"purpose": "fine-tune"},
        timeout=60,
    ).json()["id"]
    jobs_before = _job_ids(srv)
    n = 0
    for bad in TRAVERSALS:
        for method, path in (
            ("GET", "/v1/files/{}"),
            ("GET", "/v1/files/{}/content"),
            ("DELETE", "/v1/files/{}"),
            ("GET", "/v1/files/{}/stats"),
            ("GET", "/v1/files/{}/preview"),
            ("GET", "/v1/fine_tuning/jobs/{}"),
            ("POST", "/v1/fine_tuning/jobs/{}/cancel"),
            ("GET", "/v1/fine_tuning/jobs/{}/events"),
            ("GET", "/v1/models/{}"),
            ("GET", "/v1/models/{}/export"),
            ("DELETE", "/v1/models/{}"),
            ("DELETE", "/v1/keys/{}"),
        ):
            r = httpx.request(method, srv.url + path.format(bad), headers=srv.h, timeout=60)
            assert r.status_code in (404, 405), (method, path, bad, r.status_code, r.text[:300])
            _envelope(r)
            assert b"root:" not in r.content
            n += 1
    home = str(srv.home)
    models = TRAVERSALS + [
        home,
        f"{home}/files/{fid}",
        f"{home}/runs",
        f"{home}/../{Path(home).name}/models",
        "/etc",
        "/proc/self",
        "~",
        "a\x00b",
        "x" * 5000,
        "x/" * 3000,
    ]
    chat = [{"role": "user", "content": "hi"}]
    for bad in models:
        for method, path, body in (
            ("POST", "/v1/chat/completions", {"model": bad, "messages": chat, "max_tokens": 2}),
            ("POST", "/v1/fine_tuning/jobs", {"model": bad, "training_file": fid}),
            ("POST", "/v1/fine_tuning/estimate", {"model": bad, "training_file": fid}),
            ("GET", f"/v1/files/{fid}/preview", None),
        ):
            params = {"model": bad} if body is None else None
            r = httpx.request(method, srv.url + path, json=body, params=params, headers=srv.h, timeout=600)
            assert r.status_code == 404, (path, bad[:60], r.status_code, r.text[:300])
            err = _envelope(r)
            assert (err["param"], err["code"]) == ("model", "model_not_found"), (path, bad[:60], err)
            n += 1
    assert _job_ids(srv) == jobs_before
    print(f"\n{n} traversal tries, all refused cleanly")


# ------------------------------------------------------------------ pickles


class _Trap:
    """A pickle that, if anything ever unpickled it, would create a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_pickle_weights_are_refused_and_never_unpickled(srv, tiny_model_dir, tmp_path):
    """Over HTTP a pickle folder is a path, so just an unknown model; the operator's
    `openft models add` refuses it naming the pickle. Nothing is ever unpickled."""
    fid = httpx.post(
        srv.url + "/v1/files",
        headers=srv.h,
        files={"file": ("t.jsonl", jsonl(_rows()))},
        data={"purpose": "fine-tune"},
        timeout=60,
    ).json()["id"]
    marker = tmp_path / "UNPICKLED"
    # A model folder whose weights are a pickle only.
    only_bin = tmp_path / "pickle-model"
    shutil.copytree(tiny_model_dir, only_bin)
    for f in only_bin.glob("*.safetensors"):
        f.unlink()
    (only_bin / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    # Safetensors base weights, but a PEFT adapter whose weights are a pickle only.
    bin_adapter = tmp_path / "pickle-adapter"
    shutil.copytree(tiny_model_dir, bin_adapter)
    (bin_adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (bin_adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "base_model_name_or_path": str(tiny_model_dir),
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
                "task_type": "CAUSAL_LM",
            }
        )
    )
    jobs_before = _job_ids(srv)
    for folder, pickle_name in ((only_bin, "pytorch_model.bin"), (bin_adapter, "adapter_model.bin")):
        for method, path, body, params in (
            ("POST", "/v1/fine_tuning/jobs", {"model": str(folder), "training_file": fid}, None),
            ("POST", "/v1/fine_tuning/estimate", {"model": str(folder), "training_file": fid}, None),
            ("GET", f"/v1/files/{fid}/stats", None, {"model": str(folder)}),
            ("GET", f"/v1/files/{fid}/preview", None, {"model": str(folder)}),
        ):
            r = httpx.request(method, srv.url + path, json=body, params=params, headers=srv.h, timeout=600)
            assert r.status_code == 404, (folder.name, path, r.status_code, r.text[:300])
            err = _envelope(r)
            assert (err["param"], err["code"]) == ("model", "model_not_found"), err
        added = subprocess.run(
            [sys.executable, "-m", "openft.cli", "models", "add", str(folder), "--name", folder.name],
            env={**os.environ, "OPENFT_HOME": str(srv.home)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert added.returncode == 1, added.stdout
        assert pickle_name in added.stderr and "pickle weights are never loaded" in added.stderr, added.stderr
        assert "Traceback" not in added.stderr
    registry = json.loads((srv.home / "registered_models.json").read_text())["models"]
    assert set(registry) == {TINY}
    assert _job_ids(srv) == jobs_before
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(_Trap(marker))) and marker.exists()  # the trap does work when unpickled


# ----------------------------------------------------------- absurd chat

CHAT = [{"role": "user", "content": "hi"}]
ABSURD = [
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": 1e9}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 7}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"n": 1000}, "n"),
    ({"n": 0}, "n"),
    ({"n": 2.5}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages.0.content",
    ),
    ({"messages": [{"role": "user", "content": "x" * MB}]}, "messages"),
    ({"stop": [f"s{i}" for i in range(100)]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": 5}, "stop"),
    ({"logit_bias": {"a": "b"}}, "logit_bias"),
    ({"logit_bias": {"50": 1000}}, "logit_bias"),
    ({"logit_bias": "garbage"}, "logit_bias"),
    ({"logit_bias": {"50": 5}}, "logit_bias"),
    ({"seed": 2**100}, "seed"),
    ({"seed": "x"}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream": True, "max_tokens": -1}, "max_tokens"),
    ({"model": 5}, "model"),
    ({"model": None}, "model"),
    ({"presence_penalty": 1e9}, "presence_penalty"),
    ({"frequency_penalty": -1e9}, "frequency_penalty"),
    ({"stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
    ({"user": 5}, "user"),
]


def test_absurd_chat_parameters_are_400s_naming_the_field(srv):
    n = 0
    for change, param in ABSURD:
        body = {"model": BUILTIN, "messages": CHAT, "max_tokens": 2, **change}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=srv.h, timeout=600)
        shown = {k: str(v)[:40] for k, v in change.items()}
        assert r.status_code == 400, (shown, r.status_code, r.text[:300])
        err = _envelope(r)
        assert err["type"] == "invalid_request_error" and err["message"], (shown, err)
        assert err["param"] == param or (err["param"] or "").startswith(param + "."), (shown, err)
        n += 1
    for change, param in (
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"seed": -(2**64)}, "seed"),
    ):
        body = {"model": BUILTIN, "prompt": "hi", "max_tokens": 2, **change}
        r = httpx.post(srv.url + "/v1/completions", json=body, headers=srv.h, timeout=600)
        assert r.status_code == 400 and _envelope(r)["param"] == param, (change.keys(), r.text[:300])
        n += 1
    # JSON that Python reads but is no number: NaN and Infinity.
    for raw in (b"NaN", b"Infinity", b"-Infinity"):
        content = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % (
            BUILTIN.encode(),
            raw,
        )
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            content=content,
            timeout=60,
            headers={**srv.h, "content-type": "application/json"},
        )
        assert r.status_code == 400 and _envelope(r)["param"] == "temperature", (raw, r.text[:300])
        n += 1
    print(f"\n{n} absurd requests refused with the field named")
    # Nothing is stuck: a normal request, and a normal stream, still get answers.
    r = httpx.post(
        srv.url + "/v1/chat/completions",
        headers=srv.h,
        timeout=300,
        json={"model": BUILTIN, "messages": CHAT, "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant" and r.json()["usage"]["completion_tokens"] <= 3
    with httpx.stream(
        "POST",
        srv.url + "/v1/chat/completions",
        headers=srv.h,
        timeout=300,
        json={"model": BUILTIN, "messages": CHAT, "max_tokens": 3, "stream": True},
    ) as s:
        assert s.status_code == 200
        lines = [x for x in s.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
