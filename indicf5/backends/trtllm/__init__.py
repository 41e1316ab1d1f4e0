"""The TensorRT-LLM backend, and IndicF5's DiT as a TensorRT-LLM model in TensorRT-LLM's own layout:

    backend.py   TrtllmBackend: convert, trtllm-build through the build API, load (the runbook's steps 3-6)
    layout.py    the naming table (reference name -> TensorRT-LLM name, shape) and config.json; no tensorrt_llm
    config.py    IndicF5DiTConfig, a PretrainedConfig
    model.py     IndicF5DiT, the flow step in TensorRT-LLM layers; `register()` adds it to MODEL_MAP
    convert.py   export -> TensorRT-LLM checkpoint (config.json + rank0.safetensors); no tensorrt_llm
    executor.py  the converted checkpoint run by torch with model.py's math (proof without TensorRT)
    runtime.py   a built engine as a FlowModel (text features in torch, each flow step on the engine)

Only config.py, model.py and runtime.py import tensorrt_llm, and only when they are imported.
"""

from indicf5.backends.trtllm.backend import TrtllmBackend

__all__ = ["TrtllmBackend"]
