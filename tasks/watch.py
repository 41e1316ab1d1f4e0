from __future__ import annotations

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment

from indicf5 import tracking
from indicf5.settings import Settings

ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
ENDED_BADLY = [StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]


def sha_tag(sha: str) -> str:
    return f"sha:{sha}"


@task(name="registered_build")
def registered_build(repo_id: str, sha: str) -> str | None:
    """The MLflow parent run of a build of this sha, if one is registered."""
    return tracking.find_build_of(Settings(), repo_id, sha)


def _runs(deployment: str, sha: str, states: list[StateType]) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[sha_tag(sha)]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states)),
            ),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment.split("/")[-1]])),
        )


@task(name="active_builds")
def active_builds(deployment: str, sha: str) -> list[str]:
    """Runs of the build deployment for this sha that are scheduled or running."""
    return [str(r.id) for r in _runs(deployment, sha, ACTIVE)]


@task(name="trigger_build")
def trigger_build(deployment: str, repo_id: str, sha: str, parameters: dict) -> str:
    """One run of the build deployment for exactly this sha. The idempotency key makes watchers that
    race on the same sha create one run; a new attempt after failed runs gets a new key."""
    attempt = len(_runs(deployment, sha, ENDED_BADLY))
    run = run_deployment(
        deployment,
        parameters={**parameters, "repo_id": repo_id, "revision": sha},
        timeout=0,
        tags=[sha_tag(sha), "watch-revisions"],
        idempotency_key=f"{repo_id}@{sha}#{attempt}",
    )
    get_run_logger().info("triggered %s for %s@%s: flow run %s", deployment, repo_id, sha, run.id)
    return str(run.id)
