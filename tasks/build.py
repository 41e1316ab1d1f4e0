from __future__ import annotations

from typing import Any

from prefect import task

from indicf5.config import DType
from indicf5.environment import EnvironmentReport
from indicf5.stages import BUILD
from indicf5.store import Manifest
from tasks.common import heartbeat, stage_cache_key, store


@task(
    name="build_engine",
    task_run_name="build-{backend}-{dtype}",
    cache_key_fn=stage_cache_key(BUILD),
    persist_result=True,
)
def build_engine(
    convert: Manifest,
    export: Manifest,
    backend: str,
    dtype: DType,
    flags: dict[str, Any],
    environment: EnvironmentReport,
) -> Manifest:
    """Runbook step 5 (and step 3 for trtllm): the engine directory (engine.json, vocab, vocoder, the
    backend's files), written whole or not at all, for this machine's device."""
    with heartbeat(f"build {backend}-{dtype}"):
        return BUILD.run(
            store(), convert=convert, export=export, backend=backend, dtype=dtype, flags=flags, environment=environment
        )
