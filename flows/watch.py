"""The `watch-revisions` flow (scheduled hourly): rebuild when the watched HF branch moves.

    resolve branch -> sha ─┬─ registered in MLflow?         -> nothing to do
                           ├─ a build-engine run for it active? -> nothing to do
                           └─ else run_deployment(build-engine, revision=sha)   (idempotent per sha)

The build is always of the sha this run resolved, never of the branch name, so a branch that
moves again mid-build cannot change what is built. Hub errors retry, then fail this run with one
line ("hub unreachable: ..."); offline, the hourly schedule fails every hour until the hub is back.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.states import Completed, Failed
from pydantic import BaseModel

from indicf5.hub import DEFAULT_REPO, HubAccessError, TransientHubError
from tasks.resolve import resolve_revision
from tasks.watch import active_builds, registered_build, trigger_build

BUILD_DEPLOYMENT = "build-engine/build-engine"


class WatchResult(BaseModel):
    repo_id: str
    branch: str
    sha: str
    action: Literal["built", "building", "triggered"]
    detail: str  # the MLflow run, or the flow run(s)


@flow(name="watch-revisions", log_prints=True)
def watch_revisions_flow(
    repo_id: str = DEFAULT_REPO,
    branch: str = "main",
    build_deployment: str = BUILD_DEPLOYMENT,
    build_parameters: dict[str, Any] = {},
) -> WatchResult:
    """Trigger a build of the newest commit of a HuggingFace branch unless it is built or building.

    Args:
        repo_id: HuggingFace repo to watch.
        branch: Branch (or tag) to follow.
        build_deployment: The build deployment to trigger, as flow-name/deployment-name.
        build_parameters: Parameters for the build besides repo_id and revision (backends, dtypes, ...).
    """
    resolved = resolve_revision(repo_id, branch, return_state=True)
    if resolved.is_failed():  # after its retries: one line saying why, no traceback
        error = resolved.result(raise_on_failure=False)
        if isinstance(error, TransientHubError):
            return Failed(message=f"hub unreachable: {error}")
        if isinstance(error, HubAccessError):
            return Failed(message=str(error))
        raise error
    sha = resolved.result().sha
    if (run_id := registered_build(repo_id, sha)) is not None:
        result = WatchResult(repo_id=repo_id, branch=branch, sha=sha, action="built", detail=f"MLflow run {run_id}")
    elif active := active_builds(build_deployment, sha):
        result = WatchResult(repo_id=repo_id, branch=branch, sha=sha, action="building", detail=", ".join(active))
    else:
        flow_run = trigger_build(build_deployment, repo_id, sha, build_parameters)
        result = WatchResult(repo_id=repo_id, branch=branch, sha=sha, action="triggered", detail=flow_run)
    print(f"{repo_id}@{branch} = {sha}: {result.action} ({result.detail})")
    return Completed(message=f"{sha[:12]}: {result.action} ({result.detail})", data=result)
