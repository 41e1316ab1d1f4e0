from __future__ import annotations

from prefect import task

from indicf5.stages import EXPORT
from indicf5.store import Manifest
from tasks.common import stage_cache_key, store


@task(name="export_transformer", cache_key_fn=stage_cache_key(EXPORT), persist_result=True)
def export_transformer(download: Manifest) -> Manifest:
    """Runbook step 1: indicf5_transformer.pt (+ safetensors twin, vocab, vocoder)."""
    return EXPORT.run(store(), download=download)
