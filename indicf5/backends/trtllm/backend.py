"""The TensorRT-LLM backend: the runbook's steps 3-6 (register, convert, trtllm-build, run) as code.

    export ─trtllm.convert─> checkpoint (config.json, rank0.safetensors, text_embed.safetensors)
           ─TensorRT-LLM's build API (IndicF5DiT registered at run time)─> rank0.engine + config.json
           ─trtllm.runtime─> FlowModel

Build settings default to the runbook's: input padding kept (remove_input_padding off), no BERT
attention plugin; the engine's dtype is the build's. tensorrt_llm is imported only to build and
to run; without it this backend says how to install it and the build DAG fails only its branch.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path
from typing import Any

from indicf5 import checkpoint, model
from indicf5.backends import base
from indicf5.backends.base import Backend, EngineSpec
from indicf5.config import DType
from indicf5.backends.trtllm import convert as trtllm_convert
from indicf5.backends.trtllm.layout import CHECKPOINT_CONFIG, TEXT_WEIGHTS

TRTLLM_VERSION = "0.16.0"
INSTALL = (
    f"pip install 'indicf5-engines[trtllm]' --extra-index-url https://pypi.nvidia.com "
    f"(tensorrt_llm=={TRTLLM_VERSION}; Linux x86_64, CUDA 12, an NVIDIA GPU; see docs/trtllm.md)"
)
TRTLLM_SOURCES = tuple(sorted(Path(__file__).parent.glob("*.py")))


class TrtllmBackend(Backend):
    name = "trtllm"
    modules = (model, checkpoint, base, Path(__file__), *TRTLLM_SOURCES)
    engine_files = ("rank0.engine", "config.json", TEXT_WEIGHTS)

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("tensorrt_llm") is None:
            return f"the trtllm backend needs TensorRT-LLM, which is not installed: {INSTALL}"
        return None

    def default_flags(self) -> dict[str, Any]:
        return {
            "max_batch_size": 16,
            "max_seq_len": 4096,
            "opt_seq_len": 2048,
            "remove_input_padding": False,
            "bert_attention_plugin": None,
            "strongly_typed": True,
        }

    def convert(self, export_dir: Path, dtype: DType, out: Path) -> dict:
        return trtllm_convert.convert_checkpoint(export_dir, dtype, out)  # no tensorrt_llm needed

    def build(self, converted_dir: Path, spec: EngineSpec, out: Path) -> dict:
        """TensorRT-LLM's Python build API, as trtllm-build calls it."""
        import tensorrt_llm
        from tensorrt_llm.builder import BuildConfig, build
        from tensorrt_llm.plugin import PluginConfig

        from indicf5.backends.trtllm.config import IndicF5DiTConfig
        from indicf5.backends.trtllm.model import IndicF5DiT, register

        register()
        flags = spec.build_flags
        plugins = PluginConfig()
        plugins.remove_input_padding = flags["remove_input_padding"]
        plugins.bert_attention_plugin = flags["bert_attention_plugin"]
        build_config = BuildConfig(
            max_batch_size=flags["max_batch_size"],
            max_seq_len=flags["max_seq_len"],
            max_input_len=flags["max_seq_len"],
            strongly_typed=flags["strongly_typed"],
            plugin_config=plugins,
        )
        config = IndicF5DiTConfig.from_json_file(str(converted_dir / CHECKPOINT_CONFIG))
        network = IndicF5DiT.from_checkpoint(str(converted_dir), config=config)
        start = time.perf_counter()
        engine = build(network, build_config)
        engine.save(str(out))  # rank0.engine + config.json
        shutil.copyfile(converted_dir / TEXT_WEIGHTS, out / TEXT_WEIGHTS)
        return {"trtllm_build_seconds": time.perf_counter() - start, "tensorrt_llm": tensorrt_llm.__version__}

    def load(self, engine_dir: Path, spec: EngineSpec, device: str):
        from indicf5.backends.trtllm.runtime import TrtllmEngine

        if not device.startswith("cuda"):
            raise RuntimeError(f"a TensorRT-LLM engine runs on a CUDA device, not {device}")
        return TrtllmEngine(engine_dir, device)
