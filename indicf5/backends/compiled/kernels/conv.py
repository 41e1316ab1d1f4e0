"""The convolutional position embedding's grouped convolution + Mish as one Triton kernel.

cuDNN runs IndicF5's grouped convolution (16 groups of 64 channels, kernel 31, on channels-last
fp16) as one sm80 convolution per group plus channel-slicing copies, far below the GPU's matmul
rate (docs/performance.md has the numbers). Per group it is an implicit GEMM: for each of the 31
taps, the (frames x 64) input shifted by the tap times the tap's (64 x 64) weights, summed in
fp32 registers. The row's padding (zero input past its length, zero output there), the bias and
Mish are fused, so the two convolutions of the embedding are two launches:

    out[b, t, g*C + o] = mish(bias[g*C + o] + sum_k sum_i x[b, t + k - K//2, g*C + i] * w[k, g, i, o]),
    with x = 0 outside [0, length[b]) and out = 0 at t >= length[b]

Used by the compiled backend on CUDA (`conv: triton`); CI checks it in Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_FRAMES = 128  # output frames per program (its grid: frame tiles x groups x rows)
WARPS = 4


@triton.jit
def _conv_mish_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    lengths_ptr,
    out_ptr,
    n_frames,
    dim,
    KERNEL: tl.constexpr,
    GROUPS: tl.constexpr,
    CHANNELS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tile, group, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + row)
    frames = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    channels = tl.arange(0, CHANNELS)
    x_row = x_ptr + row * n_frames * dim + group * CHANNELS
    acc = tl.zeros((BLOCK_T, CHANNELS), dtype=tl.float32)
    for k in range(KERNEL):
        src = frames + (k - KERNEL // 2)
        real = (src >= 0) & (src < length)  # the conv's zero padding, and the row's own padding
        xs = tl.load(x_row + src[:, None] * dim + channels[None, :], mask=real[:, None], other=0.0)
        ws = tl.load(w_ptr + ((k * GROUPS + group) * CHANNELS + channels[:, None]) * CHANNELS + channels[None, :])
        acc += tl.dot(xs.to(ws.dtype), ws)
    acc += tl.load(bias_ptr + group * CHANNELS + channels).to(tl.float32)[None, :]
    # mish(a) = a * tanh(softplus(a)), tanh(log(1 + e)) = ((1 + e)^2 - 1) / ((1 + e)^2 + 1); softplus(a) = a past 20
    e = tl.exp(tl.minimum(acc, 20.0))
    square = (1.0 + e) * (1.0 + e)
    mish = tl.where(acc > 20.0, acc, acc * (square - 1.0) / (square + 1.0))
    mish = tl.where((frames < length)[:, None], mish, 0.0)
    out = out_ptr + row * n_frames * dim + frames[:, None] * dim + group * CHANNELS + channels[None, :]
    tl.store(out, mish.to(out_ptr.dtype.element_ty), mask=(frames < n_frames)[:, None])


def arrange_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A Conv1d weight (d, d/groups, k) -> (k, groups, c_in, c_out), the kernel's tap-by-tap tiles."""
    d, c, k = weight.shape
    return weight.view(groups, c, c, k).permute(3, 0, 2, 1).contiguous()


@torch.library.custom_op("indicf5::conv_mish", mutates_args=())
def conv_mish(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lengths: torch.Tensor,
    block_frames: int = BLOCK_FRAMES,
    warps: int = WARPS,
) -> torch.Tensor:
    """x (b, n, d), weight from `arrange_weight`, bias (d,), lengths (b,) int32 -> (b, n, d) in x's dtype."""
    x = x.contiguous()
    b, n, d = x.shape
    taps, groups, channels, _ = weight.shape
    out = torch.empty_like(x)
    grid = (triton.cdiv(n, block_frames), groups, b)
    _conv_mish_kernel[grid](
        x,
        weight,
        bias,
        lengths,
        out,
        n,
        d,
        KERNEL=taps,
        GROUPS=groups,
        CHANNELS=channels,
        BLOCK_T=block_frames,
        num_warps=warps,
    )
    return out


@conv_mish.register_fake
def _(x, weight, bias, lengths, block_frames=BLOCK_FRAMES, warps=WARPS):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
