from __future__ import annotations

from prefect import task

from indicf5 import stages
from indicf5.hub import SourceRef
from indicf5.store import Manifest
from tasks.common import RETRIES, content_cache_key, retry_if_transient, store


def _content_key(params) -> str:
    return store().key("download", stages.download_inputs(params["source"]))


@task(name="download_snapshot", cache_key_fn=content_cache_key("download", _content_key, lambda p: stages.cached_download(store(), p["source"]) is not None), persist_result=True, **RETRIES, retry_condition_fn=retry_if_transient)
def download_snapshot(source: SourceRef) -> Manifest:
    """The needed files at exactly the resolved sha, verified against the hub's hashes."""
    return stages.download(store(), source)
