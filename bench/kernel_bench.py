"""Two kernels of the flow step by each implementation, at IndicF5's width, on one GPU in one run
(a guided step: 2 rows, the last 24 frames padding). Prints the median ms, TFLOP/s and relL2
against the fp32 reference.

- The convolutional position embedding (two grouped convolutions, kernel 31, 16 groups, Mish,
  padding masked): cuDNN on channels-last data (with and without cudnn.benchmark), cuDNN on
  (b, d, n) data with the transposes, the fused Triton kernel (conv_kernel.py) at several tiles.
- Attention (16 heads of 64): SDPA with the key-padding mask as the engine calls it, and each
  SDPA backend without a mask (the ceiling a mask-free kernel would have).

    python bench/kernel_bench.py [--frames 1024 2048] [--dtype fp16 bf16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indicf5.backends import conv_kernel  # noqa: E402
from indicf5.backends.compiled import ChannelsLastConvPositionEmbedding, TritonConvPositionEmbedding  # noqa: E402
from indicf5.config import TORCH_DTYPES  # noqa: E402
from indicf5.model import ConvPositionEmbedding, sdpa_attend  # noqa: E402


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


def bench_attention(n: int, dtype_name: str, heads: int = 16, dim_head: int = 64) -> None:
    dtype = TORCH_DTYPES[dtype_name]
    q, k, v = (torch.randn(2, n, heads, dim_head, device="cuda") for _ in range(3))
    mask = torch.arange(n, device="cuda")[None] < torch.tensor([n - 24, n - 24], device="cuda")[:, None]
    flops = 4 * 2 * heads * n * n * dim_head
    want = {True: sdpa_attend(q, k, v, mask), False: sdpa_attend(q, k, v)}
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))

    def only(backend):
        def run(mask=None):
            with sdpa_kernel([backend]):
                return sdpa_attend(qd, kd, vd, mask)
        return run

    variants = {"sdpa, key mask (the engine's call)": (lambda: sdpa_attend(qd, kd, vd, mask), True),
                "sdpa, no mask": (lambda: sdpa_attend(qd, kd, vd), False),
                **{f"{b.name.lower()} only, no mask": (only(b), False) for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                                                                 SDPBackend.EFFICIENT_ATTENTION)},
                **{f"{b.name.lower()} only, key mask": ((lambda b=b: only(b)(mask)), True) for b in (SDPBackend.CUDNN_ATTENTION,
                                                                                                   SDPBackend.EFFICIENT_ATTENTION)}}
    for name, (fn, masked) in variants.items():
        try:
            got = fn()
            ms = median_ms(fn)
        except Exception as e:  # a backend that refuses these inputs
            print(f"{dtype_name} {n:5} attention {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows = slice(0, n - 24) if masked else slice(None)
        rel = float((got.float()[:, rows] - want[masked][:, rows]).norm() / want[masked][:, rows].norm())
        print(f"{dtype_name} {n:5} frames  attention {name:34} {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  relL2 {rel:.2e}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--dim", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    reference = ConvPositionEmbedding(args.dim).cuda().eval()
    for dtype_name in args.dtype:
        dtype = TORCH_DTYPES[dtype_name]
        channels_last = ChannelsLastConvPositionEmbedding(reference, dtype).cuda()
        ncl = ConvPositionEmbedding(args.dim).cuda().eval().to(dtype)
        ncl.load_state_dict(reference.state_dict())
        triton_conv = TritonConvPositionEmbedding(reference, dtype).cuda()
        for n in args.frames:
            x = torch.randn(2, n, args.dim, device="cuda")
            mask = torch.arange(n, device="cuda")[None] < torch.tensor([n - 24, n - 24], device="cuda")[:, None]
            lengths = mask.sum(-1).to(torch.int32)
            flops = 2 * 2 * 2 * n * args.dim * (args.dim // 16) * 31
            with torch.inference_mode():
                want = reference(x, mask)
                xd = x.to(dtype)
                variants = {
                    "cudnn channels-last": lambda: channels_last(xd, mask),
                    "cudnn (b, d, n) + transposes": lambda: ncl(xd, mask),
                    **{f"triton {bt} frames x {w} warps": (lambda bt=bt, w=w: conv_kernel.conv_mish(
                        conv_kernel.conv_mish(xd, triton_conv.weight0, triton_conv.bias0, lengths, bt, w),
                        triton_conv.weight1, triton_conv.bias1, lengths, bt, w))
                       for bt in (64, 128, 256) for w in (4, 8)},
                }
                for name, fn in list(variants.items()):
                    for benchmark in ((False, True) if name.startswith("cudnn") else (False,)):
                        torch.backends.cudnn.benchmark = benchmark
                        try:
                            got = fn()
                            ms = median_ms(fn)
                        except Exception as e:  # one failing variant must not hide the others
                            print(f"{dtype_name} {n:5} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                            continue
                        rel = float((got.float() - want).norm() / want.norm())
                        label = name + (" [cudnn.benchmark]" if benchmark else "")
                        print(f"{dtype_name} {n:5} frames  {label:40} {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  relL2 {rel:.2e}",
                              flush=True)
                torch.backends.cudnn.benchmark = False
                bench_attention(n, dtype_name)


if __name__ == "__main__":
    main()
