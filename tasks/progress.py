"""What a long stage is at, shown on its flow run's `build-progress` artifact (as its description)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from prefect.artifacts import update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.runtime import flow_run

from indicf5 import progress

PROGRESS_KEY = "build-progress"
EVERY_S = 2.0  # at most one update of the artifact this often


def _progress_artifact():
    with get_client(sync_client=True) as client:
        wanted = ArtifactFilter(
            key=ArtifactFilterKey(any_=[PROGRESS_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])
        )
        found = client.read_artifacts(artifact_filter=wanted)
    return found[0] if found else None


@contextlib.contextmanager
def stage_progress(stage: str) -> Iterator[None]:
    """While the block runs, what `indicf5.progress` reports becomes "<stage>: <what>" on the artifact."""
    artifact = _progress_artifact() if flow_run.id else None
    if artifact is None:  # a task run outside a build
        yield
        return
    last = 0.0

    def show(what: str) -> None:
        nonlocal last
        if time.monotonic() - last >= EVERY_S:
            last = time.monotonic()
            update_progress_artifact(artifact.id, artifact.data, description=f"{stage}: {what}")

    with progress.listening(show):
        yield
