"""What a TensorRT-LLM checkpoint of the IndicF5 DiT holds: one naming table, used by the
converter (convert.py), the network (model.py checks its parameters against it) and the torch
executor (executor.py).

Names follow TensorRT-LLM's conventions (``blocks.{i}.attn.qkv``, ``attn.dense``, ``ff.fc``,
``ff.proj``); q, k and v are fused into one ``qkv`` matrix (rows q | k | v); convolution kernels
are 2-D ``(out, in/groups, 1, k)`` because the network runs them as conv2d over a (b, d, 1, n)
view. The text embedding is not in the engine: its features are computed once per utterance in
torch (runtime.py), and its weights travel beside the checkpoint in ``text_embed.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass

from indicf5.config import DType, ModelConfig

ARCHITECTURE = "IndicF5DiT"
CHECKPOINT_WEIGHTS = "rank0.safetensors"
CHECKPOINT_CONFIG = "config.json"
TEXT_WEIGHTS = "text_embed.safetensors"
TRTLLM_DTYPES: dict[DType, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

FREQ_EMBED_DIM = 256  # the timestep's sinusoidal features
CONV_KERNEL, CONV_GROUPS = 31, 16  # the convolutional position embedding
MAX_POSITIONS = 4096  # IndicF5's longest sequence, and the rotary table's length


@dataclass(frozen=True)
class Weight:
    """One TensorRT-LLM tensor, made of reference tensors (stacked along dim 0 when several, then
    reshaped to `shape`)."""

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    source_shape: tuple[int, ...] | None = None  # each source's shape, when not shape's share of dim 0

    @property
    def part_shape(self) -> tuple[int, ...]:
        return self.source_shape or (self.shape[0] // len(self.sources), *self.shape[1:])


def _linear(name: str, source: str, out_features: int, in_features: int) -> list[Weight]:
    return [
        Weight(f"{name}.weight", (f"{source}.weight",), (out_features, in_features)),
        Weight(f"{name}.bias", (f"{source}.bias",), (out_features,)),
    ]


def weight_table(c: ModelConfig) -> list[Weight]:
    d, ff = c.dim, c.dim * c.ff_mult
    conv = lambda i, src: [
        Weight(
            f"input_embed.conv{i}.weight",
            (f"input_embed.conv_pos_embed.conv1d.{src}.weight",),
            (d, d // CONV_GROUPS, 1, CONV_KERNEL),
            source_shape=(d, d // CONV_GROUPS, CONV_KERNEL),
        ),
        Weight(f"input_embed.conv{i}.bias", (f"input_embed.conv_pos_embed.conv1d.{src}.bias",), (d,)),
    ]
    table = [
        *_linear("time_embed.mlp1", "time_embed.time_mlp.0", d, FREQ_EMBED_DIM),
        *_linear("time_embed.mlp2", "time_embed.time_mlp.2", d, d),
        *_linear("input_embed.proj", "input_embed.proj", d, 2 * c.mel_dim + c.text_dim),
        *conv(1, 0),
        *conv(2, 2),
    ]
    for i in range(c.depth):
        ref, trt = f"transformer_blocks.{i}", f"blocks.{i}"
        table += [
            *_linear(f"{trt}.attn_norm", f"{ref}.attn_norm.linear", 6 * d, d),
            Weight(f"{trt}.attn.qkv.weight", tuple(f"{ref}.attn.to_{p}.weight" for p in "qkv"), (3 * d, d)),
            Weight(f"{trt}.attn.qkv.bias", tuple(f"{ref}.attn.to_{p}.bias" for p in "qkv"), (3 * d,)),
            *_linear(f"{trt}.attn.dense", f"{ref}.attn.to_out.0", d, d),
            *_linear(f"{trt}.ff.fc", f"{ref}.ff.ff.0.0", ff, d),
            *_linear(f"{trt}.ff.proj", f"{ref}.ff.ff.2", d, ff),
        ]
    return table + [*_linear("norm_out", "norm_out.linear", 2 * d, d), *_linear("proj_out", "proj_out", c.mel_dim, d)]


def is_text_weight(reference_name: str) -> bool:
    return reference_name.startswith("text_embed.")


def checkpoint_config(c: ModelConfig, dtype: DType) -> dict:
    """config.json of the checkpoint: PretrainedConfig's fields plus the DiT's own."""
    return {
        "architecture": ARCHITECTURE,
        "dtype": TRTLLM_DTYPES[dtype],
        "hidden_size": c.dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.heads,
        "dim_head": c.dim_head,
        "ff_mult": c.ff_mult,
        "mel_dim": c.mel_dim,
        "text_dim": c.text_dim,
        "text_num_embeds": c.text_num_embeds,
        "conv_layers": c.conv_layers,
        "freq_embed_dim": FREQ_EMBED_DIM,
        "conv_kernel": CONV_KERNEL,
        "conv_groups": CONV_GROUPS,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_act": "gelu",  # tanh approximation, as F5-TTS's feed-forward
        "norm_epsilon": 1e-6,
        "position_embedding_type": "rope_gptj",  # interleaved pairs, on the first head only
        "vocab_size": c.text_num_embeds + 1,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
    }


def model_config_of(config: dict) -> ModelConfig:
    """The reference ModelConfig back from a checkpoint's config.json."""
    return ModelConfig(
        dim=config["hidden_size"],
        depth=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        dim_head=config["dim_head"],
        ff_mult=config["ff_mult"],
        text_dim=config["text_dim"],
        conv_layers=config["conv_layers"],
        mel_dim=config["mel_dim"],
        text_num_embeds=config["text_num_embeds"],
    )
