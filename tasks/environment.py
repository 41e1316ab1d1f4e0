from __future__ import annotations

from prefect import task

from indicf5.environment import EnvironmentReport
from indicf5.environment import check_environment as check
from indicf5.store import stable_hash


def _fingerprint(_ctx, _params) -> str:
    """The check itself is cheap: a run on an unchanged machine shows as Cached."""
    return "environment-" + stable_hash(check().model_dump())


@task(name="check_environment", cache_key_fn=_fingerprint, persist_result=True)
def check_environment() -> EnvironmentReport:
    """Runbook step 2: versions, the accelerator, and which backends can build here."""
    return check()
