from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/upstream.py, tests/hub_server.py

from indicf5.cli import quiet_settings  # noqa: E402 (imports nothing of Prefect's)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUIET = quiet_settings()

# huggingface_hub and Prefect read these when first imported: set them before any test imports them.
# The hub is a local server (tests/hub_server.py); Prefect runs its ephemeral API on a private database.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="indicf5-tests-"))
HUB_PORT = _free_port()
os.environ.update(
    {
        "HF_ENDPOINT": f"http://127.0.0.1:{HUB_PORT}",
        "HF_HUB_CACHE": str(_SESSION_TMP / "hf-cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        **QUIET,
    }
)
os.environ.pop("HF_TOKEN", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

from indicf5.checkpoint import load_checkpoint  # noqa: E402
from indicf5.synthetic import make_synthetic  # noqa: E402


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory) -> Path:
    """A synthetic IndicF5 snapshot at the default (small) sizes; treat it as read-only."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "IndicF5")


@pytest.fixture(scope="session")
def checkpoint(snapshot):
    return load_checkpoint(snapshot)


@pytest.fixture(scope="session")
def hub(snapshot):
    """The local hub on HF_ENDPOINT, holding ai4bharat/IndicF5 = the synthetic snapshot at `main`."""
    from hub_server import Hub, Repo, snapshot_files

    with Hub(port=HUB_PORT) as server:
        repo = Repo()
        repo.add_commit(snapshot_files(snapshot))
        server.repos["ai4bharat/IndicF5"] = repo
        yield server


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fresh workspace (artifact store, MLflow sqlite) for one test."""
    monkeypatch.setenv("INDICF5_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(
        "MLFLOW_TRACKING_URI", raising=False
    )  # mlflow.set_tracking_uri exports it; undone after the test
    return tmp_path / "home"


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API for the session (Prefect's own test harness), stopped cleanly."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
