from __future__ import annotations

from prefect import task
from prefect.states import Failed

from indicf5.backends import get_backend
from indicf5.config import DType
from indicf5.stages import CONVERT
from indicf5.store import Manifest
from tasks.common import stage_cache_key, store


@task(name="convert_checkpoint", task_run_name="convert-{backend}-{dtype}", cache_key_fn=stage_cache_key(CONVERT), persist_result=True)
def convert_checkpoint(export: Manifest, backend: str, dtype: DType):
    """Runbook step 4: the export in the backend's own checkpoint format and dtype. A backend this
    machine cannot build fails its branch here with the remediation, and no traceback."""
    if (why := get_backend(backend).unavailable()) is not None:
        return Failed(message=why)
    return CONVERT.run(store(), export=export, backend=backend, dtype=dtype)
