"""The runbook's export (``indicf5_transformer.pt`` or its safetensors twin) -> a TensorRT-LLM
checkpoint directory, without tensorrt_llm:

    config.json           layout.checkpoint_config (architecture IndicF5DiT, dtype, sizes)
    rank0.safetensors     every tensor of layout.weight_table, in the checkpoint's dtype
    text_embed.safetensors  the text embedding (run in torch by the runtime)

Every tensor is checked against the table before anything is written (the build stage writes
the directory whole or not at all).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from indicf5.checkpoint import load_export
from indicf5.config import TORCH_DTYPES, DType, ModelConfig
from indicf5.errors import InputError
from indicf5.model import rope_inv_freq
from indicf5.backends.trtllm.layout import (
    CHECKPOINT_CONFIG,
    CHECKPOINT_WEIGHTS,
    TEXT_WEIGHTS,
    checkpoint_config,
    is_text_weight,
    weight_table,
)


def trtllm_weights(state: dict[str, torch.Tensor], config: ModelConfig, dtype: DType) -> dict[str, torch.Tensor]:
    """The reference state dict renamed, fused and reshaped per the naming table."""
    torch_dtype = TORCH_DTYPES[dtype]
    out = {}
    for w in weight_table(config):
        missing = [s for s in w.sources if s not in state]
        if missing:
            raise InputError(
                f"the checkpoint lacks {', '.join(missing)} (needed for {w.name}); "
                "re-export it from an IndicF5 snapshot"
            )
        for s in w.sources:
            if tuple(state[s].shape) != w.part_shape:
                raise InputError(
                    f"{s} has shape {tuple(state[s].shape)}; {w.name} needs {w.part_shape} from it for this "
                    f"model's sizes (dim {config.dim}, heads {config.heads}); "
                    "the checkpoint is damaged or of another model"
                )
        parts = [state[s] for s in w.sources]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        out[w.name] = tensor.reshape(w.shape).to(torch_dtype).contiguous()
    inv_freq = state.get("rotary_embed.inv_freq")
    if inv_freq is not None and not torch.allclose(inv_freq.float(), rope_inv_freq(config.dim_head), rtol=1e-5):
        raise InputError("rotary_embed.inv_freq differs from the standard rotary frequencies the network builds in")
    return out


def convert_checkpoint(export_dir: Path, dtype: DType, out: Path) -> dict:
    """Writes the TensorRT-LLM checkpoint into `out` (an empty directory); returns facts for the manifest."""
    ckpt = load_export(export_dir)
    weights = trtllm_weights(ckpt.transformer, ckpt.config, dtype)
    text = {k: v.to(TORCH_DTYPES[dtype]).contiguous() for k, v in ckpt.transformer.items() if is_text_weight(k)}
    save_file(weights, str(out / CHECKPOINT_WEIGHTS))
    save_file(text, str(out / TEXT_WEIGHTS))
    (out / CHECKPOINT_CONFIG).write_text(json.dumps(checkpoint_config(ckpt.config, dtype), indent=2))
    return {"tensors": len(weights), "text_tensors": len(text)}
