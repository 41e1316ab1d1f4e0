from __future__ import annotations

from prefect import task

from indicf5.config import DType
from indicf5.stages import CONVERT
from indicf5.store import Manifest
from tasks.common import stage_cache_key, store


@task(
    name="convert_checkpoint",
    task_run_name="convert-{backend}-{dtype}",
    cache_key_fn=stage_cache_key(CONVERT),
    persist_result=True,
)
def convert_checkpoint(export: Manifest, backend: str, dtype: DType) -> Manifest:
    """Runbook step 4: the export in the backend's own checkpoint format and dtype (the flow runs it
    only for a backend this machine can build)."""
    return CONVERT.run(store(), export=export, backend=backend, dtype=dtype)
