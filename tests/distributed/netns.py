"""Two machines on one box: two network namespaces joined by a veth pair (issue 17).

Each namespace is one "host" with its own interface, address and loopback, and each command
in it also gets its own UTS namespace named after the host, so the two hostnames differ as
on two machines. Both hosts' /etc/hosts (bind-mounted by `ip netns exec`) resolve both
names: torchrun's c10d rendezvous picks the node that hosts its store by matching the
endpoint to the addresses of the hostname, and tells the workers the master by hostname.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_runs = itertools.count()


@dataclass(frozen=True)
class Host:
    name: str  # the namespace
    ip: str
    ifname: str  # its end of the veth
    # What popen started here: teardown kills these too, as one may not have entered
    # the namespace yet (`ip netns exec` still starting) when the namespace's pids are listed.
    procs: list = field(default_factory=list, compare=False, repr=False)

    def argv(self, argv: Sequence[str]) -> list[str]:
        # exec all the way down: the command keeps the pid (and process group) of what popen starts
        sethost = 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"'
        return ["ip", "netns", "exec", self.name, "unshare", "--uts", "sh", "-c", sethost, self.name, *argv]

    def env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        # gloo (and tensorpipe) bind to the interface the hostname resolves to unless told; name the veth.
        base = os.environ if env is None else env
        return {**base, "GLOO_SOCKET_IFNAME": self.ifname, "TP_SOCKET_IFNAME": self.ifname}

    def popen(self, argv: Sequence[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        """`argv` inside this namespace, with GLOO_SOCKET_IFNAME/TP_SOCKET_IFNAME set to `ifname`."""
        proc = subprocess.Popen(self.argv(argv), env=self.env(env), **kw)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60, **kw):
        kw.setdefault("capture_output", True)
        return subprocess.run(self.argv(argv), env=self.env(env), timeout=timeout, text=True, **kw)

    def free_port(self) -> int:
        # The namespace is fresh and private: a port free now stays free for the test.
        code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
        return int(self.run([sys.executable, "-c", code], check=True).stdout)


@dataclass(frozen=True)
class Hosts:
    a: Host
    b: Host

    def __iter__(self) -> Iterator[Host]:
        return iter((self.a, self.b))


def _ip(*args: str) -> None:
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        pytest.skip(f"two hosts need iproute2: {e}")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"the machine refuses `ip {' '.join(args)}`: {e.stderr.strip()}")


def _quiet_ip(*args: str) -> str:
    """Teardown's `ip`: what is already gone (or was never made) is no error."""
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30).stdout
    except FileNotFoundError:
        return ""


def _teardown(hosts: Hosts) -> None:
    for h in hosts:
        for proc in h.procs:  # the pid is kept down the exec chain (see Host.argv)
            if proc.poll() is None:
                proc.kill()
        # `ip netns del` only drops the name: the namespace lives while a process holds it.
        for pid in _quiet_ip("netns", "pids", h.name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _quiet_ip("netns", "del", h.name)
        _quiet_ip("link", "del", h.ifname)  # still in the root namespace if setup failed part way
        shutil.rmtree(f"/etc/netns/{h.name}", ignore_errors=True)


def _hosts_file(h: Host, hosts: Hosts) -> None:
    etc = Path("/etc/netns") / h.name
    try:
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{o.ip} {o.name}\n" for o in hosts))
    except OSError as e:
        pytest.skip(f"the machine refuses a per-namespace /etc/hosts in {etc}: {e}")


def check_reach(src: Host, dst: Host, timeout: float = 30) -> None:
    """A TCP connect from `src` to a listener on `dst.ip` inside `dst` (python: ping may be absent)."""
    listen = "import socket; s = socket.create_server((%r, 0)); print(s.getsockname()[1], flush=True); s.accept()"
    server = dst.popen([sys.executable, "-c", listen % dst.ip], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # the listener is up once it prints its port ('' if it died)
        assert line.strip().isdigit(), f"no listener in {dst.name} on {dst.ip}: exit {server.poll()}"
        port = int(line)
        connect = f"import socket; socket.create_connection(({dst.ip!r}, {port}), timeout={timeout})"
        r = src.run([sys.executable, "-c", connect], timeout=timeout)
        assert r.returncode == 0, f"{src.name} cannot reach {dst.name} at {dst.ip}:{port}: {r.stderr[-2000:]}"
        server.wait(timeout)
    finally:
        server.kill()
        server.wait()


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Two namespaces `oft-<pid>-<n>-a/b` on 10.201.x.1/24 and .2/24, removed on exit (also on failure).
    Skips when the machine refuses to make them. The subnet lives only inside the pair, so x
    need not be unique across the box; it varies only to tell runs apart in `ip` listings."""
    pid, n = os.getpid(), next(_runs)
    x = (pid + n) % 254 + 1
    hosts = Hosts(*(Host(f"oft-{pid}-{n}-{s}", f"10.201.{x}.{i}", f"ov{pid}-{n}{s}") for i, s in ((1, "a"), (2, "b"))))
    try:
        for h in hosts:
            _ip("netns", "add", h.name)
        _ip("link", "add", hosts.a.ifname, "type", "veth", "peer", "name", hosts.b.ifname)
        for h in hosts:
            _ip("link", "set", h.ifname, "netns", h.name)
            _ip("-n", h.name, "addr", "add", f"{h.ip}/24", "dev", h.ifname)
            _ip("-n", h.name, "link", "set", "lo", "up")
            _ip("-n", h.name, "link", "set", h.ifname, "up")
            _hosts_file(h, hosts)
            probe = subprocess.run(h.argv(["true"]), capture_output=True, text=True, timeout=30)
            if probe.returncode != 0:  # no unshare(1), or no UTS namespaces
                pytest.skip(f"the machine refuses a hostname per host: {probe.stderr.strip()}")
        check_reach(hosts.b, hosts.a)
        yield hosts
    finally:
        _teardown(hosts)


@pytest.fixture
def netns_hosts() -> Iterator[Hosts]:
    with two_hosts() as hosts:
        yield hosts


def run_on_both(
    hosts: Hosts,
    argv_for: Callable[[int, Host], Sequence[str]],
    env: dict[str, str] | None = None,
    timeout: float = 300,
    grace: float = 30,
) -> list[subprocess.CompletedProcess]:
    """`argv_for(i, host)` in each host at once; both results once both exit. When one exits
    non-zero the other gets `grace` seconds (a peer waiting on a dead rendezvous would wait out
    its own, much longer, timeout) and is then killed. Past `timeout` both are killed: TimeoutError."""
    outs = [(tempfile.TemporaryFile(), tempfile.TemporaryFile()) for _ in hosts]  # files: no pipe fills and blocks
    argvs = [list(argv_for(i, h)) for i, h in enumerate(hosts)]
    procs = [h.popen(a, env, stdout=o, stderr=e, start_new_session=True) for h, a, (o, e) in zip(hosts, argvs, outs)]
    exited: queue.Queue[int] = queue.Queue()
    for i, p in enumerate(procs):
        threading.Thread(target=lambda i=i, p=p: (p.wait(), exited.put(i)), daemon=True).start()
    deadline, pending, failed = time.monotonic() + timeout, set(range(len(procs))), False
    while pending:
        try:
            i = exited.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        pending.discard(i)
        if procs[i].returncode != 0 and not failed:
            failed, deadline = True, min(deadline, time.monotonic() + grace)
    for p in procs:  # the whole group: torchrun's workers too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def read(f) -> str:
        with f:
            f.seek(0)
            return f.read().decode(errors="replace")

    results = [
        subprocess.CompletedProcess(a, p.returncode, read(o), read(e)) for a, p, (o, e) in zip(argvs, procs, outs)
    ]
    if pending and not failed:
        tails = "\n".join(f"--- {h.name} ---\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}" for h, r in zip(hosts, results))
        raise TimeoutError(f"still running after {timeout}s, killed:\n{tails}")
    return results


@dataclass(frozen=True)
class Linked:
    """One "other machine" joined to this one: `host` in its namespace, `root_ip` this
    machine's end of their veth (where a server of the root namespace listens for it)."""

    host: Host
    root_ip: str
    root_ifname: str


@contextlib.contextmanager
def linked_host() -> Iterator[Linked]:
    """A namespace `oft-<pid>-<n>-m` on 10.202.x.2/24 with a veth to this machine's
    10.202.x.1, removed on exit. Skips when the machine refuses to make it."""
    pid, n = os.getpid(), next(_runs)
    x = (pid + n) % 254 + 1
    host = Host(f"oft-{pid}-{n}-m", f"10.202.{x}.2", f"ov{pid}-{n}m")
    root_if, root_ip = f"ov{pid}-{n}r", f"10.202.{x}.1"
    try:
        _ip("netns", "add", host.name)
        _ip("link", "add", root_if, "type", "veth", "peer", "name", host.ifname)
        _ip("link", "set", host.ifname, "netns", host.name)
        _ip("addr", "add", f"{root_ip}/24", "dev", root_if)
        _ip("link", "set", root_if, "up")
        _ip("-n", host.name, "addr", "add", f"{host.ip}/24", "dev", host.ifname)
        _ip("-n", host.name, "link", "set", "lo", "up")
        _ip("-n", host.name, "link", "set", host.ifname, "up")
        probe = subprocess.run(host.argv(["true"]), capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"the machine refuses a hostname per host: {probe.stderr.strip()}")
        yield Linked(host, root_ip, root_if)
    finally:
        _teardown(Hosts(host, host))
        _quiet_ip("link", "del", root_if)
