"""FP8 (e4m3) matmuls for the compiled engine's transformer blocks (build flag ``precision: fp8``).

Hopper's tensor cores multiply e4m3 operands at about twice the fp16/bf16 rate. A linear layer
y = x W^T + b runs as

    W (N, K) ─once, at build─> W_q = round(W / s_W) in e4m3,  s_W = max|W[n, :]| / 448   (a scale per output channel)
    x (M, K) ─every call─────> x_q = round(x / s_x) in e4m3,  s_x = max|x[m, :]| / 448   (a scale per token)
    y = (x_q W_q^T) * s_x * s_W^T + b        one rowwise-scaled GEMM (torch._scaled_mm), bf16 out

448 is e4m3's largest finite value, so every row uses the format's whole range. Per-token
activation scales follow the spread of the DiT's tokens (reference frames, generated frames and
padding differ by orders of magnitude). Only the blocks' q|k|v and feed-forward linears take
this path (`reference_layers` says why the attention's output projection does not); attention,
norms, the position convolutions, the modulation and the ODE state stay as the engine's other
precisions have them. Off Hopper-class GPUs the same quantized operands are multiplied in fp32
(`fp8_matmul` emulates the GEMM), which is what CI checks.

Each activation is quantized in the pass that produces it: the feed-forward's input in the norm
pass before it, its hidden layer with its GELU (kernels/quantize.py), and the next block's q|k|v
input in the block's last pass over x, where its norm runs; the block hands it on quantized
(`QuantizedNormOut`, `QuantizedRows`), since one compiled block cannot fuse into the next.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from indicf5.backends.compiled.kernels import quantize

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores
FP8_FILE = "fp8.safetensors"


def unsupported(device: torch.device) -> str | None:
    """Why `device` cannot run FP8 GEMMs, or None when it can."""
    if device.type != "cuda":
        return f"precision 'fp8' runs FP8 tensor-core GEMMs on a CUDA GPU (Hopper or Ada), not {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_COMPUTE_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"precision 'fp8' needs FP8 tensor cores (compute capability >= 8.9, e.g. an H100/H200), "
            f"but {name} has {capability[0]}.{capability[1]}; use precision 'auto'"
        )
    return None


class QuantizedRows(NamedTuple):
    """Activations as an FP8 linear layer takes them: q (..., K) e4m3 and scale (..., 1) fp32, a
    scale per token, x ~= q * scale."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (x_q (..., K) e4m3, scale (..., 1) fp32) with x ~= x_q * scale, a scale per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / FP8_MAX  # an all-zero row (padding) gets a tiny scale and stays zero
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def fp8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    emulate: bool = False,
    fast_accum: bool = True,
) -> torch.Tensor:
    """(x_q * x_scale) @ (w_q * w_scale)^T + bias: x_q (M, K), x_scale (M, 1), w_q (N, K), w_scale (N, 1).
    One rowwise-scaled FP8 GEMM with the bias in its epilogue (bf16 out), or with `emulate` the
    same quantized operands multiplied in fp32 (for devices without FP8 tensor cores).

    With `fast_accum` (the engine's) the GEMM keeps its sums in the tensor cores' accumulator
    throughout, rather than promoting them to full fp32 on the CUDA cores every few k-steps: on an
    H200 10-20% faster at a step's token counts, at an error against the exact product of the
    quantized operands of 1.75e-3 / 1.96e-3 (q|k|v / second feed-forward) instead of 1.67e-3 /
    1.68e-3, twenty times below the error of the quantization itself (3.7e-2)."""
    if emulate:
        return dequantize(x_q, x_scale) @ dequantize(w_q, w_scale).t() + bias.float()
    return torch._scaled_mm(
        x_q,
        w_q.t(),
        scale_a=x_scale,
        scale_b=w_scale.view(1, -1),
        bias=bias.to(torch.bfloat16),
        out_dtype=torch.bfloat16,
        use_fast_accum=fast_accum,
    )


class Fp8Linear(nn.Module):
    """A linear layer with e4m3 weights (quantized at build, a scale per output channel) whose input
    is quantized per token on each call; `gelu_in` applies the feed-forward's tanh-GELU to the
    input first (the second feed-forward layer: on CUDA the GELU and the quantization are one
    kernel, kernels/quantize.py). The output comes back in `out_dtype`."""

    def __init__(
        self,
        weight_q: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor,
        out_dtype: torch.dtype,
        gelu_in: bool = False,
    ):
        super().__init__()
        self.register_buffer("weight", weight_q)
        self.register_buffer("scale", weight_scale.float().reshape(-1, 1))
        self.register_buffer("bias", bias.detach().to(torch.bfloat16))
        self.out_dtype, self.gelu_in = out_dtype, gelu_in
        self.emulate = unsupported(weight_q.device) is not None
        self.fused_gelu = gelu_in and not self.emulate and quantize.holds_rows_of(weight_q.shape[1])

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype, gelu_in: bool = False) -> Fp8Linear:
        """From a float weight (N, K): quantized here (tests and benchmarks; builds store theirs)."""
        return cls(*quantize_rows(weight.detach()), bias, out_dtype, gelu_in)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if isinstance(x, QuantizedRows):  # quantized by the pass that produced it
            x_q, x_scale = x.q.flatten(0, -2), x.scale.flatten(0, -2)
        elif self.fused_gelu:
            x_q, x_scale = quantize.gelu_quantize_rows(x.flatten(0, -2))
        else:
            flat = x.flatten(0, -2)
            x_q, x_scale = quantize_rows(F.gelu(flat.float(), approximate="tanh") if self.gelu_in else flat)
        y = fp8_matmul(x_q, x_scale, self.weight, self.scale, self.bias, self.emulate)
        return y.to(self.out_dtype).unflatten(0, x.shape[:-1])


class QuantizedNormOut(nn.Module):
    """A DiTBlock of an FP8 engine whose output for the next block (its normalised x) comes out
    quantized for that block's q|k|v (`QuantizedRows`): the quantization joins the norm in the
    block's last pass over x. Every block but the last is one: the last one's output feeds
    proj_out, a bf16 linear. Only the first block gets its input unquantized (from DiT.flow)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.attn_norm = block.attn_norm  # DiT.condition reads each block's modulation from it

    def forward(self, *args) -> tuple[torch.Tensor, QuantizedRows]:
        x, normed = self.block(*args)
        return x, QuantizedRows(*quantize_rows(normed))


def reference_layers(block) -> dict[str, nn.Linear]:
    """The linear layers of a reference DiTBlock that an FP8 engine runs as FP8 GEMMs. The
    attention's output projection is not one: measured on an H200, its FP8 GEMM with the
    quantization of its input is no faster than the bf16 GEMM (bench/kernel_bench.py --only
    linears), and its input would be one more rounding."""
    attn, ff = block.attn, block.ff.ff
    return {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v, "ff1": ff[0][0], "ff2": ff[2]}


def block_linears(block) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The FP8 layers of a reference DiTBlock by their engine names: (weight (N, K), bias (N,)),
    q|k|v stacked as the engine's fused projection."""
    layers = reference_layers(block)
    qkv = [layers[name] for name in "qkv"]
    return {
        "qkv": (torch.cat([m.weight for m in qkv]), torch.cat([m.bias for m in qkv])),
        "ff1": (layers["ff1"].weight, layers["ff1"].bias),
        "ff2": (layers["ff2"].weight, layers["ff2"].bias),
    }


def quantize_blocks(blocks) -> dict[str, torch.Tensor]:
    """Every block's FP8 layers quantized, as stored in an engine's fp8.safetensors:
    ``{i}.{layer}.weight`` (e4m3) and ``{i}.{layer}.scale`` (fp32, one per output channel)."""
    stored = {}
    for i, block in enumerate(blocks):
        for name, (weight, _) in block_linears(block).items():
            q, scale = quantize_rows(weight.detach().float())
            stored[f"{i}.{name}.weight"], stored[f"{i}.{name}.scale"] = q.contiguous(), scale.contiguous()
    return stored
