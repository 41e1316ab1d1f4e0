"""`indicf5 serve` as a child process, waited on until it is ready (load tests, server tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts `indicf5 serve --engine ENGINE ARGS...` on a free loopback port; `stop()` ends it.
    Its output goes to `log`."""

    def __init__(
        self, engine: str | Path, log: Path, *args: str, env: dict[str, str] | None = None, ready_timeout_s: float = 600
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        cmd = [sys.executable, "-m", "indicf5.cli", "serve", "--engine", str(engine), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the server was not ready within {timeout_s:g} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        died = self.proc.poll() is not None
        self.stop()
        if exc[0] is not None and died:  # the failure was probably the server's: say what it said
            sys.stderr.write(
                f"the server had exited ({self.proc.returncode}); the end of its log:\n{self.log.read_text()[-6000:]}\n"
            )
