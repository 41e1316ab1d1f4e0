from __future__ import annotations

from prefect import task

from indicf5.hub import SourceRef
from indicf5.stages import DOWNLOAD
from indicf5.store import Manifest
from tasks.common import RETRIES, last_attempt_says_so, retry_if_transient, stage_cache_key, store


@task(
    name="download_snapshot",
    cache_key_fn=stage_cache_key(DOWNLOAD),
    persist_result=True,
    **RETRIES,
    retry_condition_fn=retry_if_transient,
)
def download_snapshot(source: SourceRef) -> Manifest:
    """The needed files at exactly the resolved sha, verified against the hub's hashes."""
    with last_attempt_says_so():
        return DOWNLOAD.run(store(), source=source)
