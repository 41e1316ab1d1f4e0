"""Rotary positions on the first head of q and k, in place in the fused q|k|v projection.

F5TTS_Base rotates only head 0 of q and k (model.rotate_first_head). Written as torch ops, the
rotation concatenates the rotated head with the other 15, so every step copies all of q and k
(docs/performance.md has the cost); assigning into a slice instead makes Inductor
copy the whole buffer. This kernel rewrites just those 2 x 64 channels of each token where the
projection left them, and as a custom op that declares the mutation, Inductor leaves the buffer
alone. The pairs rotate as in model.apply_rope, in fp32:

    (x[2i], x[2i+1]) <- (x[2i] cos a_i - x[2i+1] sin a_i,  x[2i+1] cos a_i + x[2i] sin a_i),
    a_i = position * inv_freq[i]

Used by the compiled backend on CUDA (`rope: kernel`); CI checks it in Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_TOKENS = 8  # tokens per program: many small programs keep every SM's loads in flight


@triton.jit
def _rotate_head(ptr, cos, sin, BLOCK_T: tl.constexpr, HALF: tl.constexpr):
    """Rotate the (BLOCK_T, 2 * HALF) head at ptr (row pointers) in place, pairs interleaved."""
    x = tl.load(ptr).to(tl.float32)
    even, odd = tl.split(tl.reshape(x, (BLOCK_T, HALF, 2)))
    rotated = tl.join(even * cos - odd * sin, odd * cos + even * sin)
    tl.store(ptr, tl.reshape(rotated, (BLOCK_T, 2 * HALF)).to(ptr.dtype.element_ty))


@triton.jit
def _rotate_first_head_kernel(
    qkv_ptr, angles_ptr, n_frames, token_stride, k_offset, HALF: tl.constexpr, BLOCK_T: tl.constexpr
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # the grid covers the tokens exactly
    angle = tl.load(angles_ptr + (tokens % n_frames)[:, None] * (2 * HALF) + 2 * tl.arange(0, HALF)[None, :])
    cos, sin = tl.cos(angle), tl.sin(angle)
    rows = qkv_ptr + tokens[:, None] * token_stride + tl.arange(0, 2 * HALF)[None, :]
    _rotate_head(rows, cos, sin, BLOCK_T, HALF)  # q's first head
    _rotate_head(rows + k_offset, cos, sin, BLOCK_T, HALF)  # k's


@torch.library.custom_op("indicf5::rotate_first_head_", mutates_args=("qkv",))
def rotate_first_head_(qkv: torch.Tensor, angles: torch.Tensor, heads: int) -> None:
    """qkv (b, n, 3 * heads * dh) contiguous, q | k | v along the last axis; angles (n, dh) fp32
    as model.rope_angles gives them. Rotates q's and k's first head in place."""
    if not qkv.is_contiguous():
        raise ValueError("rotate_first_head_ needs the projection's contiguous (b, n, 3 * heads * dh) output")
    b, n, width = qkv.shape
    dim_head = angles.shape[-1]
    block = next(t for t in (BLOCK_TOKENS, 4, 2, 1) if (b * n) % t == 0)
    _rotate_first_head_kernel[(b * n // block,)](
        qkv, angles.contiguous(), n, width, heads * dim_head, HALF=dim_head // 2, BLOCK_T=block
    )
