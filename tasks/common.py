"""What the tasks share: the store, content cache keys, and which failures deserve a retry."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator

from prefect import get_run_logger, task
from prefect.context import TaskRunContext
from prefect.results import get_result_store
from prefect.tasks import exponential_backoff

from indicf5.hub import TransientHubError
from indicf5.settings import Settings
from indicf5.stages import Stage
from indicf5.store import ArtifactStore, stable_hash, sweep_stale

RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)


HEARTBEAT_SECONDS = 30.0


@contextlib.contextmanager
def heartbeat(what: str, every_s: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """While a long stage runs, a log line at a steady cadence (visible in the run's page in the UI)."""
    logger = get_run_logger()
    start, done = time.monotonic(), threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            logger.info("%s: still running after %.0f s", what, time.monotonic() - start)

    thread = threading.Thread(target=beat, name=f"heartbeat-{what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        logger.info("%s: done in %.1f s", what, time.monotonic() - start)


def store() -> ArtifactStore:
    return ArtifactStore(Settings().store_root)


def store_scope() -> str:
    return str(Settings().store_root)


@task(name="sweep_stale_writes")
def sweep_stale_writes() -> None:
    """Temporary directories of stages whose process is gone (a killed build) are removed."""
    for entry in sweep_stale(store().root):
        get_run_logger().info("removed %s, left by a build that was stopped", entry)


def retry_if_transient(task, task_run, state) -> bool:
    """Timeouts, dropped connections, 5xx and corrupt transfers retry; everything else fails at once."""
    return isinstance(state.result(raise_on_failure=False), TransientHubError)


@contextlib.contextmanager
def last_attempt_says_so() -> Iterator[None]:
    """A transient hub failure on the task's last attempt is final: its message says how many were made."""
    try:
        yield
    except TransientHubError as e:
        context = TaskRunContext.get()
        if context is None or context.task_run.run_count <= context.task.retries:
            raise
        raise TransientHubError(f"{e}; gave up after {context.task_run.run_count} attempts") from e


def content_cache_key(
    name: str,
    content_key: Callable[[dict[str, Any]], str],
    present: Callable[[dict[str, Any]], bool],
    scope: Callable[[], str] = store_scope,
) -> Callable[[TaskRunContext, dict[str, Any]], str | None]:
    """Prefect's cache key for a stage: where its result lives (`scope`: the store's root) and its
    content key (input hashes, settings, code). Prefect's cache records are shared by every
    workspace that shares its home, so the scope keeps one workspace's hit from being another's.
    A cache hit must also find what the stage made still present and intact there: when it is not,
    and Prefect holds a record for the key, no key is given, so the task runs and makes it again."""

    def key(_ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
        cache_key = f"{name}-{stable_hash(scope())[:16]}-{content_key(params)}"
        if not present(params) and get_result_store().exists(cache_key):
            return None
        return cache_key

    return key


def stage_cache_key(stage: Stage) -> Callable[[TaskRunContext, dict[str, Any]], str | None]:
    return content_cache_key(
        stage.name,
        lambda params: stage.key(store(), **params),
        lambda params: stage.cached(store(), **params) is not None,
    )
