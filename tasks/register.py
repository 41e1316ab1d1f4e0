from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from indicf5 import tracking
from indicf5.environment import EnvironmentReport
from indicf5.hub import SourceRef
from indicf5.settings import Settings
from indicf5.store import Manifest
from indicf5.summary import BuildSummary
from indicf5.tracking import BranchRecord
from tasks.common import content_cache_key


@task(name="start_build_run")
def start_build_run(started: float) -> str:
    """The build's MLflow run, open from the flow's start (`started`, epoch seconds), linked to this
    Prefect flow run. Runs left open by killed builds are closed first."""
    for run_id in tracking.close_abandoned_builds(Settings()):
        get_run_logger().info("closed MLflow run %s as KILLED: its build was stopped", run_id)
    return tracking.start_build(Settings(), started, flow_run.id, flow_run.ui_url)


def _build_key(params) -> str:
    return tracking.build_key(params["source"], params["download"], params["export"], params["branches"])


# cached while MLflow still holds the build's run
@task(
    name="register",
    persist_result=True,
    cache_key_fn=content_cache_key(
        "register", _build_key, lambda p: tracking.find_build(Settings(), _build_key(p)) is not None
    ),
)
def register(
    mlflow_run: str,
    source: SourceRef,
    environment: EnvironmentReport,
    download: Manifest,
    export: Manifest,
    branches: list[BranchRecord],
    failures: dict[str, str],
    nfe: int,
) -> str:
    """The build's facts on its MLflow run, a nested run and a model version per engine that passed parity."""
    return tracking.register_build(
        Settings(), mlflow_run, source, environment, download, export, branches, failures, nfe
    )


@task(name="end_build_run")
def end_build_run(mlflow_run: str, registered: str | None, error: str | None) -> None:
    """The build's MLflow run ends with the flow: FINISHED, or FAILED with the reason."""
    tracking.end_build(Settings(), mlflow_run, registered, error)


@task(name="publish_summary")
def publish_summary(summary: BuildSummary) -> None:
    """The build's summary as a Prefect markdown artifact, with the MLflow run (a link on a server)."""
    create_markdown_artifact(
        summary.markdown(),
        key="build-summary",
        description=f"IndicF5 build of {summary.source.repo_id}@{summary.source.sha[:12]}",
    )
