"""The compiled backend: the DiT's flow step through torch.compile (Inductor), and on CUDA each
(length bucket, batch size) shape's text embedding and Euler step captured as CUDA graphs.

    request of n frames ─pad to bucket N (zeros), lengths = n─> compiled step, by row lengths:
        attention sees only each row's first n keys; the position convolutions zero the padding;
        the text features are computed once a loop, each row masked to its n frames (the text
        convolutions and GRN see no padding)
    ─> the first n frames, equal to the reference's (padding changes nothing)
    b rows ─pad to the next batch size B (copies of the first row, dropped after)─> the same

Engine files: ``model.safetensors`` (weights in the engine's dtype), ``compile_cache.bin``
(torch.compiler's cache artifacts: a fresh process loads the compiled kernels instead of
compiling from scratch), ``fp8.safetensors`` for ``precision: fp8`` (the quantized block
weights and their scales), ``engine.json``. Why this and not AOTInductor: the same compiled step
also runs the CPU path in CI, and Dynamo's dynamic shapes keep one artifact for every bucket and
batch size; CUDA graphs (captured here) remove the launch gaps either way.

What is compiled is one transformer block, reused by all 22 (regional compilation: the blocks
share their code, their weights are inputs), and the input embedding: it runs as fast as
compiling the whole step as one graph, and builds and loads in a fraction of the time. On top of
what Inductor fuses:
- the time conditioning (the timestep MLP and every block's AdaLN modulation: all the step needs
  of t) is computed for the whole time grid once, one small matmul per layer instead of a
  weight-bound matrix-vector product per layer and step; the captured step reads its row;
- each block ends with the next block's norm (model.DiTBlock), so the compiled block fuses it into
  its last pass over the residual stream; in mixed precision the norm comes out in bf16 straight
  away (NormedInMatmulDtype);
- q, k and v come from one matmul; the feed-forward's tanh-GELU runs in its GEMM's epilogue;
- rotary positions: on CUDA a Triton kernel rotates q's and k's first head in place in the q|k|v
  buffer (kernels/rope.py) instead of copying all of q and k;
- attention: on CUDA with fp16/bf16 weights, a Triton flash-attention kernel that reads each row's
  length on the device, and q, k and v by TMA where the projection left them (kernels/attention.py);
  off CUDA the same op runs SDPA on each row's real tokens alone (bit-exact in any bucket and
  batch); fp32 on CUDA, SDPA with the key mask;
- the position convolutions: on CUDA with fp16/bf16 weights, one fused Triton kernel each
  (kernels/conv.py); otherwise cuDNN on channels-last data;
- the guidance branches: on CUDA from 2048 to 8192 frames a branch (rows x bucket), the
  conditioned and the unconditioned rows run on two streams inside the captured step, so each
  one's launch gaps and memory-bound passes overlap the other's kernels; below that, half-size
  kernels lose more than the overlap wins, and above it one batch of both fills the GPU better.
EngineFlags lists each choice and its ``auto`` rule; docs/performance.md has the measurements.

Serving shapes: a batch of b utterances runs as the next batch size B >= b (flag
``batch_sizes``), so a server captures every shape it can form at load (`capture`) and none
while it serves (`captures` counts them). All shapes share one set of input and output buffers
sized for ``max_tokens`` (utterances x bucket frames) and one graph memory pool, so the memory
the graphs hold is bounded by the largest shape, not the number of shapes.

Precision (flag ``precision``): the ODE state (x, the Euler updates) is always fp32. ``pure`` runs
the whole step in the engine's dtype; ``mixed`` keeps the residual stream, norms and modulation in
fp32 and runs the matmuls, attention and convolutions in the engine's dtype (bf16's 8-bit mantissa
otherwise rounds the residual stream at every block); ``fp8`` runs the blocks' linear layers as
FP8 GEMMs (fp8.py) and the rest as ``pure``; there every block but the last hands the next its
input quantized, so the last block compiles apart from the others. ``auto`` is mixed for bf16,
pure otherwise.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from indicf5 import checkpoint, model
from indicf5.backends import base
from indicf5.backends.base import Backend, EngineSpec
from indicf5.backends.compiled import fp8
from indicf5.backends.compiled.modules import (
    CastLinear,
    ChannelsLastConvPositionEmbedding,
    EngineAttention,
    GeluLinear,
    NormedInMatmulDtype,
    Padding,
    ShiftedSumDepthwiseConv,
    TritonConvPositionEmbedding,
    bucket_for,
    matmuls_in,
    row_lengths,
)
from indicf5.backends.eager import WEIGHTS, EagerBackend
from indicf5.config import TORCH_DTYPES
from indicf5.model import DiT
from indicf5.sampler import GuidedVelocity, lengths_to_mask

# With a workspace, cuBLASLt picks split-K / stream-K GEMMs for some shapes of a step, and each
# puts a Memset node (zeroing its workspace) before its GEMM in a CUDA graph, where the GPU idles
# around it: an H200's FP8 replay at 1000 frames idled 7.1 ms with the 22 memsets a step, 3.8 ms
# without. Without a workspace its GEMMs are up to 12% faster at one utterance's token counts and
# within 5% either way at a batch's (fp16 and FP8, the block's four layers at 2000-36864 tokens:
# bench/results/kernels-h200-2026-12-04-cublaslt-workspace.txt).
# torch reads the variable at its cuBLASLt calls, so it is set before any; a value the user set wins.
os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", "0")

log = logging.getLogger(__name__)

# Length buckets: 64 frames apart up to 1024, 128 up to 2048, 256 beyond, so a request pads by at
# most ~12% (and requests near a bucket edge do not pay for twice their frames).
BUCKETS = (*range(256, 1024, 64), *range(1024, 2048, 128), *range(2048, 4097, 256))
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
MAX_TOKENS = 32 * 1024  # utterances x bucket frames of the largest batch: bounds the graphs' buffers and pool
SCHEDULE_ROWS = 64  # steps of the time grid the captured step can read before the host refills them
COMPILE_CACHE = "compile_cache.bin"
BRANCH_STREAMS = (2048, 8192)  # frames a guidance branch that run on two streams: see EngineFlags.branches


class EngineFlags(BaseModel):
    """The compiled backend's build flags, each ``auto`` resolved by `resolve` for a device and
    dtype. Recorded in engine.json; a build or load with any other key or value is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    buckets: tuple[int, ...] = BUCKETS
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    max_tokens: int = MAX_TOKENS
    cuda_graphs: bool = True
    precision: Literal["auto", "pure", "mixed", "fp8"] = "auto"  # auto: mixed for bf16, else pure
    conv: Literal["auto", "triton", "cudnn"] = "auto"  # auto: triton on CUDA with fp16/bf16 weights, if the groups fit
    attention: Literal["auto", "padded", "masked"] = "auto"  # auto: padded, but masked for fp32 on CUDA
    rope: Literal["auto", "kernel", "copy"] = "auto"  # auto: kernel on CUDA
    branches: Literal["auto", "streams", "batched"] = "auto"  # auto: streams on CUDA for BRANCH_STREAMS frames
    device: str | None = None  # where the engine was built (its compiled kernels are that device's)

    @model_validator(mode="after")
    def _shapes(self) -> EngineFlags:
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be increasing frame counts, not {list(self.buckets)}")
        if not self.batch_sizes or list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] != 1:
            raise ValueError(f"batch_sizes must be increasing and start at 1, not {list(self.batch_sizes)}")
        if self.max_tokens < self.buckets[-1]:
            raise ValueError(
                f"max_tokens {self.max_tokens} must hold one utterance of the largest bucket ({self.buckets[-1]})"
            )
        return self

    @classmethod
    def parse(cls, flags: dict) -> EngineFlags:
        """From engine.json's or a build's flags, with one line naming what is wrong."""
        try:
            return cls.model_validate(flags)
        except ValidationError as e:
            err = e.errors()[0]
            name = ".".join(str(p) for p in err["loc"]) or "flags"
            if err["type"] == "literal_error":
                allowed = cls.model_fields[name].annotation.__args__
                raise ValueError(f"build flag {name} {err['input']!r} is not one of {', '.join(allowed)}") from None
            if err["type"] == "extra_forbidden":
                raise ValueError(
                    f"unknown build flag {name!r} for the compiled backend: flags are {', '.join(cls.model_fields)}"
                ) from None
            raise ValueError(f"build flag {name}: {err['msg']}") from None

    def resolve(self, device: torch.device, dtype: torch.dtype, conv_group_width: int) -> Resolved:
        """The concrete choices for an engine on `device` computing in `dtype`; refuses what cannot run there."""
        on_gpu, low = device.type == "cuda", dtype != torch.float32
        for flag, value, fast in (
            ("conv", self.conv, "triton"),
            ("rope", self.rope, "kernel"),
            ("branches", self.branches, "streams"),
        ):
            if value == fast and not on_gpu:
                raise ValueError(f"{flag} '{fast}' needs a CUDA device, not {device}; use {flag} 'auto'")
        if self.attention == "padded" and on_gpu and not low:
            raise ValueError("attention 'padded' runs an fp16/bf16 kernel on CUDA; use attention 'auto' for fp32")
        fits_triton = conv_group_width >= 16 and conv_group_width & (conv_group_width - 1) == 0  # tl.dot's tile
        if self.conv == "triton" and not fits_triton:
            raise ValueError(
                f"conv 'triton' needs a power of two >= 16 channels per group, not {conv_group_width}; use conv 'auto'"
            )
        precision = self.precision if self.precision != "auto" else "mixed" if dtype == torch.bfloat16 else "pure"
        if precision == "fp8":
            if not low:
                raise ValueError(
                    "precision 'fp8' runs inside an fp16 or bf16 engine; build it with --dtype fp16 or bf16"
                )
            if (why := fp8.unsupported(device)) is not None:
                raise ValueError(why)
        return Resolved(
            precision=precision,
            triton_conv=self.conv == "triton" or (self.conv == "auto" and on_gpu and low and fits_triton),
            by_lengths=self.attention == "padded" or (self.attention == "auto" and (low or not on_gpu)),
            rope_kernel=self.rope == "kernel" or (self.rope == "auto" and on_gpu),
            branch_streams=None
            if not on_gpu or self.branches == "batched"
            else (0, sys.maxsize)
            if self.branches == "streams"
            else BRANCH_STREAMS,
            cuda_graphs=self.cuda_graphs and on_gpu,
        )


@dataclass(frozen=True)
class Resolved:
    """EngineFlags made concrete for one device and dtype."""

    precision: Literal["pure", "mixed", "fp8"]
    triton_conv: bool
    by_lengths: bool
    rope_kernel: bool
    branch_streams: tuple[int, int] | None  # frames a guidance branch (from, to) that run on two streams; None: never
    cuda_graphs: bool

    def two_streams(self, frames: int) -> bool:
        """Whether guidance branches of `frames` frames each (rows x bucket) run on two CUDA streams."""
        return self.branch_streams is not None and self.branch_streams[0] <= frames <= self.branch_streams[1]


def engine_modules(dit: DiT, choice: Resolved, fp8_weights: dict[str, torch.Tensor] | None = None) -> None:
    """The reference's modules replaced in place by those the engine runs, as `choice` has them
    (see the module docstring); `fp8_weights` as fp8.quantize_blocks stores them, or quantized here."""
    device, dtype = dit.proj_out.weight.device, dit.proj_out.weight.dtype
    dit.requires_grad_(False)  # an engine only infers: nothing may trace a backward through its kernels
    if choice.precision == "mixed":
        dit.float()  # the low-precision copies below are made from it exactly (its values are `dtype`'s)
    if choice.precision == "fp8":
        fp8_weights = fp8_weights if fp8_weights is not None else fp8.quantize_blocks(dit.transformer_blocks)
    for i, block in enumerate(dit.transformer_blocks):
        linears = fp8.block_linears(block)
        if choice.precision == "fp8":
            layer = lambda name, out_dtype=dtype, gelu_in=False: fp8.Fp8Linear(
                fp8_weights[f"{i}.{name}.weight"].to(device),
                fp8_weights[f"{i}.{name}.scale"].to(device),
                linears[name][1],
                out_dtype,
                gelu_in,
            )
            qkv = layer("qkv")
            # the GELU between the feed-forward's layers runs with ff2's input quantization;
            # the pre-activation stays in the GEMM's bf16
            ff1, ff2 = layer("ff1", out_dtype=torch.bfloat16), layer("ff2", gelu_in=True)
        else:
            qkv = CastLinear(*linears["qkv"], dtype, upcast=False)
            ff1, ff2 = GeluLinear(*linears["ff1"], dtype), block.ff.ff[2]
        to_out = block.attn.to_out[0]  # in the engine's dtype, FP8 or not (fp8.reference_layers)
        block.attn = EngineAttention(block.attn, qkv, to_out, choice.by_lengths, choice.rope_kernel)
        block.ff.ff[0], block.ff.ff[2] = ff1, ff2
    if device.type == "cuda":
        for text_block in dit.text_embed.text_blocks:
            text_block.dwconv = ShiftedSumDepthwiseConv(text_block.dwconv)
    position = TritonConvPositionEmbedding if choice.triton_conv else ChannelsLastConvPositionEmbedding
    dit.input_embed.conv_pos_embed = position(dit.input_embed.conv_pos_embed, dtype).to(device)
    if choice.precision == "mixed":
        matmuls_in(dit, dtype)  # the rest of the linear layers
        dit.transformer_blocks = nn.ModuleList(NormedInMatmulDtype(block, dtype) for block in dit.transformer_blocks)
    if choice.precision == "fp8":  # each block quantizes the next one's q|k|v input; the last one feeds proj_out
        *blocks, last = dit.transformer_blocks
        dit.transformer_blocks = nn.ModuleList([*map(fp8.QuantizedNormOut, blocks), last])


@dataclass
class Shape:
    """The static buffers of one (bucket, batch, guided) shape: views into the engine's shared
    buffers, which its captured graphs read and write."""

    x: torch.Tensor  # (B, N, mel) fp32 the ODE state, advanced in place by the step
    cond: torch.Tensor  # (B, N, mel) fp32 the reference mel
    text: torch.Tensor  # (R, N) ids, -1 padded; R = 2B with guidance (the unconditioned rows follow)
    lengths: torch.Tensor  # (R,) int32
    mask: torch.Tensor  # (R, N) bool, from lengths
    text_emb: torch.Tensor  # (R, N, text_dim) in the step's dtype
    cond_in: torch.Tensor  # (R, N, mel) the condition the step sees (zeros for the unconditioned rows)


@dataclass
class ShapeGraphs:
    """One shape's CUDA graphs: `embed` (the text features and the condition, once a loop) and
    `step` (one guided Euler step: reads its row of the schedule, advances x and the step index)."""

    shape: Shape
    embed: torch.cuda.CUDAGraph
    step: torch.cuda.CUDAGraph


class CompiledEngine(nn.Module):
    """A FlowModel (see sampler.py) whose steps run compiled, padded to length buckets and batch
    sizes, and whose ODE loop (`integrate`) replays CUDA graphs on CUDA."""

    state_dtype = torch.float32  # the ODE state, whatever the engine computes in (see sampler.state_dtype)

    def __init__(
        self, dit: DiT, flags: EngineFlags = EngineFlags(), fp8_weights: dict[str, torch.Tensor] | None = None
    ):
        super().__init__()
        device, dtype = dit.proj_out.weight.device, dit.proj_out.weight.dtype
        first_conv = dit.input_embed.conv_pos_embed.conv1d[0]
        choice = flags.resolve(device, dtype, first_conv.in_channels // first_conv.groups)
        self.flags, self.choice = flags, choice
        self.buckets, self.batch_sizes, self.max_tokens = flags.buckets, flags.batch_sizes, flags.max_tokens
        self.cuda_graphs = choice.cuda_graphs
        self.dit = dit
        self.branch_stream = torch.cuda.Stream(device) if choice.branch_streams is not None else None
        engine_modules(dit, choice, fp8_weights)
        self.step_dtype = torch.float32 if choice.precision == "mixed" else dtype  # what flows between the matmuls
        self.embed_dtype = dit.text_embed.text_embed.weight.dtype
        for block in dit.transformer_blocks:  # one compiled block serves all: the same code, weights as inputs
            block.compile(dynamic=True)
        dit.input_embed.compile(dynamic=True)
        self.graphs: dict[tuple[int, int, bool], ShapeGraphs] = {}
        self.captures = 0  # shapes captured, ever: a server checks that serving adds none
        self.step_seconds: dict[tuple[int, int, bool], float] = {}  # a captured shape's step, measured at capture
        if self.cuda_graphs:
            self._allocate_shared(device)

    # --- one flow step

    def step(self, x, cond, text_emb, condition, lengths) -> torch.Tensor:
        """One flow step on bucket-padded rows: (b, N, mel) fp32 velocity."""
        d = self.step_dtype
        return self._flow(x, cond.to(d), text_emb.to(d), condition, Padding.of(lengths, x.shape[1])).float()

    def _flow(self, x, cond, text_emb, condition, padding: Padding) -> torch.Tensor:
        """DiT.flow with cond and text_emb already in the step's dtype (the loop casts them once);
        the velocity comes back in the step's dtype. A compiled module that would need more graphs
        than Dynamo keeps (its recompile limit) is an error here, not a module left to run eager."""
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return self.dit.flow(x.to(self.step_dtype), cond, text_emb, condition, padding)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise RuntimeError(
                f"a compiled module of the engine needed more than torch._dynamo.config.recompile_limit "
                f"({torch._dynamo.config.recompile_limit}) graphs for {tuple(x.shape)} rows: it would run uncompiled. "
                "Rerun with TORCH_LOGS=recompiles to see which guard keeps failing."
            ) from e

    def condition(self, time: torch.Tensor) -> list[torch.Tensor]:
        """DiT.condition in the step's dtype: rows of (k, d) modulations, one row per time."""
        return self.dit.condition(time.to(self.step_dtype))

    def _velocity(self, x, cond, text_emb, condition, padding: Padding, guided: bool, cfg) -> torch.Tensor:
        """The guided velocity (b, N, mel) fp32 of x (b, N, mel); cond, text_emb and padding hold
        2b rows with guidance (the unconditioned rows follow)."""
        b = x.shape[0]
        if guided and self.choice.two_streams(b * x.shape[1]):
            rows = (slice(0, b), slice(b, None))
            conditioned, unconditioned = self._on_two_streams(
                x, [(cond[r], text_emb[r], Padding(padding.mask[r], padding.lengths[r])) for r in rows], condition
            )
            return conditioned + (conditioned - unconditioned) * cfg
        out = self._flow(torch.cat((x, x)) if guided else x, cond, text_emb, condition, padding).float()
        return out[:b] + (out[:b] - out[b:]) * cfg if guided else out

    def _on_two_streams(self, x, branches, condition) -> tuple[torch.Tensor, torch.Tensor]:
        """The step of each guidance branch, the second on the branch stream: fork, run, join."""
        main, side = torch.cuda.current_stream(), self.branch_stream
        side.wait_stream(main)
        (cond, text_emb, padding), (cond_, text_emb_, padding_) = branches
        first = self._flow(x, cond, text_emb, condition, padding).float()
        with torch.cuda.stream(side):
            second = self._flow(x, cond_, text_emb_, condition, padding_).float()
        main.wait_stream(side)
        second.record_stream(main)  # made on the side stream, read and freed on main
        return first, second

    def _embed(self, guided: bool, cond, text, padding: Padding, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_emb, cond) as every step of a loop sees them, in the step's dtype: each text row
        embedded at its own length; guidance drops the audio condition of the unconditioned rows."""
        d = self.step_dtype
        text_emb = self.dit.embed_text(text, size, padding.mask).to(d)
        return text_emb, (torch.cat((cond, torch.zeros_like(cond))) if guided else cond).to(d)

    # --- FlowModel

    def embed_text(self, text: torch.Tensor, seq_len: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.dit.embed_text(text, seq_len, mask)

    def forward(self, x, cond, text_emb, time, mask=None):
        b, n, _ = x.shape
        size = bucket_for(n, self.buckets)
        pad = lambda t: F.pad(t, (0, 0, 0, size - n))
        condition = self.condition(time.expand(b))
        return self.step(pad(x), pad(cond), pad(text_emb), condition, row_lengths(mask, b, n, x.device))[:, :n]

    def integrate(self, velocity: GuidedVelocity, x0: torch.Tensor, t: torch.Tensor, on_step=None) -> torch.Tensor:
        """The Euler loop of sampler.euler on inputs padded to a bucket and a batch size (the text
        embedded once a loop, from the ids): CUDA graph replays on CUDA, the compiled step elsewhere."""
        b, n, _ = x0.shape
        size, rows = bucket_for(n, self.buckets), self.batch_size_for(b)
        guided = velocity.cfg_strength >= 1e-5
        lengths = row_lengths(velocity.mask, b, n, x0.device)
        texts = velocity.text.split(b) if guided else (velocity.text,)  # conditioned rows (, unconditioned rows)
        text = torch.cat([F.pad(pad_rows(t_, rows), (0, size - t_.shape[1]), value=-1) for t_ in texts])
        frames = lambda t_: F.pad(pad_rows(t_, rows), (0, 0, 0, size - n))
        inputs = dict(
            x=frames(x0),
            cond=frames(velocity.cond),
            text=text,
            lengths=pad_rows(lengths, rows).repeat(len(texts)),
            t=t,
            cfg=torch.full((), velocity.cfg_strength, device=x0.device, dtype=x0.dtype),
        )
        if self.cuda_graphs and rows * size <= self.max_tokens:
            with torch.cuda.device(x0.device):  # the engine's GPU, whatever the thread's current device
                out = self._replay(self._graphs_for(size, rows, guided), **inputs)
        else:
            out = self._loop(guided, **inputs)
        if on_step:
            for _ in range(len(t) - 1):
                on_step()
        return out[:b, :n]

    def batch_size_for(self, b: int) -> int:
        """The batch size b rows run as: the next of the engine's batch sizes (b beyond the largest)."""
        i = bisect.bisect_left(self.batch_sizes, b)
        return self.batch_sizes[i] if i < len(self.batch_sizes) else b

    def max_batch(self, frames: int) -> int:
        """The most utterances of `frames` frames one captured batch holds."""
        size = bucket_for(frames, self.buckets)
        return max([s for s in self.batch_sizes if s * size <= self.max_tokens], default=1)

    def _loop(self, guided: bool, x, cond, text, lengths, t, cfg):
        """The loop uncaptured. x, cond (b, N, mel) padded; text (rows, N) ids, -1 padded; lengths
        (rows,) of the rows the step sees (b, or 2b with guidance: the unconditioned rows follow)."""
        size = x.shape[1]
        steps = self.condition(t[:-1])  # every step's conditioning at once: (steps, k, d) each
        padding = Padding.of(lengths, size)  # the same every step
        text_emb, cond = self._embed(guided, cond, text, padding, size)
        for i in range(len(t) - 1):
            condition = [c[i : i + 1] for c in steps]  # one row, broadcast over the batch
            x = x + (t[i + 1] - t[i]).to(x.dtype) * self._velocity(x, cond, text_emb, condition, padding, guided, cfg)
        return x

    # --- CUDA graphs

    def _allocate_shared(self, device) -> None:
        """The buffers every captured shape reads and writes (views of them), sized for the largest
        batch (max_tokens frames, twice with guidance), and the schedule the captured step reads."""
        c, tokens = self.dit.config, 2 * self.max_tokens
        flat = lambda per_token, dtype: torch.zeros(tokens * per_token, device=device, dtype=dtype)
        self._shared = dict(
            x=flat(c.mel_dim, self.state_dtype),
            cond=flat(c.mel_dim, self.state_dtype),
            text=flat(1, torch.long),
            mask=flat(1, torch.bool),
            text_emb=flat(c.text_dim, self.step_dtype),
            cond_in=flat(c.mel_dim, self.step_dtype),
            lengths=torch.zeros(2 * max(self.batch_sizes), device=device, dtype=torch.int32),
        )
        example = self.condition(torch.zeros(1, device=device))
        self._condition_shapes = [
            tuple(m.shape[1:]) for m in example
        ]  # (k, d) of each block's modulation, then the final norm's
        self._schedule = torch.zeros(
            SCHEDULE_ROWS, sum(k * d for k, d in self._condition_shapes), device=device, dtype=example[0].dtype
        )  # a row per step: its conditions, concatenated
        self._dt = torch.zeros(SCHEDULE_ROWS, device=device, dtype=self.state_dtype)
        self._index = torch.zeros(1, device=device, dtype=torch.long)  # the step the captured step graph runs next
        self._cfg = torch.zeros((), device=device, dtype=self.state_dtype)
        self._loaded: tuple[tuple[float, ...], int] | None = None  # (time grid, first step) the schedule holds
        self._grids: dict[tuple[float, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _shape(self, size: int, rows: int, guided: bool) -> Shape:
        r, s, c = (2 if guided else 1) * rows, self._shared, self.dit.config
        view = lambda name, n_rows, *dims: s[name][: n_rows * size * (dims[0] if dims else 1)].view(n_rows, size, *dims)
        return Shape(
            x=view("x", rows, c.mel_dim),
            cond=view("cond", rows, c.mel_dim),
            text=view("text", r),
            lengths=s["lengths"][:r],
            mask=view("mask", r),
            text_emb=view("text_emb", r, c.text_dim),
            cond_in=view("cond_in", r, c.mel_dim),
        )

    def _embed_into(self, shape: Shape, guided: bool) -> None:
        """The embed graph's work: the shape's mask, text features and condition into its buffers."""
        size = shape.x.shape[1]
        shape.mask.copy_(lengths_to_mask(shape.lengths, size))
        text_emb, cond = self._embed(guided, shape.cond, shape.text, Padding(shape.mask, shape.lengths), size)
        shape.text_emb.copy_(text_emb)
        shape.cond_in.copy_(cond)

    def _step_into(self, shape: Shape, guided: bool) -> None:
        """The step graph's work: x <- x + dt_i v(x, t_i) for the schedule's row i, then i <- i + 1."""
        row = self._schedule.index_select(0, self._index)  # (1, total)
        parts = row.split([k * d for k, d in self._condition_shapes], dim=1)
        condition = [part.view(1, k, d) for part, (k, d) in zip(parts, self._condition_shapes)]
        padding = Padding(shape.mask, shape.lengths)
        v = self._velocity(shape.x, shape.cond_in, shape.text_emb, condition, padding, guided, self._cfg)
        shape.x.add_(v * self._dt.index_select(0, self._index))
        self._index.add_(1)

    def _graphs_for(self, size: int, rows: int, guided: bool) -> ShapeGraphs:
        key = (size, rows, guided)
        if key not in self.graphs:
            start = time.perf_counter()
            shape = self._shape(size, rows, guided)
            shape.lengths.fill_(size)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside capture: compilation, cuBLAS workspaces, Triton launchers
                self._embed_into(shape, guided)
                self._index.zero_()  # the step reads the schedule's row at the index: keep it in the schedule
                self._step_into(shape, guided)
            torch.cuda.current_stream().wait_stream(side)
            embed, step = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(embed, pool=self.pool):
                self._embed_into(shape, guided)
            with torch.cuda.graph(step, pool=self.pool):
                self._step_into(shape, guided)
            self.graphs[key] = ShapeGraphs(shape, embed, step)
            self.step_seconds[key] = self._time_step(step)
            self.captures += 1
            log.info(
                "captured %d frames x %d%s in %.2f s",
                size,
                rows,
                " (guided)" if guided else "",
                time.perf_counter() - start,
            )
        return self.graphs[key]

    def _time_step(self, step: torch.cuda.CUDAGraph, replays: int = 3) -> float:
        """Seconds a replay of a step graph takes (what a server weighs batch sizes by)."""
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._index.zero_()
        step.replay()
        begin.record()
        for _ in range(replays):
            step.replay()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / replays / 1e3

    def batch_seconds(self, rows: int, frames: int) -> float | None:
        """Seconds one guided step of a batch of `rows` utterances of up to `frames` frames takes,
        measured when its shape was captured; None for a shape not captured."""
        if frames > self.buckets[-1]:
            return None
        return self.step_seconds.get((bucket_for(frames, self.buckets), self.batch_size_for(rows), True))

    def _schedule_of(self, t: torch.Tensor) -> tuple[tuple[float, ...], torch.Tensor, torch.Tensor]:
        """(key, rows (steps, total), dt (steps,)) of a time grid; a grid's rows are computed once."""
        key = tuple(t.tolist())
        if key not in self._grids:
            if len(self._grids) >= 16:  # a server sees a handful of grids (steps x schedule); keep it so
                self._grids.clear()
            rows = torch.cat([m.flatten(1) for m in self.condition(t[:-1])], dim=1)
            self._grids[key] = rows, (t[1:] - t[:-1]).to(self.state_dtype)
        return key, *self._grids[key]

    def _replay(self, graphs: ShapeGraphs, x, cond, text, lengths, t, cfg) -> torch.Tensor:
        shape = graphs.shape
        for name, value in (("x", x), ("cond", cond), ("text", text), ("lengths", lengths)):
            getattr(shape, name).copy_(value)
        self._cfg.copy_(cfg)
        key, rows, dt = self._schedule_of(t)
        graphs.embed.replay()
        for first in range(0, len(dt), SCHEDULE_ROWS):
            count = min(SCHEDULE_ROWS, len(dt) - first)
            if self._loaded != (key, first):  # the schedule holds other rows than these steps'
                self._schedule[:count].copy_(rows[first : first + count])
                self._dt[:count].copy_(dt[first : first + count])
                self._loaded = (key, first)
            self._steps(graphs, count)
        return shape.x.clone()

    def _steps(self, graphs: ShapeGraphs, count: int) -> None:
        """`count` Euler steps from the schedule's first row."""
        self._index.zero_()
        for _ in range(count):
            graphs.step.replay()

    def replay(self, size: int, rows: int, steps: int, guided: bool = True) -> None:
        """The captured loop of a shape over whatever its buffers hold (benchmarks time this alone)."""
        graphs = self._graphs_for(size, rows, guided)
        graphs.embed.replay()
        self._steps(graphs, min(steps, SCHEDULE_ROWS))

    def capture(self, guided: bool = True, max_batch: int = 1) -> None:
        """Capture every shape of up to `max_batch` utterances now (at load), so that no request
        pays for it: each bucket at each batch size that fits max_tokens. A step graph serves any
        number of steps and any time grid."""
        if not self.cuda_graphs:
            return
        with torch.cuda.device(self._index.device):
            for size in self.buckets:
                for rows in self.batch_sizes:
                    if rows <= max(1, max_batch) and rows * size <= self.max_tokens:
                        self._graphs_for(size, rows, guided)

    def graph_memory_bytes(self) -> int:
        """Device memory the captured shapes hold: the shared buffers and the graphs' pool."""
        if not self.cuda_graphs:
            return 0
        buffers = sum(t.numel() * t.element_size() for t in (*self._shared.values(), self._schedule))
        pool = sum(
            segment["total_size"]
            for segment in torch.cuda.memory_snapshot()
            if tuple(segment.get("segment_pool_id", ())) == tuple(self.pool)
        )
        return buffers + pool

    def example_inputs(self, rows: int, size: int) -> tuple:
        """Zeros shaped and typed as the loop calls the step: (x, cond, text_emb, condition, lengths)."""
        device, c = self.dit.proj_out.bias.device, self.dit.config
        zeros = lambda d, dtype: torch.zeros(rows, size, d, device=device, dtype=dtype)
        return (
            zeros(c.mel_dim, self.state_dtype),
            zeros(c.mel_dim, self.state_dtype),
            zeros(c.text_dim, self.embed_dtype),
            self.condition(torch.full((1,), 0.5, device=device)),
            torch.full((rows,), size, device=device, dtype=torch.int32),
        )


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (b, ...) with copies of its first row appended up to `rows` (they compute what it does, and are dropped)."""
    b = t.shape[0]
    return t if b >= rows else torch.cat((t, t[:1].expand(rows - b, *t.shape[1:])))


class CompiledBackend(Backend):
    name = "compiled"
    modules = (
        model,
        checkpoint,
        base,
        *sorted(Path(__file__).parent.rglob("*.py")),
    )  # this package: engine, modules, fp8, kernels
    engine_files = (WEIGHTS, COMPILE_CACHE)

    def default_flags(self) -> dict:
        return EngineFlags().model_dump(mode="json", exclude={"device"})

    def convert(self, export_dir: Path, dtype, out: Path) -> dict:
        return EagerBackend().convert(export_dir, dtype, out)  # the same cast weights; compiling is the build

    def engine(self, weights: Path, spec: EngineSpec, device: str) -> CompiledEngine:
        flags = EngineFlags.parse(spec.build_flags)
        dit = DiT(spec.model)
        dit.load_state_dict(load_file(str(weights)))
        dit = dit.to(device=device, dtype=TORCH_DTYPES[spec.dtype]).eval().requires_grad_(False)
        quantized = weights.with_name(fp8.FP8_FILE)
        return CompiledEngine(dit, flags, load_file(str(quantized)) if quantized.is_file() else None)

    def build(self, converted_dir: Path, spec: EngineSpec, out: Path) -> dict:
        """Compiles the step on the build's device (every shape the buckets need) and saves the
        compiler's cache artifacts beside the weights; an fp8 engine also stores its quantized weights."""
        shutil.copyfile(converted_dir / WEIGHTS, out / WEIGHTS)
        device = spec.build_flags["device"]
        if EngineFlags.parse(spec.build_flags).precision == "fp8":  # quantized once, here; loads read them
            reference = DiT(spec.model)
            reference.load_state_dict(load_file(str(out / WEIGHTS)))
            save_file(fp8.quantize_blocks(reference.transformer_blocks), str(out / fp8.FP8_FILE))
        engine = self.engine(out / WEIGHTS, spec, device)
        start = time.perf_counter()
        with torch.inference_mode():
            warm_up(engine)
            engine.capture()  # capturing every bucket compiles what warm-up did not: save that too
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            raise RuntimeError("torch.compile produced no cache artifacts to save")
        (out / COMPILE_CACHE).write_bytes(artifacts[0])
        return {"compile_seconds": time.perf_counter() - start, "device": device}

    def load(self, engine_dir: Path, spec: EngineSpec, device: str) -> CompiledEngine:
        built_on = spec.build_flags.get("device")
        if built_on != device:
            log.warning("engine compiled on %s, loaded on %s: it will compile again", built_on, device)
        torch.compiler.load_cache_artifacts((engine_dir / COMPILE_CACHE).read_bytes())
        engine = self.engine(engine_dir / WEIGHTS, spec, device)
        with torch.inference_mode():
            warm_up(engine)
            engine.capture()
        return engine


def warm_up(engine: CompiledEngine) -> None:
    """Guided steps at the smallest bucket at every batch size, and at the largest bucket: with
    dynamic shapes this compiles every graph Dynamo's guards split the shapes into (on the CPU the
    position convolutions split batches at 16 rows), so that serving compiles nothing."""
    for rows in engine.batch_sizes:
        engine.step(*engine.example_inputs(2 * rows, engine.buckets[0]))
    engine.step(*engine.example_inputs(2, engine.buckets[-1]))
