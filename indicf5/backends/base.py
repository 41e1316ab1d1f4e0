"""What every engine backend provides, and the engine directory they all share.

    export dir ──convert(dtype)──> backend checkpoint ──build──> engine dir ──load──> FlowModel

An engine directory is self-contained: ``engine.json`` (an EngineSpec), ``vocab.txt``,
``vocoder.safetensors`` (when the checkpoint bundles one) and the backend's own files. A loaded
engine is a FlowModel (sampler.py): ``embed_text`` + one flow step, so the sampler, synthesis,
the parity gate and the benchmark drive every backend the same way.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from pydantic import BaseModel

from indicf5.checkpoint import EXPORT_VOCAB, EXPORT_VOCODER
from indicf5.config import DType, ModelConfig
from indicf5.sampler import FlowModel

ENGINE_SPEC = "engine.json"


class EngineSpec(BaseModel):
    backend: str
    dtype: DType
    model: ModelConfig
    build_flags: dict[str, Any] = {}
    versions: dict[str, str] = {}


class BackendUnavailable(Exception):
    """This backend cannot build or run on this machine; the message says how to make it able to."""


class Backend(ABC):
    name: ClassVar[str]
    modules: ClassVar[
        tuple[ModuleType | Path, ...]
    ]  # the code that shapes its artifacts, its own file too (cache keys)
    engine_files: ClassVar[tuple[str, ...]]  # what `load` reads from an engine directory

    def unavailable(self) -> str | None:
        """None when the backend can build here, else the remediation."""
        return None

    def require(self) -> None:
        if (why := self.unavailable()) is not None:
            raise BackendUnavailable(why)

    def default_flags(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def convert(self, export_dir: Path, dtype: DType, out: Path) -> dict[str, Any]:
        """Export -> the backend's checkpoint in `out`; returns facts for the manifest."""

    @abstractmethod
    def build(self, converted_dir: Path, spec: EngineSpec, out: Path) -> dict[str, Any]:
        """Backend checkpoint -> engine files in `out` (engine.json and the shared files are added for it)."""

    @abstractmethod
    def load(self, engine_dir: Path, spec: EngineSpec, device: str) -> FlowModel:
        """A runnable FlowModel from a built engine."""


def write_shared_files(export_dir: Path, spec: EngineSpec, out: Path) -> None:
    for name in (EXPORT_VOCAB, EXPORT_VOCODER):
        if (export_dir / name).is_file():
            shutil.copyfile(export_dir / name, out / name)
    (out / ENGINE_SPEC).write_text(spec.model_dump_json(indent=2))


def read_spec(engine_dir: Path) -> EngineSpec:
    try:
        return EngineSpec.model_validate_json((Path(engine_dir) / ENGINE_SPEC).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{engine_dir} is not an engine directory: it has no {ENGINE_SPEC}") from None
