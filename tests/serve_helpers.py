"""A real ``clad serve`` process for the tests and the load benchmark: started on a free port of 127.0.0.1, its
stderr collected, stopped with SIGTERM (or killed)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"


class Server:
    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 120.0):
        env = dict(os.environ, **(env or {}))
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "clad.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self._wait_for_port(timeout)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def _wait_for_port(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                m = re.search(r"listening on (http://\S+?)/ ", line)
                if m:
                    return m.group(1)
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(f"clad serve exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"clad serve did not start in {timeout:.0f} s:\n{self.log}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/api/v1/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"clad serve exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.1)
        raise RuntimeError(f"clad serve not ready in {timeout:.0f} s:\n{self.log}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._reader.join(5)
