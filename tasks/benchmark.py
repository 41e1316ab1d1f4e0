from __future__ import annotations

from prefect import task

from indicf5.benchmark import BenchmarkConfig
from indicf5.environment import EnvironmentReport
from indicf5.stages import BENCHMARK
from indicf5.store import Manifest
from tasks.common import heartbeat, stage_cache_key, store
from tasks.names import engine_run_name
from tasks.progress import stage_progress


@task(
    name="benchmark",
    task_run_name=engine_run_name("benchmark"),
    cache_key_fn=stage_cache_key(BENCHMARK),
    persist_result=True,
)
def benchmark(engine: Manifest, config: BenchmarkConfig, environment: EnvironmentReport) -> Manifest:
    """Runbook step 6, timed: step, loop, vocoder and end-to-end latencies (p50/p95), RTF, peak memory;
    a sample and plots."""
    what = f"benchmark of {engine.info['spec']['backend']}-{engine.info['spec']['dtype']}"
    with heartbeat(what), stage_progress(what):
        return BENCHMARK.run(store(), engine=engine, config=config, environment=environment)
