"""Task run names that name their branch, for stages whose parameters hold the engine, not its name."""

from __future__ import annotations

from typing import Callable

from prefect.runtime import task_run


def engine_run_name(stage: str) -> Callable[[], str]:
    """`stage-backend-dtype` of the task run's `engine` parameter (an engine manifest)."""

    def name() -> str:
        spec = task_run.parameters["engine"].info["spec"]
        return f"{stage}-{spec['backend']}-{spec['dtype']}"

    return name
