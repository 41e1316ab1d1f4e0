"""One writer at a time of a workspace's MLflow records.

MLflow's sqlite store creates its schema on first use, and a build looks for its parent run before
creating it: two builds that start together on a new workspace would both migrate the schema (one
fails) and both create the run. Whoever finds or creates the records holds this lock. It is an OS
file lock, released when its holder exits however it exits, so a killed build leaves none held.
"""

from __future__ import annotations

from filelock import FileLock

from indicf5.settings import Settings


def tracking_lock(settings: Settings) -> FileLock:
    """The workspace's lock (a context manager) over its MLflow records."""
    settings.store_root.mkdir(parents=True, exist_ok=True)
    return FileLock(settings.store_root / "mlflow.lock")
