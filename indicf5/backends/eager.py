"""The eager backend: the reference DiT with its weights cast to the engine's dtype.

It is the baseline every faster engine is compared with, and the engine the build DAG can always
make, on any machine torch runs on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from indicf5 import checkpoint, model
from indicf5.backends import base
from indicf5.backends.base import Backend, EngineSpec
from indicf5.checkpoint import load_export
from indicf5.config import TORCH_DTYPES, DType
from indicf5.model import DiT

WEIGHTS = "model.safetensors"


class EagerBackend(Backend):
    name = "eager"
    modules = (model, checkpoint, base, Path(__file__))
    engine_files = (WEIGHTS,)

    def convert(self, export_dir: Path, dtype: DType, out: Path) -> dict:
        ckpt = load_export(export_dir)
        cast = {k: v.to(TORCH_DTYPES[dtype]).contiguous() for k, v in ckpt.transformer.items()}
        save_file(cast, str(out / WEIGHTS))
        (out / "model_config.json").write_text(ckpt.config.model_dump_json(indent=2))
        return {"tensors": len(cast)}

    def build(self, converted_dir: Path, spec: EngineSpec, out: Path) -> dict:
        shutil.copyfile(converted_dir / WEIGHTS, out / WEIGHTS)  # eager runs the weights as they are
        return {}

    def load(self, engine_dir: Path, spec: EngineSpec, device: str) -> DiT:
        dit = DiT(spec.model)
        dit.load_state_dict(load_file(str(engine_dir / WEIGHTS)))
        return dit.to(device=device, dtype=TORCH_DTYPES[spec.dtype]).eval().requires_grad_(False)
