"""The IndicF5 DiT's flow step as a TensorRT-LLM network (no plugins: the runbook builds without
the BERT attention plugin and without input-padding removal, so every tensor is (b, n, ...)).

    inputs   x, cond (b, n, mel)   text_emb (b, n, text_dim)   time (b,) fp32   input_lengths (b,) int32
    output   velocity (b, n, mel)

The math is the reference's (indicf5/model.py), module for module; executor.py runs the same ops
in torch on the same checkpoint. Parameter names are layout.weight_table's: `IndicF5DiT` checks
its own against the table when it is built. Rows are masked to their `input_lengths` (attention
keys, the position convolutions), so a batch of mixed lengths gives each row its own result.

`register()` adds the class to TensorRT-LLM's model map at run time (nothing is copied into the
installed package); `trtllm-build --model_cls_file indicf5/backends/trtllm/model.py --model_cls_name IndicF5DiT`
loads it the same way.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import tensorrt as trt
from tensorrt_llm._utils import str_dtype_to_trt
from tensorrt_llm.functional import (
    Tensor,
    cast,
    chunk,
    concat,
    constant,
    conv2d,
    cos,
    expand,
    gelu,
    matmul,
    shape,
    silu,
    sin,
    slice,
    softmax,
    softplus,
    tanh,
    unsqueeze,
)
from tensorrt_llm.layers import LayerNorm, Linear
from tensorrt_llm.models.modeling_utils import PretrainedModel
from tensorrt_llm.module import Module, ModuleList
from tensorrt_llm.parameter import Parameter

from indicf5.backends.trtllm import layout
from indicf5.backends.trtllm.config import IndicF5DiTConfig
from indicf5.backends.trtllm.executor import MASKED_KEY_BIAS, rotary_table, timestep_frequencies


class ModulatedLayerNorm(Module):
    """LayerNorm without affine weights, modulated by the time embedding: x * (1 + scale) + shift."""

    def __init__(self, dim: int, dtype):
        super().__init__()
        self.norm = LayerNorm(dim, eps=1e-6, elementwise_affine=False, dtype=dtype)

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:  # x (b, n, d); shift, scale (b, d)
        return self.norm(x) * (unsqueeze(scale, 1) + 1.0) + unsqueeze(shift, 1)


def mish(x: Tensor) -> Tensor:
    return x * tanh(softplus(x, beta=1.0, threshold=20.0))


class TimestepEmbedding(Module):
    def __init__(self, dim: int, freq_dim: int, dtype):
        super().__init__()
        self.dtype = dtype
        self.freqs = timestep_frequencies(freq_dim).numpy()
        self.mlp1 = Linear(freq_dim, dim, dtype=dtype)
        self.mlp2 = Linear(dim, dim, dtype=dtype)

    def forward(self, time: Tensor) -> Tensor:  # (b,) fp32 -> (b, dim)
        angles = unsqueeze(time, 1) * 1000.0 * unsqueeze(constant(self.freqs), 0)
        t_freq = cast(concat([sin(angles), cos(angles)], dim=1), self.dtype)
        return self.mlp2(silu(self.mlp1(t_freq)))


class GroupedConv(Module):
    """A grouped convolution along frames, as conv2d over a (b, d, 1, n) view (kernel (out, in/groups, 1, k))."""

    def __init__(self, dim: int, kernel: int, groups: int, dtype):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight = Parameter(shape=(dim, dim // groups, 1, kernel), dtype=dtype)
        self.bias = Parameter(shape=(dim,), dtype=dtype)

    def forward(self, p: Tensor) -> Tensor:
        return conv2d(p, self.weight.value, self.bias.value, padding=(0, self.kernel // 2), groups=self.groups)


class InputEmbedding(Module):
    """proj([x | cond | text]) plus the convolutional position embedding (two grouped convolutions
    with Mish; padded frames zeroed around each)."""

    def __init__(self, mel_dim: int, text_dim: int, dim: int, kernel: int, groups: int, dtype):
        super().__init__()
        self.proj = Linear(2 * mel_dim + text_dim, dim, dtype=dtype)
        self.conv1 = GroupedConv(dim, kernel, groups, dtype)
        self.conv2 = GroupedConv(dim, kernel, groups, dtype)

    def forward(self, x: Tensor, cond: Tensor, text_emb: Tensor, keep4: Tensor) -> Tensor:  # keep4 (b, 1, 1, n)
        h = self.proj(concat([x, cond, text_emb], dim=2))  # (b, n, d)
        p = unsqueeze(h.permute([0, 2, 1]), 2)  # (b, d, 1, n)
        p = mish(self.conv2(mish(self.conv1(p * keep4)) * keep4)) * keep4
        return h + p.view(concat([shape(p, 0), shape(p, 1), shape(p, 3)])).permute([0, 2, 1])


def rotate_first_head(t: Tensor, cos_table: Tensor, sin_table: Tensor, dim_head: int) -> Tensor:
    """Rotary positions on the first head's interleaved channel pairs (b, n, dh), in fp32."""
    b, n, d = shape(t, 0), shape(t, 1), shape(t, 2)
    head = cast(slice(t, [0, 0, 0], concat([b, n, dim_head])), trt.float32)
    rest = slice(t, concat([0, 0, dim_head]), concat([b, n, d - dim_head]))
    pairs = head.view(concat([b, n, dim_head // 2, 2]))
    even = slice(pairs, [0, 0, 0, 0], concat([b, n, dim_head // 2, 1]))
    odd = slice(pairs, [0, 0, 0, 1], concat([b, n, dim_head // 2, 1]))
    rotated = concat([odd * -1.0, even], dim=3).view(concat([b, n, dim_head]))
    return concat([cast(head * cos_table + rotated * sin_table, t.dtype), rest], dim=2)


class Attention(Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dtype):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.qkv = Linear(dim, 3 * heads * dim_head, dtype=dtype)  # rows q | k | v
        self.dense = Linear(heads * dim_head, dim, dtype=dtype)

    def forward(self, x: Tensor, cos_table: Tensor, sin_table: Tensor, key_bias: Tensor) -> Tensor:
        b, n = shape(x, 0), shape(x, 1)
        q, k, v = chunk(self.qkv(x), 3, dim=2)
        q = rotate_first_head(q, cos_table, sin_table, self.dim_head)
        k = rotate_first_head(k, cos_table, sin_table, self.dim_head)
        split_heads = lambda t: t.view(concat([b, n, self.heads, self.dim_head])).permute([0, 2, 1, 3])
        q, k, v = split_heads(q), split_heads(k), split_heads(v)  # (b, h, n, dh)
        scores = matmul(q, k, transb=True) * (1.0 / math.sqrt(self.dim_head)) + key_bias  # (b, h, n, n)
        out = matmul(softmax(scores, dim=3), v).permute([0, 2, 1, 3])
        return self.dense(out.view(concat([b, n, self.heads * self.dim_head])))


class FeedForward(Module):
    def __init__(self, dim: int, mult: int, dtype):
        super().__init__()
        self.fc = Linear(dim, dim * mult, dtype=dtype)
        self.proj = Linear(dim * mult, dim, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(gelu(self.fc(x)))  # TensorRT-LLM's gelu is the tanh approximation


class DiTBlock(Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, dtype):
        super().__init__()
        self.attn_norm = Linear(dim, 6 * dim, dtype=dtype)  # AdaLN-Zero: shift, scale, gate for attention and MLP
        self.attn_ln = ModulatedLayerNorm(dim, dtype)
        self.attn = Attention(dim, heads, dim_head, dtype)
        self.ff_ln = ModulatedLayerNorm(dim, dtype)
        self.ff = FeedForward(dim, ff_mult, dtype)

    def forward(self, h, t_emb, cos_table, sin_table, key_bias, keep3):
        shift, scale, gate, shift_ff, scale_ff, gate_ff = chunk(self.attn_norm(silu(t_emb)), 6, dim=1)
        attn = self.attn(self.attn_ln(h, shift, scale), cos_table, sin_table, key_bias) * keep3
        h = h + unsqueeze(gate, 1) * attn
        return h + unsqueeze(gate_ff, 1) * self.ff(self.ff_ln(h, shift_ff, scale_ff))


class IndicF5DiT(PretrainedModel):
    def __init__(self, config: IndicF5DiTConfig):
        super().__init__(config)
        c = config
        self.dtype = str_dtype_to_trt(c.dtype)
        self.time_embed = TimestepEmbedding(c.hidden_size, c.freq_embed_dim, self.dtype)
        self.input_embed = InputEmbedding(
            c.mel_dim, c.text_dim, c.hidden_size, c.conv_kernel, c.conv_groups, self.dtype
        )
        self.blocks = ModuleList(
            [
                DiTBlock(c.hidden_size, c.num_attention_heads, c.dim_head, c.ff_mult, self.dtype)
                for _ in range(c.num_hidden_layers)
            ]
        )
        self.norm_out = Linear(c.hidden_size, 2 * c.hidden_size, dtype=self.dtype)  # scale, shift (in that order)
        self.final_ln = ModulatedLayerNorm(c.hidden_size, self.dtype)
        self.proj_out = Linear(c.hidden_size, c.mel_dim, dtype=self.dtype)
        self.rotary = rotary_table(c.max_position_embeddings, c.dim_head).numpy()
        self.positions = np.arange(c.max_position_embeddings, dtype=np.int32)[None, :]
        check_parameters(self, c)

    def __post_init__(self):
        return  # no quantization: the checkpoint is loaded as converted (as TensorRT-LLM's own DiT does)

    def forward(self, x: Tensor, cond: Tensor, text_emb: Tensor, time: Tensor, input_lengths: Tensor) -> Tensor:
        b, n = shape(x, 0), shape(x, 1)
        positions = expand(slice(constant(self.positions), [0, 0], concat([1, n])), concat([b, n]))
        keep = cast(cast(positions < unsqueeze(input_lengths, 1), "int32"), self.dtype)  # (b, n): 1 on real frames
        keep3, keep4 = unsqueeze(keep, 2), unsqueeze(unsqueeze(keep, 1), 1)
        key_bias = (keep4 - 1.0) * -MASKED_KEY_BIAS  # (b, 1, 1, n): 0 on real keys, MASKED_KEY_BIAS on padding

        angles = slice(constant(self.rotary), [0, 0], concat([n, self.rotary.shape[1]]))  # (n, dh) fp32
        cos_table, sin_table = cos(angles), sin(angles)

        t_emb = self.time_embed(time)
        h = self.input_embed(x, cond, text_emb, keep4)
        for block in self.blocks:
            h = block(h, t_emb, cos_table, sin_table, key_bias, keep3)
        scale, shift = chunk(self.norm_out(silu(t_emb)), 2, dim=1)
        velocity = self.proj_out(self.final_ln(h, shift, scale))
        velocity.mark_output("velocity", self.dtype)
        return velocity

    def prepare_inputs(
        self, max_batch_size: int = 8, max_seq_len: int = layout.MAX_POSITIONS, opt_seq_len: int = 2048, **kwargs
    ):
        """The engine's dynamic shapes: rows in [1, max_batch_size] (a guided batch is 2 per utterance),
        frames in [1, max_seq_len]."""
        c = self.config
        rows = ("batch_size", [[1, max(1, max_batch_size // 2), max_batch_size]])
        frames = ("frames", [[1, opt_seq_len, max_seq_len]])
        feature = lambda name, dim, dtype=self.dtype: Tensor(
            name=name,
            dtype=dtype,
            shape=[-1, -1, dim],
            dim_range=OrderedDict([rows, frames, ("features", [[dim] * 3])]),
        )
        return {
            "x": feature("x", c.mel_dim),
            "cond": feature("cond", c.mel_dim),
            "text_emb": feature("text_emb", c.text_dim),
            "time": Tensor(name="time", dtype=trt.float32, shape=[-1], dim_range=OrderedDict([rows])),
            "input_lengths": Tensor(name="input_lengths", dtype=trt.int32, shape=[-1], dim_range=OrderedDict([rows])),
        }


def check_parameters(model: IndicF5DiT, config: IndicF5DiTConfig) -> None:
    """The network's parameters are exactly the naming table's, name for name and shape for shape."""
    ours = {name: tuple(p.shape) for name, p in model.named_parameters()}
    table = {w.name: w.shape for w in layout.weight_table(layout.model_config_of(config.to_dict()))}
    if ours != table:
        raise RuntimeError(
            f"IndicF5DiT's parameters differ from the naming table: only in the network "
            f"{sorted(set(ours) - set(table))}, only in the table {sorted(set(table) - set(ours))}, "
            f"shapes {[(k, ours[k], table[k]) for k in ours.keys() & table.keys() if ours[k] != table[k]]}"
        )


def register() -> None:
    """Runbook step 3: makes `IndicF5DiT` a TensorRT-LLM architecture for this process (MODEL_MAP, as built-in
    models are)."""
    from tensorrt_llm.models import MODEL_MAP

    MODEL_MAP.setdefault(layout.ARCHITECTURE, IndicF5DiT)
