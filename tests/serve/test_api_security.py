"""What a web page in the user's browser can do to a server on loopback (DNS
rebinding, cross-site requests), keys end to end (creation pairs the id with its
own secret, a revoked key is refused), the loopback-only rule of local mode, and
a SIGTERM that must not restart the worker. Integration tier: real `openft serve`
processes, raw HTTP from httpx and sockets, and the official `openai` client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from openft.jobs.store import Store

from .conftest import Server, jsonl, wait_for

pytestmark = pytest.mark.integration

ATTACKER = "attacker.example:8000"
ALLOWED = "myhost.lan"


def _home(tmp_path_factory, session_home, name: str) -> Path:
    home = tmp_path_factory.mktemp(name)
    (home / "models").symlink_to(Path(session_home) / "models", target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def local(tmp_path_factory, session_home):
    """A server in local mode (no keys), told one extra name of its own."""
    s = Server(_home(tmp_path_factory, session_home, "security-local"), "--allowed-host", ALLOWED).start()
    yield s
    s.stop()


def _own(s: Server) -> str:
    return f"127.0.0.1:{s.port}"


def _refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert "access-control-allow-origin" not in r.headers


def test_a_rebound_name_is_refused(local):
    """A page at http://attacker.example:8000 whose name now resolves to 127.0.0.1:
    its requests reach the server from loopback, naming the attacker's host."""
    for path in ("/v1/models", "/v1/files", "/v1/fine_tuning/jobs", "/", "/health"):
        r = httpx.get(local.url + path, headers={"Host": ATTACKER, "Origin": f"http://{ATTACKER}"})
        _refused(r, 421, "host_not_allowed")
        assert "--allowed-host attacker.example" in r.json()["error"]["message"]
    r = httpx.post(local.url + "/v1/keys", headers={"Host": ATTACKER, "Origin": f"http://{ATTACKER}"})
    _refused(r, 421, "host_not_allowed")
    assert httpx.get(local.url + "/v1/keys").json()["data"] == []


def test_the_servers_own_names_are_accepted(local):
    for host in (_own(local), f"localhost:{local.port}", f"[::1]:{local.port}", "127.0.0.1", f"{ALLOWED}:{local.port}"):
        r = httpx.get(local.url + "/v1/models", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)
    for host in (f"{ALLOWED}.attacker.example", f"192.0.2.77:{local.port}", "", "a@127.0.0.1"):
        r = httpx.get(local.url + "/v1/models", headers={"Host": host})
        assert r.status_code in (400, 421), (host, r.text)
        assert r.json()["error"]["param"] == "Host"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": f"http://{ATTACKER}"},
        {"Origin": "null"},  # a sandboxed frame, a file:// page
        {"Referer": f"http://{ATTACKER}/page.html"},  # a browser that sent no Origin
    ],
    ids=["origin", "null-origin", "referer"],
)
def test_a_cross_site_post_creates_no_key(local, headers):
    """A body-less POST needs no CORS preflight: any page could send it, and the
    first key ends local mode (locking the console out)."""
    r = httpx.post(local.url + "/v1/keys", headers=headers)
    _refused(r, 403, "cross_origin_request")
    listed = httpx.get(local.url + "/v1/keys")
    assert listed.status_code == 200 and listed.json()["data"] == []  # still local mode, no key


def test_other_state_changing_cross_site_requests_are_refused(local):
    other_port = f"http://127.0.0.1:{local.port + 1}"  # another local web server is another site too
    upload = {"files": {"file": ("x.jsonl", jsonl([{"text": "hi"}]))}, "data": {"purpose": "fine-tune"}}
    for origin in (f"http://{ATTACKER}", other_port):
        _refused(httpx.post(local.url + "/v1/files", headers={"Origin": origin}, **upload), 403, "cross_origin_request")
        _refused(httpx.delete(local.url + "/v1/files/file-x", headers={"Origin": origin}), 403, "cross_origin_request")
    assert httpx.get(local.url + "/v1/files").json()["data"] == []


def test_same_origin_requests_work(local):
    """The console: fetches from its own page, which the browser marks with its origin."""
    page = f"http://{_own(local)}"
    upload = {"files": {"file": ("x.jsonl", jsonl([{"text": "hi"}]))}, "data": {"purpose": "fine-tune"}}
    r = httpx.post(local.url + "/v1/files", headers={"Origin": page, "Referer": page + "/#/datasets"}, **upload)
    assert r.status_code == 200, r.text
    r = httpx.delete(local.url + f"/v1/files/{r.json()['id']}", headers={"Origin": page})
    assert r.status_code == 200 and r.json()["deleted"], r.text
    r = httpx.post(local.url + "/v1/files", headers={"Referer": page + "/"}, **upload)  # Referer alone
    assert r.status_code == 200, r.text
    r = httpx.post(
        local.url + "/v1/files",
        headers={"Host": f"{ALLOWED}:{local.port}", "Origin": f"http://{ALLOWED}:{local.port}"},
        **upload,
    )
    assert r.status_code == 200, r.text


def test_no_answer_carries_cors_headers(local):
    page = f"http://{ATTACKER}"
    preflight = {
        "Origin": page,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    answers = [
        httpx.options(local.url + "/v1/keys", headers=preflight),
        httpx.options(local.url + "/v1/chat/completions", headers=preflight),
        httpx.get(
            local.url + "/v1/models", headers={"Origin": page}
        ),  # a GET is answered, but not readable by the page
        httpx.get(local.url + "/", headers={"Origin": page}),
        httpx.post(local.url + "/v1/keys", headers={"Origin": page}),
    ]
    for r in answers:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], (r.request.method, r.headers)
    assert answers[2].status_code == 200


def test_the_openai_client_and_curl_style_requests_still_work(local):
    c = local.client()
    assert any(m.id for m in c.models.list())
    f = c.files.create(file=("c.jsonl", jsonl([{"text": "hello"}])), purpose="fine-tune")
    assert c.files.retrieve(f.id).id == f.id and c.files.delete(f.id).deleted
    assert httpx.get(local.url + "/v1/models").status_code == 200  # no Origin, no Referer


def test_a_bad_allowed_host_is_refused_at_start(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "openft.cli", "serve", "--allowed-host", "http://myhost.lan:8000"],
        env={**os.environ, "OPENFT_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "--allowed-host 'http://myhost.lan:8000'" in out.stderr, out.stderr


# ---------------------------------------------------------------------- keys
def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_pair_with_their_ids_and_a_revoked_key_is_refused(tmp_path_factory, session_home):
    s = Server(_home(tmp_path_factory, session_home, "security-keys")).start()
    try:
        page = f"http://{_own(s)}"
        first = httpx.post(s.url + "/v1/keys", headers={"Origin": page})  # the console's "create key"
        assert first.status_code == 200, first.text
        k1 = first.json()
        assert httpx.get(s.url + "/v1/models").status_code == 401  # local mode has ended
        assert httpx.get(s.url + "/v1/models", headers=_bearer(k1["key"])).status_code == 200
        # The Host check holds with a key too: a rebound page could have learnt one.
        bad_host = {**_bearer(k1["key"]), "Host": ATTACKER}
        _refused(httpx.get(s.url + "/v1/models", headers=bad_host), 421, "host_not_allowed")

        with ThreadPoolExecutor(8) as pool:  # created at once: each answer's id is its own secret's
            made = [
                r.json()
                for r in pool.map(lambda _: httpx.post(s.url + "/v1/keys", headers=_bearer(k1["key"])), range(8))
            ]
        assert len({k["id"] for k in made}) == 8
        for k in made:
            r = httpx.delete(s.url + f"/v1/keys/{k['id']}", headers=_bearer(k["key"]))  # revoke itself, by its id
            assert r.status_code == 200 and r.json()["deleted"], r.text
            assert httpx.get(s.url + "/v1/models", headers=_bearer(k["key"])).status_code == 401

        k2 = httpx.post(s.url + "/v1/keys", headers=_bearer(k1["key"])).json()
        assert httpx.delete(s.url + f"/v1/keys/{k1['id']}", headers=_bearer(k2["key"])).status_code == 200
        r = httpx.get(s.url + "/v1/models", headers=_bearer(k1["key"]))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # revoked: refused
        assert s.client(k2["key"]).models.list().data  # another key still works
        assert [k["id"] for k in httpx.get(s.url + "/v1/keys", headers=_bearer(k2["key"])).json()["data"]] == [k2["id"]]
    finally:
        s.stop()


# --------------------------------------------------------------- local_only
def _non_loopback_address() -> str | None:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return next((a for a in out if "." in a and not a.startswith("127.")), None)


def test_local_mode_answers_only_loopback_peers(tmp_path_factory, session_home):
    """Listening on every interface needs a key at start; once the last key is
    revoked the server is in local mode again, and a caller on the network (a
    real non-loopback peer: this machine's own network address) gets 403."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address ('hostname -I' lists none) to call from")
    home = _home(tmp_path_factory, session_home, "security-lan")
    ops = Store(home / "openft.db").create_key("ops")
    s = Server(home, "--host", "0.0.0.0").start()
    try:
        lan = f"http://{address}:{s.port}"
        assert httpx.get(lan + "/v1/models", headers=_bearer(ops.key)).status_code == 200
        assert httpx.delete(lan + f"/v1/keys/{ops.id}", headers=_bearer(ops.key)).status_code == 200
        r = httpx.get(lan + "/v1/models")
        _refused(r, 403, "local_only")
        assert httpx.get(s.url + "/v1/models").status_code == 200  # loopback: local mode
    finally:
        s.stop()


# ------------------------------------------------------------------ SIGTERM
def _workers_of(server_pid: int) -> list[int]:
    """Live `openft worker` processes started by that server (by their command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile
            continue
        if b"worker" in argv and b"--parent-pid" in argv and str(server_pid).encode() in argv and state != "Z":
            found.append(int(entry.name))
    return found


def test_sigterm_stops_the_worker_and_restarts_nothing(tmp_path_factory, session_home):
    """A SIGTERM to the whole process group (a terminal, systemd) reaches the worker
    too, which exits at once, while uvicorn still waits for an open request before
    the app's shutdown runs. The supervisor must not restart it meanwhile."""
    s = Server(_home(tmp_path_factory, session_home, "security-sigterm")).start()
    log = s.home / f"server-{s.port}.log"
    worker = s.health()["worker_pid"]
    assert worker and _workers_of(s.proc.pid) == [worker]
    with socket.create_connection(("127.0.0.1", s.port)) as conn:
        # A request in flight: the server has begun reading its body (it sent 100 Continue)
        conn.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {_own(s)}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert conn.recv(100).startswith(b"HTTP/1.1 100")
        os.kill(s.proc.pid, signal.SIGTERM)
        os.kill(worker, signal.SIGTERM)
        wait_for(lambda: "worker exited with" in log.read_text(), timeout=60, every=0.2)
    assert s.proc.wait(60) is not None
    text = log.read_text()
    assert "restarting" not in text, text[-2000:]
    assert "the server is stopping" in text
    assert _workers_of(s.proc.pid) == []


def test_the_worker_beside_the_api_yields_the_cpu_to_it(tmp_path_factory, session_home):
    """The supervised worker (and so its training) runs at a lower CPU priority than
    the server, whose requests come first; a worker restarted later does too."""
    from openft.serve.app import WORKER_NICE

    s = Server(_home(tmp_path_factory, session_home, "security-nice")).start()
    try:
        worker = s.health()["worker_pid"]
        server_nice = os.getpriority(os.PRIO_PROCESS, s.proc.pid)
        assert os.getpriority(os.PRIO_PROCESS, worker) == min(19, server_nice + WORKER_NICE)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: s.health()["worker_pid"] not in (None, worker), timeout=60, every=0.2)
        again = s.health()["worker_pid"]
        assert os.getpriority(os.PRIO_PROCESS, again) == min(19, server_nice + WORKER_NICE)
    finally:
        s.stop()


def test_restart_delays_grow_are_capped_and_reset():
    from openft.serve.app import RestartPolicy

    p = RestartPolicy(first_s=1, cap_s=60, healthy_s=60)
    assert p.delay([]) == 0
    assert p.delay([3600]) == 0  # a worker that ran a long while is restarted at once
    crashes = [p.delay([0.5] * n) for n in range(1, 10)]
    assert crashes == [1, 2, 4, 8, 16, 32, 60, 60, 60]  # doubling, then capped
    assert p.delay([0.5] * 5 + [120] + [0.5]) == 1  # a healthy run resets the count
    assert p.delay([0.5] * 5 + [120]) == 0
    assert p.delay([0.5] * 10_000) == 60  # no overflow however long the history
