"""IndicF5DiTConfig: TensorRT-LLM's PretrainedConfig with the DiT's own sizes. Its JSON form is
layout.checkpoint_config, written by the converter without tensorrt_llm."""

from __future__ import annotations

from tensorrt_llm.models.modeling_utils import PretrainedConfig

from indicf5.backends.trtllm import layout

DIT_FIELDS = (
    "dim_head",
    "ff_mult",
    "mel_dim",
    "text_dim",
    "text_num_embeds",
    "conv_layers",
    "freq_embed_dim",
    "conv_kernel",
    "conv_groups",
)


class IndicF5DiTConfig(PretrainedConfig):
    def __init__(
        self,
        *,
        dim_head: int,
        ff_mult: int,
        mel_dim: int,
        text_dim: int,
        text_num_embeds: int,
        conv_layers: int,
        freq_embed_dim: int = layout.FREQ_EMBED_DIM,
        conv_kernel: int = layout.CONV_KERNEL,
        conv_groups: int = layout.CONV_GROUPS,
        **kwargs,
    ):
        self.dim_head, self.ff_mult, self.mel_dim, self.text_dim = dim_head, ff_mult, mel_dim, text_dim
        self.text_num_embeds, self.conv_layers, self.freq_embed_dim = text_num_embeds, conv_layers, freq_embed_dim
        self.conv_kernel, self.conv_groups = conv_kernel, conv_groups
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update({name: getattr(self, name) for name in DIT_FIELDS})
        return out
