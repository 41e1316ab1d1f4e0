"""Kernels of the flow step by each implementation, at IndicF5's width, on one GPU in one run
(a guided step: 2 rows with padding at the end). Prints the median ms, TFLOP/s and relL2 against
the fp32 reference.

- The convolutional position embedding (two grouped convolutions, kernel 31, 16 groups, Mish,
  padding masked): cuDNN on channels-last data (with and without cudnn.benchmark), cuDNN on
  (b, d, n) data with the transposes, the fused Triton kernel (kernels/conv.py) at several tiles.
- Attention (16 heads of 64), per layer in a CUDA graph of 22: SDPA with the key-padding mask,
  the engine's Triton kernel (kernels/attention.py) on contiguous q/k/v and on views of the q|k|v
  buffer, and on the views at 24 tiles, FA2 with per-row key lengths, the bias-channel trick, and
  SDPA (or cuDNN alone) without a mask (the ceiling, not exact).
- Rotary positions on the first head: the compiled copy against the in-place kernel (kernels/rope.py).
- The block's linear layers (q|k|v, output, the feed-forward's two) at a step's token count: the
  fp16 GEMM against FP8 (fp8.py): the layer quantizing its own input, the GEMM alone on an input
  quantized upstream (with the engine's fast accumulation, and with split accumulation), and the
  quantization alone; each compiled, per call in a graph of 22.

    python bench/kernel_bench.py [--frames 1024 2048] [--dtype fp16 bf16] [--only attention rope linears] \
        [--tokens 2048 36864]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indicf5.backends.compiled import fp8
from indicf5.backends.compiled.kernels import conv as conv_kernel
from indicf5.backends.compiled.kernels.attention import attend, padded_attention
from indicf5.backends.compiled.kernels.rope import rotate_first_head_
from indicf5.backends.compiled.modules import (
    CastLinear,
    ChannelsLastConvPositionEmbedding,
    GeluLinear,
    Padding,
    TritonConvPositionEmbedding,
)
from indicf5.config import TORCH_DTYPES
from indicf5.model import ConvPositionEmbedding, rope_angles, rope_inv_freq, rotate_first_head, sdpa_attend
from indicf5.sampler import lengths_to_mask


def median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_ms(fn, calls: int = 22, replays: int = 20) -> float:
    """Milliseconds per call of `fn`, run `calls` times back to back in one CUDA graph (as in the
    engine's loop, so no launch gaps count)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, replays) / calls


def bench_attention(n: int, dtype_name: str, heads: int = 16, dim_head: int = 64, padding: int = 48) -> None:
    """A guided step's attention (2 rows, the last `padding` frames padded), timed per layer in a
    graph of 22; relL2 over the real frames against fp32 SDPA with the key mask."""
    dtype = TORCH_DTYPES[dtype_name]
    b, length = 2, n - padding
    qkv = torch.randn(b, n, 3, heads, dim_head, device="cuda")
    q, k, v = qkv.unbind(2)
    lengths = torch.full((b,), length, device="cuda", dtype=torch.int32)
    mask = lengths_to_mask(lengths, n)
    want = sdpa_attend(q, k, v, mask)[:, :length]
    flops = 4 * b * heads * n * n * dim_head
    qkv_d = qkv.to(dtype)  # the fused projection's output, (b, n, 3, h, dh)
    qd, kd, vd = (t.contiguous() for t in qkv_d.unbind(2))
    tokens = lambda t: t.flatten(0, 1)  # (b * n, h, dh) views
    seq_starts = torch.arange(b + 1, device="cuda", dtype=torch.int32) * n

    def bias_channel(width: int = 72):
        """Exact without a mask: q and k get one more channel, 1 on q and -30000 on padded keys (the
        score's exp underflows to 0 in fp32), and zeros up to `width`; v stays as it is."""
        extra = width - dim_head
        q2 = torch.cat((qd, torch.ones_like(qd[..., :1]), torch.zeros_like(qd[..., : extra - 1])), -1)
        key_bias = torch.where(mask, 0.0, -30000.0).to(dtype)[:, :, None, None].expand(b, n, heads, 1)
        k2 = torch.cat((kd, key_bias, torch.zeros_like(kd[..., : extra - 1])), -1)
        return lambda: F.scaled_dot_product_attention(
            q2.transpose(1, 2), k2.transpose(1, 2), vd.transpose(1, 2), scale=dim_head**-0.5
        ).transpose(1, 2)

    variants = {
        "sdpa, key mask (before)": lambda: sdpa_attend(qd, kd, vd, mask),
        "sdpa, no mask (ceiling, inexact)": lambda: sdpa_attend(qd, kd, vd),
        "cudnn only, no mask (inexact)": lambda: only(SDPBackend.CUDNN_ATTENTION, qd, kd, vd),
        "padded (the kernel)": lambda: padded_attention(qd, kd, vd, lengths),
        "padded, on q|k|v views": lambda: padded_attention(*qkv_d.unbind(2), lengths),
        "flash varlen, seqused_k": lambda: torch.ops.aten._flash_attention_forward(
            tokens(qd), tokens(kd), tokens(vd), seq_starts, seq_starts, n, n, 0.0, False, False, seqused_k=lengths
        )[0].view(b, n, heads, -1),
        "bias channel, q/k 72 wide": bias_channel(),
        **{
            f"padded, views, {bm}x{bn} tiles {w}w {st}s": (
                lambda bm=bm, bn=bn, w=w, st=st: attend(*qkv_d.unbind(2), lengths, bm, bn, w, st)
            )
            for bm in (64, 128)
            for bn in (64, 128)
            for w in (4, 8)
            for st in (2, 3, 4)
        },
    }
    for name, fn in variants.items():
        try:
            got = fn()
            ms = graph_ms(fn)
        except Exception as e:  # a kernel that refuses these inputs or the graph
            print(f"{dtype_name} {n:5} frames  attention {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rel = float((got.float()[:, :length] - want).norm() / want.norm())
        print(
            f"{dtype_name} {n:5} frames  attention {name:34} {ms:7.4f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  "
            f"relL2 {rel:.2e}",
            flush=True,
        )
    full = padded_attention(qd, kd, vd, torch.full((b,), n, device="cuda", dtype=torch.int32)).float()
    want_full = sdpa_attend(q, k, v)
    print(
        f"{dtype_name} {n:5} frames  attention padded, rows without padding: relL2 "
        f"{float((full - want_full).norm() / want_full.norm()):.2e}",
        flush=True,
    )


def only(backend, q, k, v):
    with sdpa_kernel([backend]):
        return sdpa_attend(q, k, v)


def bench_rope(n: int, dtype_name: str, heads: int = 16, dim_head: int = 64) -> None:
    """Rotary positions on the first head: the reference's concatenation compiled by Inductor (a
    copy of q and k) against the in-place kernel, per layer in a graph of 22."""
    dtype = TORCH_DTYPES[dtype_name]
    qkv = torch.randn(2, n, 3 * heads * dim_head, device="cuda", dtype=dtype)
    angles = rope_angles(n, rope_inv_freq(dim_head).cuda())
    copy = torch.compile(lambda t: rotate_first_head(*t.view(2, n, 3, heads, dim_head).unbind(2)[:2], angles))
    want = copy(qkv)
    rotated = qkv.clone()
    rotate_first_head_(rotated, angles, heads)
    got = rotated.view(2, n, 3, heads, dim_head).unbind(2)[:2]
    err = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
    for name, fn in {
        "rope, compiled copy (before)": lambda: copy(qkv),
        "rope, in-place kernel": lambda: rotate_first_head_(qkv, angles, heads),
    }.items():
        print(f"{dtype_name} {n:5} frames  {name:44} {graph_ms(fn):7.4f} ms  max |diff| {err:.1e}", flush=True)


def bench_conv(n: int, dtype_name: str, reference: ConvPositionEmbedding) -> None:
    dim, dtype = reference.conv1d[0].in_channels, TORCH_DTYPES[dtype_name]
    channels_last = ChannelsLastConvPositionEmbedding(reference, dtype).cuda()
    ncl = ConvPositionEmbedding(dim).cuda().eval().to(dtype)
    ncl.load_state_dict(reference.state_dict())
    triton_conv = TritonConvPositionEmbedding(reference, dtype).cuda()
    x = torch.randn(2, n, dim, device="cuda")
    lengths = torch.full((2,), n - 24, device="cuda", dtype=torch.int32)
    padding = Padding.of(lengths, n)
    flops = 2 * 2 * 2 * n * dim * (dim // 16) * 31
    want = reference(x, padding.mask)
    xd = x.to(dtype)
    variants = {
        "cudnn channels-last": lambda: channels_last(xd, padding),
        "cudnn (b, d, n) + transposes": lambda: ncl(xd, padding.mask),
        **{
            f"triton {bt} frames x {w} warps": (
                lambda bt=bt, w=w: conv_kernel.conv_mish(
                    conv_kernel.conv_mish(xd, triton_conv.weight0, triton_conv.bias0, lengths, bt, w),
                    triton_conv.weight1,
                    triton_conv.bias1,
                    lengths,
                    bt,
                    w,
                )
            )
            for bt in (64, 128, 256)
            for w in (4, 8)
        },
    }
    for name, fn in variants.items():
        for benchmark in (False, True) if name.startswith("cudnn") else (False,):
            torch.backends.cudnn.benchmark = benchmark
            try:
                got = fn()
                ms = median_ms(fn)
            except Exception as e:  # one failing variant must not hide the others
                print(f"{dtype_name} {n:5} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            rel = float((got.float() - want).norm() / want.norm())
            label = name + (" [cudnn.benchmark]" if benchmark else "")
            print(
                f"{dtype_name} {n:5} frames  {label:40} {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  relL2 {rel:.2e}",
                flush=True,
            )
    torch.backends.cudnn.benchmark = False


def bench_linears(tokens: int, dim: int = 1024, ff_mult: int = 2) -> None:
    """The block's four linear layers at `tokens` rows: fp16 (GELU in the epilogue for the first
    feed-forward layer) against FP8 rowwise-scaled GEMMs (bf16 out), per call in a graph of 22;
    relL2 against the fp32 layer."""
    hidden = dim * ff_mult
    for name, k, n, gelu, gelu_in in (  # gelu: on the output (fp16's epilogue); gelu_in: the input's
        ("qkv", dim, 3 * dim, False, False),
        ("out", dim, dim, False, False),
        ("ff1 (+gelu)", dim, hidden, True, False),
        ("ff2 (gelu in)", hidden, dim, False, True),
    ):
        weight, bias = torch.randn(n, k, device="cuda") / k**0.5, torch.randn(n, device="cuda") / 10
        x = torch.randn(tokens, k, device="cuda")
        if gelu_in:
            x = F.gelu(x, approximate="tanh")  # what the second layer multiplies
        want = F.linear(x, weight, bias)
        want = F.gelu(want, approximate="tanh") if gelu else want
        x16 = x.half()
        fp16 = (GeluLinear if gelu else CastLinear)(weight, bias, torch.float16, upcast=False).cuda()
        layer = fp8.Fp8Linear.of(weight, bias, torch.bfloat16)
        quantize = torch.compile(fp8.quantize_rows, dynamic=False)
        quantized = fp8.QuantizedRows(*quantize(x16))
        variants = {
            "fp16 GEMM": torch.compile(lambda: fp16(x16), dynamic=False),
            "fp8, quantize + GEMM": torch.compile(lambda: layer(x16), dynamic=False),
            "fp8, GEMM of a quantized input": torch.compile(lambda: layer(quantized), dynamic=False),
            "fp8, the same, split accumulation": lambda: fp8.fp8_matmul(
                *quantized, layer.weight, layer.scale, layer.bias, fast_accum=False
            ),
            "fp8, quantize alone": lambda: quantize(x16),
        }
        for label, fn in variants.items():
            got = fn()
            ms = graph_ms(fn)
            if isinstance(got, tuple):
                rel = float((fp8.dequantize(*got) - x).norm() / x.norm())
            else:
                got = F.gelu(got.float(), approximate="tanh") if gelu and label.startswith("fp8") else got.float()
                rel = float((got - want).norm() / want.norm())
            flops = 2 * tokens * k * n
            print(
                f"{tokens:6} tokens  linear {name:14} {label:32} {ms * 1000:8.2f} us  {flops / ms / 1e9:6.1f} TFLOP/s"
                f"  relL2 {rel:.2e}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument(
        "--only", nargs="+", choices=["conv", "attention", "rope", "linears"], default=["conv", "attention", "rope"]
    )
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 36864], help="rows of the linear layers")
    args = ap.parse_args()
    torch.manual_seed(0)
    reference = ConvPositionEmbedding(args.dim).cuda().eval()
    with torch.inference_mode():
        for dtype_name in args.dtype:
            for n in args.frames:
                if "conv" in args.only:
                    bench_conv(n, dtype_name, reference)
                if "attention" in args.only:
                    bench_attention(n, dtype_name)
                if "rope" in args.only:
                    bench_rope(n, dtype_name)
        if "linears" in args.only:
            # each token count compiles the variants' lambdas again: a fresh Dynamo state per count
            # keeps them under its recompile limit, past which they would be timed uncompiled
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                for tokens in args.tokens:
                    torch._dynamo.reset()
                    bench_linears(tokens, args.dim)


if __name__ == "__main__":
    main()
