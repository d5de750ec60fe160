"""A throwaway PostgreSQL cluster for tests and benchmarks: Debian's `postgresql`
binaries, initdb and pg_ctl run as an unprivileged user (`postgres` when we are
root: initdb refuses root), in a temporary folder, on a free loopback port.

    with PgCluster() as pg:
        url = pg.create_database("t1")   # postgresql://openft@127.0.0.1:PORT/t1
        pg.restart()                     # as an operator would, while clients hold connections
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def bindir() -> Path | None:
    """Where initdb and pg_ctl are (Debian keeps them off PATH), or None."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def unavailable() -> str | None:
    """Why no cluster can be made here (None: one can)."""
    if bindir() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self, listen: tuple[str, ...] = ("127.0.0.1",), user: str = "openft"):
        why = unavailable()
        if why:
            raise RuntimeError(why)
        self.bin = bindir()
        self.listen, self.user = listen, user
        self.host = listen[0]
        self.port = free_port(self.host)
        self.root = Path(tempfile.mkdtemp(prefix="openft-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.runas = "postgres" if os.geteuid() == 0 else None
        if self.runas:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, self.runas)

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.bin / cmd[0]), *cmd[1:]]
        if self.runas:
            argv = ["runuser", "-u", self.runas, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=check, cwd=self.root)

    def init(self) -> PgCluster:
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8", "--locale=C", "--no-sync"
        )
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(
                f"listen_addresses = '{','.join(self.listen)}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\nmax_connections = 200\n"
            )
        with open(self.data / "pg_hba.conf", "a") as fh:  # the veth subnets of the multi-host tests
            fh.write("host all all 0.0.0.0/0 trust\n")
        return self

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        """Stop (`fast`: clients are disconnected; `immediate`: as a crash) and start again."""
        self.stop(mode)
        self.start()

    def url(self, database: str = "postgres", host: str | None = None) -> str:
        return f"postgresql://{self.user}@{host or self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        self.init().start()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
