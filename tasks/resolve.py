from __future__ import annotations

import re
from pathlib import Path

from prefect import task

from indicf5 import hub
from indicf5.settings import Settings
from indicf5.store import stable_hash
from indicf5.synthetic import make_synthetic
from tasks.common import RETRIES, retry_if_transient


SHA = re.compile(r"^[0-9a-f]{40}$")


def _key(_ctx, params) -> str | None:
    """A commit sha, or local files unchanged since they were hashed (same sizes and mtimes), resolve
    to what they resolved to before; a branch or tag must be asked of the hub every time."""
    if params.get("checkpoint"):
        path = Path(params["checkpoint"]).resolve()
        if not path.exists():
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return "resolve-local-" + stable_hash([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    revision = params.get("revision", "")
    return f"resolve-{params['repo_id']}@{revision}" if SHA.match(revision) else None


@task(name="resolve_revision", cache_key_fn=_key, persist_result=True, **RETRIES, retry_condition_fn=retry_if_transient)
def resolve_revision(repo_id: str, revision: str, checkpoint: str | None = None) -> hub.SourceRef:
    """The immutable source of this build: the commit sha `revision` points at now on the hub, or
    the content hash of a local snapshot."""
    if checkpoint:
        return hub.local_source(checkpoint)
    return hub.resolve_revision(repo_id, revision)


@task(name="prepare_synthetic")
def prepare_synthetic() -> str:
    """The embedded synthetic snapshot in the workspace, made once."""
    path = Settings().synthetic_snapshot
    if not path.exists():
        make_synthetic(path)
    return str(path)
