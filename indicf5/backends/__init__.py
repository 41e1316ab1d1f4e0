"""Engine backends by name, and loading a built engine for synthesis."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from indicf5.backends.base import Backend, BackendUnavailable, EngineSpec, read_spec
from indicf5.backends.compiled import CompiledBackend
from indicf5.backends.eager import EagerBackend
from indicf5.checkpoint import EXPORT_VOCAB, EXPORT_VOCODER
from indicf5.errors import InputError

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (EagerBackend, CompiledBackend)}

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "EngineSpec", "get_backend", "load_engine", "read_spec"]


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise InputError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}") from None


def load_engine(engine_dir: str | Path, device: str = "cpu"):
    """(FlowModel, EngineSpec, vocab path, vocoder weights or None) of a built engine directory."""
    engine_dir = Path(engine_dir)
    try:
        spec = read_spec(engine_dir)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    backend = get_backend(spec.backend)
    backend.require()
    vocoder = engine_dir / EXPORT_VOCODER
    return (backend.load(engine_dir, spec, device), spec, engine_dir / EXPORT_VOCAB,
            load_file(str(vocoder)) if vocoder.is_file() else None)
