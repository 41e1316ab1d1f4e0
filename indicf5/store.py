"""Atomic writes and the content-addressed artifact store: an artifact is visible whole or not at all.

Everything is written under a temporary name in the destination's own directory (same
filesystem, so the final rename is atomic) and renamed into place only when complete. A killed
process leaves at most a ``.tmp-*`` entry that nothing reads; the name records its writer (PID and
host), so `sweep_stale` can remove it once that writer is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

from pydantic import BaseModel

log = logging.getLogger(__name__)


def writer() -> str:
    """This process, as temporary names (and build runs) record it: `<pid>@<host>` (host names hold no '@')."""
    return f"{os.getpid()}@{socket.gethostname()}"


def writer_gone(recorded: str) -> bool:
    """Whether the `<pid>@<host>` process `recorded` is a process of this host that has ended; a
    live one's, another host's (which cannot be checked from here) and malformed values are not."""
    pid, _, host = recorded.partition("@")
    return pid.isdigit() and host == socket.gethostname() and not _alive(int(pid))


def _temp_prefix(path: Path) -> str:
    return f".tmp-{path.name}-{writer()}-"


# .tmp-<name>-<pid>@<host>-<random>: the temporary directories and files, and publish_dir's .old-* swap
_WRITTEN_BY = re.compile(r"^\.(?:tmp|old)-.*-(?P<writer>\d+@[^@]+)-[a-z0-9_]+$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def temp_dir_beside(path: Path) -> Iterator[Path]:
    """A fresh temporary directory next to `path` (same filesystem), removed afterwards unless published."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the artifact is not
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, path: Path) -> None:
    """Rename the complete `tmp` to `path`; whatever stood there is swapped out, then removed."""
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-{writer()}-", dir=path.parent))
        try:
            os.replace(path, old / path.name)
        except FileNotFoundError:  # a concurrent publisher swapped it out first
            pass
        finally:
            shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes `path` when the block succeeds. An existing
    `path` is an error unless `replace` is set."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    with temp_dir_beside(path) as tmp:
        yield tmp
        publish_dir(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def sweep_stale(root: Path) -> list[Path]:
    """Removes the temporary entries under `root` (and one level down) whose writer, a process of
    this host, is gone; a live writer's, another host's and unrecognised names are left alone."""
    root, removed = Path(root), []
    for entry in [*root.glob(".tmp-*"), *root.glob("*/.tmp-*"), *root.glob(".old-*"), *root.glob("*/.old-*")]:
        written_by = _WRITTEN_BY.match(entry.name)
        if written_by is None or not writer_gone(written_by["writer"]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------
# content-addressed artifact store: <root>/<stage>/<key>/{..., manifest.json}


class FileRecord(BaseModel):
    sha256: str
    bytes: int


class Manifest(BaseModel):
    """What a stage made, from what, with which code: the record a later run checks before trusting."""

    stage: str
    key: str
    path: str  # the store's directory holding the outputs
    inputs: dict[str, Any]  # what the key was computed from
    outputs: dict[str, FileRecord]  # paths relative to `path`
    info: dict[str, Any] = {}  # stage-specific facts: config, metrics
    versions: dict[str, str] = {}
    seconds: float = 0.0  # time the stage took when it ran
    created: str = ""

    def file(self, name: str) -> Path:
        return Path(self.path) / name

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.outputs.values())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def record_files(root: Path, names: list[str] | None = None) -> dict[str, FileRecord]:
    names = (
        names
        if names is not None
        else sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    )
    return {n: FileRecord(sha256=sha256_file(root / n), bytes=(root / n).stat().st_size) for n in names}


def changed_files(root: Path, records: dict[str, FileRecord]) -> list[str]:
    """The recorded files under `root` that are missing or differ from their record."""
    return [
        name
        for name, rec in records.items()
        if not (f := root / name).is_file() or f.stat().st_size != rec.bytes or sha256_file(f) != rec.sha256
    ]


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_hash(*sources: ModuleType | Path) -> str:
    """The stage's code (modules, or source files that cannot be imported everywhere), as part of
    its key: editing it invalidates what it made."""
    return stable_hash([s.read_text() if isinstance(s, Path) else inspect.getsource(s) for s in sources])


MANIFEST = "manifest.json"


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, stage: str, inputs: dict[str, Any]) -> str:
        return stable_hash({"stage": stage, **inputs})[:32]

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> Manifest | None:
        """The stage's manifest if its every output is present with the recorded hash, else None."""
        path = self.dir(stage, key) / MANIFEST
        try:
            manifest = Manifest.model_validate_json(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if changed := changed_files(Path(manifest.path), manifest.outputs):
            log.warning("%s/%s: %s missing or changed; rebuilding", stage, key, ", ".join(changed))
            return None
        return manifest

    def build(
        self,
        stage: str,
        inputs: dict[str, Any],
        make: Callable[[Path], dict[str, Any]],
        versions: dict[str, str] | None = None,
    ) -> Manifest:
        """The verified artifact for (stage, inputs), made by `make(tmp_dir) -> info` if absent.

        `make` writes into a private temporary directory that is renamed into place whole, with its
        manifest, only when it returns; a concurrent builder of the same key loses nothing (the
        first complete artifact wins, and both return it)."""
        key = self.key(stage, inputs)
        if (done := self.load(stage, key)) is not None:
            return done
        final = self.dir(stage, key)
        start = time.perf_counter()
        with temp_dir_beside(final) as tmp:
            info = make(tmp) or {}
            manifest = Manifest(
                stage=stage,
                key=key,
                path=str(final),
                inputs=inputs,
                outputs=record_files(tmp),
                info=info,
                versions=versions or {},
                seconds=time.perf_counter() - start,
                created=datetime.now(timezone.utc).isoformat(),
            )
            (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            if (theirs := self.load(stage, key)) is not None:  # a concurrent build finished first
                return theirs
            try:
                publish_dir(tmp, final)
            except OSError:  # ... or is publishing right now
                if (theirs := self.load(stage, key)) is not None:
                    return theirs
                raise
        return manifest
