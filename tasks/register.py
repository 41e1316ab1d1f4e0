from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from indicf5 import tracking
from indicf5.environment import EnvironmentReport
from indicf5.hub import SourceRef
from indicf5.settings import Settings
from indicf5.store import Manifest
from indicf5.summary import BuildSummary
from indicf5.tracking import BranchRecord
from tasks.common import content_cache_key


def _build_key(params) -> str:
    return tracking.build_key(params["source"], params["download"], params["export"], params["branches"])


# cached while MLflow still holds the build's parent run
@task(name="register", persist_result=True,
      cache_key_fn=content_cache_key("register", _build_key, lambda p: tracking.find_build(Settings(), _build_key(p)) is not None))
def register(source: SourceRef, environment: EnvironmentReport, download: Manifest, export: Manifest,
             branches: list[BranchRecord], failures: dict[str, str], nfe: int) -> str:
    """An MLflow parent run for the build and a nested run per engine that passed parity."""
    return tracking.register_build(Settings(), source, environment, download, export, branches, failures, nfe)


@task(name="publish_summary")
def publish_summary(summary: BuildSummary) -> None:
    """The build's summary as a Prefect markdown artifact, with the MLflow run id."""
    create_markdown_artifact(summary.markdown(), key="build-summary",
                             description=f"IndicF5 build of {summary.source.repo_id}@{summary.source.sha[:12]}")
