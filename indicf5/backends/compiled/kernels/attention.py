"""Attention over bucket-padded rows, as one Triton kernel: each row's length is read on the
device, so a row attends to exactly its real keys, with no mask tensor and no work on the
padding, and one CUDA graph serves every length in a bucket.

The compiled engine pads a request of n frames to its bucket N. SDPA with a (b, 1, 1, N) boolean
key mask reads a bias for every score and does full work on the padded keys. This kernel
is a flash-attention forward (online softmax, fp32 accumulators), one program per (query tile,
row x head); a program walks its row's key tiles up to the row's length, masks only the last,
partial tile, and a query tile wholly past the length writes zeros and stops:

    s = q k^T / sqrt(dh),  m = running max of s,  l = running sum of exp(s - m),
    o = sum exp(s - m) v / l          (in log2 units: exp2, the scale folded into one FMA)

q, k and v are read by TMA (Hopper's tensor memory accelerator) in tiles of the (b * n, h * dh)
token matrices the fused q|k|v projection leaves them in, one head of consecutive tokens a tile;
a row's last key tile may reach into the next row's tokens, or past the end, which TMA fills with
zeros, and the mask drops those keys. TMA tiles are faster than pointer loads here, and unlike
cuDNN's padding-mask kernel this one puts no memset node before it in the CUDA graph, where the
GPU would sit idle around it (measurements and the alternatives tried: docs/performance.md,
"Design decisions"). Queries past a row's length attend like the real ones; the caller masks
those rows (as for the reference, their output is never used). Off CUDA the op runs SDPA on
each row's real tokens alone (`attend_each_row`): the reference's computation, whose result for a
row does not depend, to the bit, on its bucket or its batch-mates; CI runs the kernel in Triton's
interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from indicf5.model import sdpa_attend

# the fastest of the tiles timed by kernel_bench.py at 1024 and 2048 frames, fp16 and bf16 (docs/performance.md)
BLOCK_QUERIES, BLOCK_KEYS, WARPS, STAGES = 128, 64, 4, 3


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_desc,
    v_desc,
    token,
    column,
    start,
    length,
    scale_log2,
    BLOCK_N: tl.constexpr,
    LAST: tl.constexpr,
):
    """One key tile of the online softmax: acc, m_i, l_i updated for keys [start, start + BLOCK_N)
    of the row whose first token is `token`; m_i in log2 units of the scaled scores."""
    k = k_desc.load([token + start, column])  # (BLOCK_N, HEAD), by TMA
    v = v_desc.load([token + start, column])
    s = tl.dot(q, tl.trans(k))
    if (
        LAST
    ):  # the partial tile: what lies past the length (padding, or the next row's first tokens) neither scores nor adds
        real = start + tl.arange(0, BLOCK_N) < length
        s = tl.where(real[None, :], s, float("-inf"))
        v = tl.where(real[:, None], v, 0.0)  # p is 0 there, but 0 * NaN would not be
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    p = tl.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attention_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_ptr,
    lengths_ptr,
    n_frames,
    heads,
    o_stride_b,
    o_stride_n,
    o_stride_h,
    scale_log2,
    HEAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile, row_head = tl.program_id(0), tl.program_id(1)
    row, head = row_head // heads, row_head % heads
    length = tl.load(lengths_ptr + row)
    queries = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD)
    in_rows = (queries < n_frames)[:, None]  # the last tile passes the end where n_frames is not a multiple of it
    out = o_ptr + row * o_stride_b + head * o_stride_h + queries[:, None] * o_stride_n + dims[None, :]
    if tile * BLOCK_M >= length:  # padding only
        tl.store(out, tl.zeros((BLOCK_M, HEAD), dtype=o_ptr.dtype.element_ty), mask=in_rows)
        return
    token, column = row * n_frames, head * HEAD  # the tile's origin in the (b * n, h * dh) token matrices
    q = q_desc.load([token + tile * BLOCK_M, column])
    acc = tl.zeros((BLOCK_M, HEAD), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    whole = length // BLOCK_N * BLOCK_N
    for start in range(0, whole, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_desc, v_desc, token, column, start, length, scale_log2, BLOCK_N, False
        )
    if whole < length:
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_desc, v_desc, token, column, whole, length, scale_log2, BLOCK_N, True
        )
    tl.store(out, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=in_rows)


def token_matrix(t: torch.Tensor, block_tokens: int) -> TensorDescriptor:
    """A TMA descriptor of t (b, n, h, dh) as the (b * n, h * dh) matrix it is in memory, read in
    (block_tokens, dh) tiles: one head of consecutive tokens."""
    b, n, h, dh = t.shape
    if t.stride(-1) != 1 or t.stride(2) != dh or t.stride(0) != n * t.stride(1):
        raise ValueError(
            f"padded attention reads (b, n, h, dh) tensors whose tokens are rows of one matrix, "
            f"not strides {t.stride()}"
        )
    return TensorDescriptor(t, [b * n, h * dh], [t.stride(1), 1], [block_tokens, dh])


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    block_queries: int = BLOCK_QUERIES,
    block_keys: int = BLOCK_KEYS,
    warps: int = WARPS,
    stages: int = STAGES,
) -> torch.Tensor:
    """The kernel's launch (any tile, for kernel_bench.py): `padded_attention` on fp16/bf16 tensors
    of a device Triton runs on."""
    b, n, h, dh = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(n, block_queries), b * h)
    _attention_kernel[grid](
        token_matrix(q, block_queries),
        token_matrix(k, block_keys),
        token_matrix(v, block_keys),
        out,
        lengths.to(torch.int32),
        n,
        h,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        dh**-0.5 * math.log2(math.e),
        HEAD=dh,
        BLOCK_M=block_queries,
        BLOCK_N=block_keys,
        num_warps=warps,
        num_stages=stages,
    )
    return out


@torch.library.custom_op("indicf5::padded_attention", mutates_args=())
def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q, k, v (b, n, h, dh), one layout with dh contiguous (views of the q|k|v projection);
    lengths (b,) int32 real frames per row -> (b, n, h, dh) contiguous: each row's first
    `length` queries attend to its first `length` keys."""
    if not q.is_cuda:
        return attend_each_row(q, k, v, lengths)
    return attend(q, k, v, lengths)


def attend_each_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`padded_attention` as SDPA over each row's first `length` tokens, copied out alone, so every
    call for a row sees the same shapes and memory layout whatever the bucket and batch: a CPU's
    SDPA splits the keys in blocks by their number, and a key mask over a longer padding changes
    the rounding. Queries past a length get zeros."""
    out = torch.zeros(q.shape, device=q.device, dtype=q.dtype)
    for row, n in enumerate(lengths.tolist()):
        real = [t[row : row + 1, :n].contiguous() for t in (q, k, v)]
        out[row : row + 1, :n] = sdpa_attend(*real)
    return out


@padded_attention.register_fake
def _(q, k, v, lengths):
    return torch.empty(q.shape, device=q.device, dtype=q.dtype)
