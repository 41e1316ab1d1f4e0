"""The compiled engine's modules: the reference's layers as the engine runs them (fused q|k|v,
GELU in the GEMM epilogue, matmuls in the engine's dtype, attention and position convolutions by
row lengths), and how a bucket-padded batch describes its padding to them (`Padding`)."""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from indicf5 import model
from indicf5.backends.compiled.kernels import attention as padded_attention
from indicf5.model import DiT
from indicf5.sampler import lengths_to_mask


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} frames exceed the engine's largest bucket ({buckets[-1]})")
    return buckets[i]


class CastLinear(nn.Module):
    """A linear layer whose matmul runs in its weights' dtype whatever its input's: the input is cast
    down, and the output back up unless the next consumer is a matmul too (`upcast` False: its
    values are the low dtype's either way, so only the traffic would change)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype, upcast: bool = True):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype))
        self.register_buffer("bias", bias.detach().to(dtype))
        self.upcast = upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return y.to(x.dtype) if self.upcast else y


class GeluLinear(CastLinear):
    """The feed-forward's first linear with its tanh-GELU in the GEMM's epilogue (cuBLASLt's GELU
    epilogue is the tanh form): one kernel instead of a GEMM and an element-wise pass. Its output
    stays in the matmul's dtype: the next consumer is the second linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._addmm_activation(self.bias, x.to(self.weight.dtype).flatten(0, -2), self.weight.t(), use_gelu=True)
        return y.unflatten(0, x.shape[:-1])


def matmuls_in(dit: DiT, dtype: torch.dtype) -> None:
    """Every linear layer of the step (all but the text embedding's) replaced by a CastLinear in `dtype`."""
    low = {
        name: m for name, m in dit.named_modules() if isinstance(m, nn.Linear) and not name.startswith("text_embed.")
    }
    for name, linear in low.items():
        parent, _, attr = name.rpartition(".")
        setattr(dit.get_submodule(parent), attr, CastLinear(linear.weight, linear.bias, dtype))


class NormedInMatmulDtype(nn.Module):
    """A DiTBlock (mixed precision) whose normalised output comes out in the matmuls' dtype. Its
    only consumer is a matmul that casts it anyway (the next block's q|k|v projection, or
    proj_out): cast here, it costs nothing in the norm's kernel instead of a pass of its own."""

    def __init__(self, block: model.DiTBlock, dtype: torch.dtype):
        super().__init__()
        self.block, self.dtype = block, dtype
        self.attn_norm = block.attn_norm  # DiT.condition reads each block's modulation from it

    def forward(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        x, normed = self.block(*args)
        return x, normed.to(self.dtype)


class Padding(NamedTuple):
    """What the engine's modules know of a bucket-padded batch, computed once a step and handed
    to DiT.flow as its mask (the modules the engine puts in get it: attention, the position
    convolutions)."""

    mask: torch.Tensor  # (b, n) bool, True on real frames
    lengths: torch.Tensor  # (b,) int32

    @classmethod
    def of(cls, lengths: torch.Tensor, n: int) -> Padding:
        """lengths (b,) int32 of rows padded to n frames."""
        return cls(lengths_to_mask(lengths, n), lengths)


class ChannelsLastConvPositionEmbedding(nn.Module):
    """The position convolutions on (b, n, d) data without transposing it: viewed as a
    (b, d, 1, n) image it is already channels-last, which cuDNN convolves as it is."""

    def __init__(self, reference: model.ConvPositionEmbedding, dtype: torch.dtype):
        super().__init__()
        convs = [m for m in reference.conv1d if isinstance(m, nn.Conv1d)]
        self.groups, self.padding = convs[0].groups, convs[0].padding[0]
        for i, conv in enumerate(convs):
            weight = conv.weight.detach().to(dtype).unsqueeze(2).contiguous(memory_format=torch.channels_last)
            self.register_buffer(f"weight{i}", weight)
            self.register_buffer(f"bias{i}", conv.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor, padding: Padding) -> torch.Tensor:
        h = x.transpose(1, 2).unsqueeze(2)  # (b, d, 1, n), a view: channels-last memory
        keep = padding.mask[:, None, None, :]
        for i in range(2):
            h = h.masked_fill(~keep, 0.0)
            conv = F.conv2d(
                h.to(self.weight0.dtype),
                getattr(self, f"weight{i}"),
                getattr(self, f"bias{i}"),
                padding=(0, self.padding),
                groups=self.groups,
            )
            h = F.mish(conv.to(x.dtype))
        return h.masked_fill(~keep, 0.0).squeeze(2).transpose(1, 2)


class TritonConvPositionEmbedding(nn.Module):
    """The position convolutions as two launches of one Triton kernel (kernels/conv.py): the
    padding mask, the bias and Mish fused; CUDA only."""

    def __init__(self, reference: model.ConvPositionEmbedding, dtype: torch.dtype):
        super().__init__()
        from indicf5.backends.compiled.kernels.conv import arrange_weight

        convs = [m for m in reference.conv1d if isinstance(m, nn.Conv1d)]
        for i, conv in enumerate(convs):
            self.register_buffer(f"weight{i}", arrange_weight(conv.weight.detach(), conv.groups).to(dtype))
            self.register_buffer(f"bias{i}", conv.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor, padding: Padding) -> torch.Tensor:
        from indicf5.backends.compiled.kernels.conv import conv_mish

        lengths = padding.lengths
        return conv_mish(conv_mish(x, self.weight0, self.bias0, lengths), self.weight1, self.bias1, lengths)


class ShiftedSumDepthwiseConv(nn.Module):
    """The text blocks' depthwise Conv1d (k taps, `same` padding) as k shifted multiply-adds in fp32.
    On CUDA cuDNN spends ~20 ms of host time on every call of this convolution (capture included),
    which made it most of each shape's capture at load; these are a few elementwise kernels, run
    once a loop inside the embed graph."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        assert conv.groups == conv.in_channels == conv.out_channels and conv.padding[0] * 2 + 1 == conv.kernel_size[0]
        self.register_buffer("weight", conv.weight.detach()[:, 0].float())  # (d, k)
        self.register_buffer("bias", conv.bias.detach().float()[:, None])  # (d, 1)
        self.pad = conv.padding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, d, n) -> (b, d, n)
        n = x.shape[-1]
        padded = F.pad(x.float(), (self.pad, self.pad))
        y = self.bias.expand_as(x)
        for k in range(self.weight.shape[1]):
            y = y + padded[..., k : k + n] * self.weight[:, k : k + 1]
        return y.to(x.dtype)


class EngineAttention(nn.Module):
    """The reference's self-attention (model.Attention) as the engine runs it: q, k and v from one
    matmul of the three weights stacked (`qkv`: a CastLinear, or an Fp8Linear); rotary positions
    on the first head rotated in place by kernels/rope.py (`rope_kernel`) or by the reference's
    copy; attention by row lengths (kernels/attention.py, `by_lengths`) or SDPA with the key mask."""

    def __init__(self, attn: model.Attention, qkv: nn.Module, to_out: nn.Module, by_lengths: bool, rope_kernel: bool):
        super().__init__()
        self.heads, self.dim_head = attn.heads, attn.dim_head
        self.qkv, self.to_out = (
            qkv,
            to_out,
        )  # (b, n, d) -> (b, n, 3 * h * dh) in the matmul's dtype; (b, n, h * dh) -> (b, n, d)
        self.by_lengths, self.rope_kernel = by_lengths, rope_kernel

    def forward(self, x: torch.Tensor, rope: torch.Tensor, padding: Padding) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x)  # (b, n, 3 * h * dh), in the matmul's dtype
        if self.rope_kernel:
            from indicf5.backends.compiled.kernels.rope import rotate_first_head_

            rotate_first_head_(qkv, rope, self.heads)
        q, k, v = qkv.view(b, n, 3, self.heads, self.dim_head).unbind(2)  # (b, n, h, dh) each
        if not self.rope_kernel:
            q, k = model.rotate_first_head(q, k, rope)
        if self.by_lengths:
            h = padded_attention.padded_attention(q, k, v, padding.lengths)
        else:
            h = model.sdpa_attend(q, k, v, padding.mask)
        h = self.to_out(h.reshape(b, n, -1))
        return h.masked_fill(~padding.mask[..., None], 0.0)  # as the reference; padded queries' output is undefined


def row_lengths(mask: torch.Tensor | None, b: int, n: int, device) -> torch.Tensor:
    """(b,) int32 real frames per row: all n when there is no mask."""
    return torch.full((b,), n, device=device, dtype=torch.int32) if mask is None else mask.sum(-1, dtype=torch.int32)
