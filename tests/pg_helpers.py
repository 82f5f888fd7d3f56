"""A real PostgreSQL server for the tests and benchmarks: a fresh cluster (``initdb``) in a temporary folder, started
on 127.0.0.1 and a free port, stopped and deleted at the end. PostgreSQL refuses to run as root: as root, its
programs run as the ``postgres`` user (``runuser``) on a folder that user owns. Logins need the password (scram),
so URLs carry one, as real deployments' do.
"""
from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "clad"


def find_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: ``pg_config --bindir``, Debian's /usr/lib/postgresql/*/bin (the
    newest), or the PATH."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(re.sub(r"\D", "", p) or 0),
                         reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for c in candidates:
        if (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``start()`` a cluster, ``create_database(name)`` for a URL, ``stop()``."""

    def __init__(self, bindir: Path, fsync: bool = False):
        self.bindir, self.fsync = bindir, fsync  # fsync off for tests; on where commit rates are measured
        self.password = secrets.token_hex(12)
        self.root = Path(tempfile.mkdtemp(prefix="clad-pg-"))  # in /tmp: a folder the postgres user can reach
        self.data, self.sockets, self.log = self.root / "data", self.root / "sockets", self.root / "server.log"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.port: int | None = None
        self.started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({out.returncode}): {out.stderr or out.stdout}\n{log}")
        return out

    def start(self) -> "PostgresServer":
        self.sockets.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(self.root, "postgres")
            for p in (self.sockets, pwfile):
                shutil.chown(p, "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                  "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale")
        pwfile.unlink()
        for _ in range(5):  # another process may take the free port between the probe and the start
            self.port = free_port()
            options = f"-h 127.0.0.1 -p {self.port} -k {self.sockets} -c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                          "-w", "-t", "60", "start")
                self.started = True
                return self
            except RuntimeError:
                if "could not bind" not in (self.log.read_text() if self.log.is_file() else ""):
                    raise
        raise RuntimeError(f"PostgreSQL found no free port:\n{self.log.read_text()[-2000:]}")

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        return f"postgresql+psycopg://{USER}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database ``name`` (lower case letters, digits and _); returns its URL."""
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}")
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            if self.started:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
