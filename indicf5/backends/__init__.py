"""Engine backends by name, and loading a built engine for synthesis."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from indicf5.backends.base import Backend, BackendUnavailable, EngineSpec, read_spec, write_shared_files
from indicf5.backends.compiled import CompiledBackend
from indicf5.backends.eager import EagerBackend
from indicf5.backends.trtllm import TrtllmBackend
from indicf5.checkpoint import EXPORT_VOCAB, EXPORT_VOCODER, export_transformer, load_export
from indicf5.config import DType
from indicf5.errors import InputError

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (EagerBackend, CompiledBackend, TrtllmBackend)}

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailable",
    "EngineSpec",
    "build_engine",
    "engine_from_checkpoint",
    "get_backend",
    "load_engine",
    "read_spec",
]


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise InputError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}") from None


def build_engine(
    export_dir: Path,
    converted_dir: Path,
    backend: str,
    dtype: DType,
    out: Path,
    device: str,
    flags: dict | None = None,
    versions: dict[str, str] | None = None,
) -> tuple[EngineSpec, dict]:
    """A converted checkpoint -> a complete engine directory in `out`: (its spec, the build's facts)."""
    impl = get_backend(backend)
    impl.require()
    spec = EngineSpec(
        backend=backend,
        dtype=dtype,
        model=load_export(export_dir).config,
        build_flags={**impl.default_flags(), **(flags or {}), "device": device},
        versions=versions or {},
    )
    info = impl.build(converted_dir, spec, out)
    write_shared_files(export_dir, spec, out)
    return spec, info


def engine_from_checkpoint(
    checkpoint: Path,
    workdir: Path,
    backend: str = "eager",
    dtype: DType = "fp32",
    device: str = "cpu",
    flags: dict | None = None,
) -> Path:
    """checkpoint -> export -> convert -> build in `workdir`, without the store or Prefect (for
    benchmarks and tests; builds go through flows/build.py): the engine directory."""
    export, converted, engine = (Path(workdir) / d for d in ("export", "converted", "engine"))
    for d in (export, converted, engine):
        d.mkdir(parents=True)
    export_transformer(checkpoint, export)
    get_backend(backend).convert(export, dtype, converted)
    build_engine(export, converted, backend, dtype, engine, device, flags)
    return engine


def load_engine(engine_dir: str | Path, device: str = "cpu", backend_name: str | None = None):
    """(FlowModel, EngineSpec, vocab path, vocoder weights or None) of a built engine directory,
    run by its own backend or by `backend_name` (which must be able to run the engine's files)."""
    engine_dir = Path(engine_dir)
    try:
        spec = read_spec(engine_dir)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    if backend_name is not None and backend_name != spec.backend:
        spec = spec.model_copy(update={"backend": backend_name, "build_flags": {}})
    backend = get_backend(spec.backend)
    backend.require()
    missing = [name for name in backend.engine_files if not (engine_dir / name).is_file()]
    if missing:
        raise InputError(
            f"{engine_dir} cannot run on the {spec.backend} backend: it lacks {', '.join(missing)}; "
            f"build an engine for {spec.backend} (indicf5 build --backend {spec.backend})"
        )
    vocoder = engine_dir / EXPORT_VOCODER
    return (
        backend.load(engine_dir, spec, device),
        spec,
        engine_dir / EXPORT_VOCAB,
        load_file(str(vocoder)) if vocoder.is_file() else None,
    )
