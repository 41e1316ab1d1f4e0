"""Where a build's weights come from: a HuggingFace repo at a commit, or a local snapshot/file.

Hub calls go through huggingface_hub (its cache, its HF_TOKEN/HF_ENDPOINT handling); this module
only maps its errors to what the user should do, and tells transient failures (timeouts,
connection errors, 5xx: worth a retry) from deterministic ones (gated, missing: fail at once).
The token is never passed around here: huggingface_hub reads it from the environment.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Literal

import httpx2
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from pydantic import BaseModel

from indicf5.checkpoint import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE
from indicf5.errors import InputError
from indicf5.store import sha256_file, stable_hash

DEFAULT_REPO = "ai4bharat/IndicF5"
REQUIRED = (WEIGHTS_FILE, VOCAB_FILE)
WANTED = (*REQUIRED, CONFIG_FILE)


class HubAccessError(InputError):
    """The hub refused or lacks what was asked for: retrying will not help; the message says what will."""


class TransientHubError(Exception):
    """A timeout, a dropped connection, a 5xx, a corrupt transfer: worth retrying with backoff. The
    message states what happened; whoever retries says so (the last attempt's message is final)."""


class FileRef(BaseModel):
    size: int | None = None
    sha256: str | None = None  # LFS files (the weights)
    blob_id: str | None = None  # git blob sha1 (small files)


class SourceRef(BaseModel):
    """An immutable reference to the weights a build uses."""

    kind: Literal["hub", "local"]
    repo_id: str  # the hub repo, or the local path
    revision: str  # as asked (a branch, tag or sha; "local" for local sources)
    sha: str  # the commit sha, or the content hash of local files
    files: dict[str, FileRef]


def classify(e: BaseException, where: str, repo_id: str, revision: str) -> BaseException | None:
    """huggingface_hub's exception -> ours (HubAccessError: fix something; TransientHubError: retry)."""
    if isinstance(e, GatedRepoError):
        return HubAccessError(
            f"{repo_id} is gated: accept its terms on its HuggingFace page with your account, "
            "then set HF_TOKEN to a token of that account"
        )
    if isinstance(e, RevisionNotFoundError):
        return HubAccessError(
            f"revision {revision!r} not found in {repo_id}: give an existing branch, tag or commit sha"
        )
    if isinstance(e, RepositoryNotFoundError):
        return HubAccessError(
            f"{repo_id} not found, or private: check the repo id; for a private or gated repo set "
            "HF_TOKEN to a token that can read it"
        )
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return HubAccessError(
                f"access to {where} refused ({status}): set HF_TOKEN to a token that can read it, "
                "and accept the model's terms on its page"
            )
        if status is None or status >= 500 or status in (408, 429):
            return TransientHubError(f"hub error for {where} ({status})")
        return HubAccessError(f"hub refused {where} ({status}): {str(e).splitlines()[0]}")
    if isinstance(e, httpx2.TransportError):
        return TransientHubError(
            f"cannot reach the hub for {where} ({type(e).__name__}): check the network and HF_ENDPOINT"
        )
    if isinstance(e, LocalEntryNotFoundError):  # snapshot_download wraps what stopped it
        cause = e.__cause__ or e.__context__
        return classify(cause, where, repo_id, revision) if cause else TransientHubError(f"download of {where} failed")
    return None


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str):
    try:
        yield
    except Exception as e:
        mapped = classify(e, f"{repo_id}@{revision}", repo_id, revision)
        if mapped is None:
            raise
        raise mapped from None


def resolve_revision(repo_id: str = DEFAULT_REPO, revision: str = "main") -> SourceRef:
    """The commit sha `revision` points at now, and the hub's sizes/hashes of the files we need."""
    with hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    missing = [f for f in REQUIRED if f not in siblings]
    if missing:
        raise HubAccessError(f"{repo_id}@{info.sha[:12]} lacks {', '.join(missing)}: not an IndicF5 repository")
    files = {
        name: FileRef(size=s.size, sha256=s.lfs.sha256 if s.lfs else None, blob_id=s.blob_id)
        for name, s in siblings.items()
        if name in WANTED
    }
    return SourceRef(kind="hub", repo_id=repo_id, revision=revision, sha=info.sha, files=files)


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    h.update(path.read_bytes())
    return h.hexdigest()


def file_matches(path: Path, ref: FileRef) -> bool:
    if not path.is_file() or (ref.size is not None and path.stat().st_size != ref.size):
        return False
    if ref.sha256:
        return sha256_file(path) == ref.sha256
    return ref.blob_id is None or _git_blob_sha1(path) == ref.blob_id


def download_snapshot(ref: SourceRef) -> Path:
    """The needed files at exactly ref.sha, through huggingface_hub's cache, checked against the
    hub's sizes and hashes. A corrupt file is removed from the cache and reported as transient."""
    with hub_errors(ref.repo_id, ref.sha):
        path = Path(snapshot_download(ref.repo_id, revision=ref.sha, allow_patterns=sorted(ref.files)))
    bad = [name for name, f in ref.files.items() if not file_matches(path / name, f)]
    if bad:
        for name in bad:
            (path / name).resolve().unlink(missing_ok=True)
        raise TransientHubError(
            f"downloaded {', '.join(bad)} of {ref.repo_id}@{ref.sha[:12]} do not match the hub's hashes; removed"
        )
    return path


def local_source(path: str | Path) -> SourceRef:
    """A local snapshot directory (or its model.safetensors), identified by the hashes of its files."""
    path = Path(path).resolve()
    if path.is_file() and path.name == WEIGHTS_FILE:
        path = path.parent
    if not path.is_dir():
        raise InputError(
            f"checkpoint not found: {path} (give a snapshot directory holding {WEIGHTS_FILE} and {VOCAB_FILE})"
        )
    names = [n for n in WANTED if (path / n).is_file()]
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: not an IndicF5 snapshot")
    files = {n: FileRef(size=(path / n).stat().st_size, sha256=sha256_file(path / n)) for n in names}
    return SourceRef(
        kind="local",
        repo_id=str(path),
        revision="local",
        sha=stable_hash({n: f.sha256 for n, f in files.items()})[:40],
        files=files,
    )
