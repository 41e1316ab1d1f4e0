"""The artifact store: whole-or-nothing artifacts, verification, concurrent builders."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from indicf5.store import ArtifactStore, atomic_write_bytes, sweep_stale


def make_files(out: Path, payload: bytes = b"weights", delay: float = 0.0) -> dict:
    (out / "engine.bin").write_bytes(payload)
    time.sleep(delay)
    (out / "sub").mkdir()
    (out / "sub" / "config.json").write_text("{}")
    return {"made": True}


def test_build_records_hashes_and_a_hit_verifies_them(tmp_path):
    store = ArtifactStore(tmp_path)
    m = store.build("build", {"x": 1}, make_files)
    assert set(m.outputs) == {"engine.bin", "sub/config.json"} and m.info == {"made": True}
    assert store.load("build", m.key) == m
    assert store.build("build", {"x": 1}, lambda out: pytest.fail("a valid artifact is not rebuilt")) == m
    assert store.key("build", {"x": 2}) != m.key


@pytest.mark.parametrize("damage", ["corrupt", "delete", "truncate manifest"])
def test_a_damaged_artifact_is_not_trusted(tmp_path, damage):
    store = ArtifactStore(tmp_path)
    m = store.build("build", {"x": 1}, make_files)
    if damage == "corrupt":
        m.file("engine.bin").write_bytes(b"weightz")  # same size, other content
    elif damage == "delete":
        m.file("sub/config.json").unlink()
    else:
        (Path(m.path) / "manifest.json").write_text('{"stage": "bu')
    assert store.load("build", m.key) is None
    rebuilt = store.build("build", {"x": 1}, make_files)
    assert store.load("build", rebuilt.key) is not None


def test_a_failing_build_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def explode(out: Path):
        (out / "half.bin").write_bytes(b"half")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        store.build("build", {"x": 1}, explode)
    assert list((tmp_path / "build").iterdir()) == []


def test_atomic_write_never_shows_a_partial_file(tmp_path):
    target = tmp_path / "out.wav"
    atomic_write_bytes(target, b"complete")
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]


def _concurrent_build(root: str, start_at: float, queue) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    m = ArtifactStore(root).build("build", {"x": 1}, lambda out: make_files(out, delay=0.3))
    queue.put(m.model_dump_json())


def test_two_builders_of_one_key_do_not_corrupt_each_other(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 2.0
    procs = [ctx.Process(target=_concurrent_build, args=(str(tmp_path), start_at, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = [queue.get(timeout=5) for _ in procs]
    store = ArtifactStore(tmp_path)
    key = store.key("build", {"x": 1})
    assert store.load("build", key) is not None
    assert all(key in r for r in results)
    assert [p.name for p in (tmp_path / "build").iterdir()] == [key]  # no leftovers


def _paused_build(root: str, x: int, started: str, go: str) -> None:
    """A stage that has written half its outputs, then waits for `go`."""

    def make(out: Path) -> dict:
        (out / "half.bin").write_bytes(b"half")
        Path(started).touch()
        while not Path(go).exists():
            time.sleep(0.05)
        return make_files(out)

    ArtifactStore(root).build("build", {"x": x}, make)


def test_temporary_dirs_of_gone_writers_are_swept_and_live_writers_kept(tmp_path):
    root, go = tmp_path / "store", tmp_path / "go"
    ctx = multiprocessing.get_context("spawn")
    killed, live = (
        ctx.Process(target=_paused_build, args=(str(root), x, str(tmp_path / f"started-{x}"), str(go))) for x in (1, 2)
    )
    for p in (killed, live):
        p.start()
    deadline = time.time() + 60
    while not all((tmp_path / f"started-{x}").exists() for x in (1, 2)):
        assert time.time() < deadline and killed.is_alive() and live.is_alive()
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.join()
    other_host = root / "build" / ".tmp-abc-1@another-host-x1y2"  # its writer cannot be checked from here
    unknown = root / "build" / ".tmp-made-by-something-else"
    for d in (other_host, unknown):
        d.mkdir()
    temps = {p.name: p for p in (root / "build").iterdir()}
    [of_killed] = [p for name, p in temps.items() if f"-{killed.pid}@" in name]
    [of_live] = [p for name, p in temps.items() if f"-{live.pid}@" in name]

    assert sweep_stale(root) == [of_killed]
    assert not of_killed.exists() and (of_live / "half.bin").is_file() and other_host.is_dir() and unknown.is_dir()
    go.touch()
    live.join(60)
    assert live.exitcode == 0
    store = ArtifactStore(root)
    assert store.load("build", store.key("build", {"x": 2})) is not None  # the live writer finished its artifact


@pytest.mark.parametrize("name", ["eager", "compiled", "trtllm"])
def test_a_backend_keys_its_artifacts_on_its_own_code(name):
    """Editing a backend's module must invalidate the engines it built (its source is in the key)."""
    import inspect

    from indicf5.backends import get_backend

    backend = get_backend(name)
    sources = {Path(m) if isinstance(m, Path) else Path(inspect.getfile(m)) for m in backend.modules}
    assert Path(inspect.getfile(type(backend))) in sources
    assert all(path.is_file() for path in sources)
    if name == "compiled":  # and on the kernels its engines run
        assert {"kernels/conv.py", "kernels/rope.py", "kernels/attention.py"} <= {
            f"{path.parent.name}/{path.name}" for path in sources
        }
