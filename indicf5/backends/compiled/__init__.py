"""The compiled backend: torch.compile'd flow steps, CUDA graphs per serving shape, our Triton kernels.

engine.py    EngineFlags (the build flags), CompiledEngine (buckets, batch sizes, graphs), CompiledBackend
modules.py   the reference's layers as the engine runs them, and the padding they are told of
fp8.py       e4m3 weights and per-token activation scales for precision fp8
kernels/     Triton: attention by row lengths (TMA tiles), rotary positions in place, the position convolutions
"""

from indicf5.backends.compiled.engine import (
    BUCKETS,
    COMPILE_CACHE,
    CompiledBackend,
    CompiledEngine,
    EngineFlags,
    warm_up,
)
from indicf5.backends.compiled.modules import Padding, TritonConvPositionEmbedding, bucket_for

__all__ = [
    "BUCKETS",
    "COMPILE_CACHE",
    "CompiledBackend",
    "CompiledEngine",
    "EngineFlags",
    "Padding",
    "TritonConvPositionEmbedding",
    "bucket_for",
    "warm_up",
]
