from __future__ import annotations

import re
from pathlib import Path

from prefect import task

from indicf5 import hub
from indicf5.stages import SYNTHETIC
from indicf5.store import stable_hash
from tasks.common import RETRIES, last_attempt_says_so, retry_if_transient, store


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
    with last_attempt_says_so():
        return hub.resolve_revision(repo_id, revision)


@task(name="prepare_synthetic")
def prepare_synthetic() -> str:
    """The embedded synthetic snapshot in the workspace's store: made once, and again when damaged."""
    return SYNTHETIC.run(store()).path
