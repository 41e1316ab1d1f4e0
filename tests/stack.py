"""The real thing on loopback, for tests: `prefect server`, `mlflow server` (sqlite + an artifact
root), the work pool, `prefect deploy --all` from prefect.yaml, and a process worker; each quiet
(indicf5/quiet.env) and stopped at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from conftest import QUIET, _free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    prefect_url: str
    mlflow_url: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def prefect_api(self) -> str:
        return f"{self.prefect_url}/api"

    def start(
        self,
        name: str,
        args: list[str],
        ready_url: str | None = None,
        timeout_s: float = 180,
        env: dict[str, str] | None = None,
    ) -> None:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(args, env=env or self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        deadline = time.monotonic() + timeout_s
        while ready_url and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{(self.root / f'{name}.log').read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        if ready_url:
            raise TimeoutError(f"{name} not ready:\n{(self.root / f'{name}.log').read_text()[-3000:]}")

    def cli(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [str(BIN / "prefect"), *args], env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_stack(root: Path, extra_env: dict[str, str]) -> Stack:
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {
        **os.environ,
        **QUIET,
        **extra_env,
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "INDICF5_HOME": str(root / "home"),
        "INDICF5_REPO": str(REPO),
    }
    stack = Stack(root, env, f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}")
    try:
        # as `make prefect-server` starts it: the UI told where its API is (the port is not Prefect's default)
        server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        server_env["PREFECT_UI_API_URL"] = stack.prefect_api
        stack.start(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            f"{stack.prefect_api}/health",
            env=server_env,
        )
        stack.start(
            "mlflow-server",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "mlartifacts"),
                "--workers",
                "1",
            ],
            f"{stack.mlflow_url}/health",
        )
        stack.cli("work-pool", "create", "gpu-builders", "--type", "process", "--overwrite")
        # deployed from a shell without INDICF5_REPO: the worker, which has it, reads it when a run starts
        stack.cli("--no-prompt", "deploy", "--all", env={k: v for k, v in env.items() if k != "INDICF5_REPO"})
        stack.start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "gpu-builders", "--limit", "3"])
    except BaseException:
        stack.stop()
        raise
    return stack
