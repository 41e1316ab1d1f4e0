from __future__ import annotations

from prefect import task

from indicf5.parity import ParityConfig
from indicf5.stages import VERIFY
from indicf5.store import Manifest
from tasks.common import heartbeat, stage_cache_key, store
from tasks.names import engine_run_name
from tasks.progress import stage_progress


@task(
    name="verify_parity",
    task_run_name=engine_run_name("verify"),
    cache_key_fn=stage_cache_key(VERIFY),
    persist_result=True,
)
def verify_parity(engine: Manifest, export: Manifest, config: ParityConfig, device: str) -> Manifest:
    """Runbook step 6, checked: the engine against the fp32 reference; fails the branch above the
    dtype's threshold or on NaN/Inf."""
    what = f"parity of {engine.info['spec']['backend']}-{engine.info['spec']['dtype']}"
    with heartbeat(what), stage_progress(what):
        return VERIFY.run(store(), engine=engine, export=export, config=config, device=device)
