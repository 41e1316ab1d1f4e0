"""The feed-forward's tanh-GELU and the per-token FP8 quantization of its output in one pass.

Between the feed-forward's two FP8 GEMMs each token's 2 x dim activations go

    y (bf16, from the first GEMM) -> g = gelu_tanh(y) -> s = max|g| / 448 -> g_q = g / s in e4m3

Inductor compiles that as a looped reduction that reads y twice and evaluates the GELU twice;
here each program holds whole rows in registers and reads y once. gelu_tanh(y) = y * sigmoid(2u)
with u = sqrt(2/pi) (y + 0.044715 y^3), which is 0.5 y (1 + tanh(u)). Used by fp8.Fp8Linear on
CUDA; elsewhere fp8.py computes the same with torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)  # 448 (a kernel reads only constexpr globals)
ROW_ELEMENTS = 8192  # the longest row a program holds
# Timed on an H200 at 2000-36864 rows of 2048 (bench/results/kernels-h200-2026-12-04-fp8-accumulation.txt):
# one row a program with 2 warps beats 4 rows with 8 by 10% (64.5 vs 72.6 us at 36864 rows).
PROGRAM_ELEMENTS = 2048


@triton.jit
def _gelu_quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, rows, K: tl.constexpr, BLOCK_M: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offsets = m[:, None] * K + tl.arange(0, K)[None, :]
    inside = m[:, None] < rows
    y = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    g = y * tl.sigmoid(2 * 0.7978845608028654 * (y + 0.044715 * y * y * y))
    scale = tl.maximum(tl.max(tl.abs(g), axis=1), 1e-12) / FP8_MAX  # an all-zero row keeps a tiny scale
    q = tl.clamp(g / scale[:, None], -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + offsets, q.to(q_ptr.dtype.element_ty), mask=inside)
    tl.store(scale_ptr + m, scale, mask=m < rows)


def tile(k: int) -> tuple[int, int]:
    """(rows a program holds, warps) for rows of k elements."""
    return max(1, PROGRAM_ELEMENTS // k), max(2, k // 1024)


def holds_rows_of(k: int) -> bool:
    """Whether a program can hold rows of k elements: a power of two up to ROW_ELEMENTS."""
    return k & (k - 1) == 0 and 0 < k <= ROW_ELEMENTS


@torch.library.custom_op("indicf5::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp16/bf16 contiguous, K a power of two -> (gelu_tanh(x) quantized to e4m3 (M, K),
    its scale (M, 1) fp32), a scale per row."""
    rows, k = x.shape
    if not holds_rows_of(k):
        raise ValueError(f"gelu_quantize_rows holds rows of a power of two up to {ROW_ELEMENTS} elements, not {k}")
    x = x.contiguous()
    q = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    block, warps = tile(k)
    _gelu_quantize_rows_kernel[(triton.cdiv(rows, block),)](x, q, scale, rows, K=k, BLOCK_M=block, num_warps=warps)
    return q, scale


@gelu_quantize_rows.register_fake
def _(x):
    return torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn), x.new_empty(
        x.shape[0], 1, dtype=torch.float32
    )
