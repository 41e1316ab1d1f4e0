"""The compiled backend: the DiT's flow step through torch.compile (Inductor), and on CUDA the
whole NFE-step ODE loop captured in one CUDA graph per length bucket.

    request of n frames ─pad to bucket N (zeros), lengths = n─> compiled step, by row lengths:
        attention sees only each row's first n keys; the position convolutions zero the padding;
        the text features are computed once a loop, each row masked to its n frames (the text
        convolutions and GRN see no padding), inside the loop's graph
    ─> the first n frames, equal to the reference's (padding changes nothing)

Engine files: ``model.safetensors`` (weights in the engine's dtype), ``compile_cache.bin``
(torch.compiler's cache artifacts: a fresh process loads the compiled kernels instead of
compiling from scratch), ``engine.json``. Why this and not AOTInductor: the same compiled step
also runs the CPU path in CI, and Dynamo's dynamic sequence length keeps one artifact for every
bucket; CUDA graphs (captured here, per bucket) remove the launch gaps either way.

What is compiled is one transformer block, reused by all 22 (regional compilation: the blocks
share their code, their weights are inputs), and the input embedding. On an H100 this runs as
fast as compiling the whole step as one graph, and builds in 13-25 s instead of 118 s and loads
in half the time (docs/performance.md). On top of what Inductor fuses:
- the time conditioning (the timestep MLP and every block's AdaLN modulation: all the step needs
  of t) is computed for the whole time grid once before the loop, one small matmul per layer
  instead of a weight-bound matrix-vector product per layer and step;
- each block ends with the next block's norm (model.DiTBlock), so the compiled block fuses it into
  its last pass over the residual stream: two element-wise kernels a block; in mixed precision the
  norm comes out in bf16 straight away (NormedInMatmulDtype);
- q, k and v come from one matmul; the feed-forward's tanh-GELU runs in its GEMM's epilogue;
- rotary positions (flag ``rope``): on CUDA (``auto``), a Triton kernel rotates q's and k's first
  head in place in the q|k|v buffer (rope_kernel.py; 2.5 us a layer instead of a 22 us copy);
  otherwise the reference's concatenation (``copy``);
- attention (flag ``attention``): on CUDA with fp16/bf16 weights (``auto``), a Triton flash-attention
  kernel reading each row's length from the device, and q, k and v by TMA where the projection left
  them (padded_attention.py; 37% less time than SDPA with a key mask at 2048 frames on an H200);
  otherwise SDPA with the key mask (``masked``);
- the position convolutions (flag ``conv``): on CUDA with fp16/bf16 weights (``auto``), one fused
  Triton kernel each (conv_kernel.py); otherwise cuDNN on channels-last data (``cudnn``);
- the guidance branches (flag ``branches``): on CUDA (``auto``) from 2048 frames a branch (rows x
  bucket), the conditioned and the unconditioned rows run on two streams inside the loop's graph,
  so each one's launch gaps and memory-bound passes overlap the other's kernels (3% faster at 2000
  frames; at 1000 frames the half-size kernels lose more than that); otherwise one batch of both
  (``batched``); ``streams`` always splits.
- Inductor's own tuning (flag ``tuning``): ``none`` by default; ``coordinate-descent`` tunes the
  tiles of the kernels Inductor generates while the engine is built, and the tuned configurations
  travel in the engine's cache artifacts, so a load does not tune again. On an H200 the replays it
  gave were no faster (interleaved with untuned ones: 2% slower at 1000 frames, even at 2000).

Precision (flag ``precision``): the ODE state (x, the Euler updates) is always fp32. ``pure`` runs
the whole step in the engine's dtype; ``mixed`` keeps the residual stream, norms and modulation in
fp32 and runs the matmuls, attention and convolutions in the engine's dtype (bf16's 8-bit mantissa
otherwise rounds the residual stream at every block). ``auto`` is mixed for bf16, pure otherwise.
"""

from __future__ import annotations

import bisect
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from indicf5 import checkpoint, model
from indicf5.backends import base, padded_attention
from indicf5.backends.base import Backend, EngineSpec
from indicf5.backends.eager import WEIGHTS, EagerBackend
from indicf5.config import TORCH_DTYPES
from indicf5.model import DiT
from indicf5.sampler import GuidedVelocity, lengths_to_mask

log = logging.getLogger(__name__)

BUCKETS = (256, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096)
COMPILE_CACHE = "compile_cache.bin"
# flag `tuning`: what Inductor tunes of the kernels it generates, as torch.compile options. With
# coordinate descent the static launcher stays off: torch 2.11 ignores a cached best config for a
# statically launched single-config kernel (pytorch/pytorch#172819), so a load would tune again.
INDUCTOR_OPTIONS = {"none": {},
                    "coordinate-descent": {"coordinate_descent_tuning": True, "use_static_cuda_launcher": False}}
BRANCH_STREAMS_FROM = 2048  # frames a guidance branch: see CompiledEngine._on_streams
FLAG_VALUES = {"precision": ("pure", "mixed"), "conv": ("auto", "triton", "cudnn"), "attention": ("auto", "padded", "masked"),
               "rope": ("auto", "kernel", "copy"), "branches": ("auto", "streams", "batched"),
               "tuning": tuple(INDUCTOR_OPTIONS)}  # the engine's; "auto" precision is the backend's


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
    low = {name: m for name, m in dit.named_modules() if isinstance(m, nn.Linear) and not name.startswith("text_embed.")}
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
            conv = F.conv2d(h.to(self.weight0.dtype), getattr(self, f"weight{i}"), getattr(self, f"bias{i}"),
                            padding=(0, self.padding), groups=self.groups)
            h = F.mish(conv.to(x.dtype))
        return h.masked_fill(~keep, 0.0).squeeze(2).transpose(1, 2)


class TritonConvPositionEmbedding(nn.Module):
    """The position convolutions as two launches of one Triton kernel (conv_kernel.py): the
    padding mask, the bias and Mish fused; CUDA only."""

    def __init__(self, reference: model.ConvPositionEmbedding, dtype: torch.dtype):
        super().__init__()
        from indicf5.backends.conv_kernel import arrange_weight

        convs = [m for m in reference.conv1d if isinstance(m, nn.Conv1d)]
        for i, conv in enumerate(convs):
            self.register_buffer(f"weight{i}", arrange_weight(conv.weight.detach(), conv.groups).to(dtype))
            self.register_buffer(f"bias{i}", conv.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor, padding: Padding) -> torch.Tensor:
        from indicf5.backends.conv_kernel import conv_mish

        lengths = padding.lengths
        return conv_mish(conv_mish(x, self.weight0, self.bias0, lengths), self.weight1, self.bias1, lengths)


class EngineAttention(nn.Module):
    """The reference's self-attention (model.Attention) as the engine runs it: q, k and v from one
    matmul of the three weights stacked; rotary positions on the first head rotated in place by
    rope_kernel.py (`rope_kernel`) or by the reference's copy; attention by row lengths
    (padded_attention.py, `by_lengths`) or SDPA with the key mask."""

    def __init__(self, attn: model.Attention, dtype: torch.dtype, by_lengths: bool, rope_kernel: bool):
        super().__init__()
        self.heads, self.dim_head = attn.heads, attn.dim_head
        self.qkv = CastLinear(torch.cat((attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)),
                              torch.cat((attn.to_q.bias, attn.to_k.bias, attn.to_v.bias)), dtype, upcast=False)
        self.to_out = attn.to_out
        self.by_lengths, self.rope_kernel = by_lengths, rope_kernel

    def forward(self, x: torch.Tensor, rope: torch.Tensor, padding: Padding) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x)  # (b, n, 3 * h * dh), in the matmul's dtype
        if self.rope_kernel:
            from indicf5.backends.rope_kernel import rotate_first_head_

            rotate_first_head_(qkv, rope, self.heads)
        q, k, v = qkv.view(b, n, 3, self.heads, self.dim_head).unbind(2)  # (b, n, h, dh) each
        if not self.rope_kernel:
            q, k = model.rotate_first_head(q, k, rope)
        if self.by_lengths:
            h = padded_attention.padded_attention(q, k, v, padding.lengths)
        else:
            h = model.sdpa_attend(q, k, v, padding.mask)
        h = self.to_out[0](h.reshape(b, n, -1))
        return h.masked_fill(~padding.mask[..., None], 0.0)  # as the reference; padded queries' output is undefined


def row_lengths(mask: torch.Tensor | None, b: int, n: int, device) -> torch.Tensor:
    """(b,) int32 real frames per row: all n when there is no mask."""
    return torch.full((b,), n, device=device, dtype=torch.int32) if mask is None else mask.sum(-1, dtype=torch.int32)


@dataclass
class GraphedLoop:
    """The Euler loop of one (bucket, batch, steps, guidance) shape, captured as one CUDA graph."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static buffers, refilled before each replay
    output: torch.Tensor

    def run(self, **values: torch.Tensor) -> torch.Tensor:
        for name, value in values.items():
            self.inputs[name].copy_(value)
        self.graph.replay()
        return self.output.clone()


class CompiledEngine(nn.Module):
    """A FlowModel (see sampler.py) whose steps run compiled, padded to buckets, and whose ODE loop
    (`integrate`) replays a CUDA graph on CUDA."""

    state_dtype = torch.float32  # the ODE state, whatever the engine computes in (see sampler.state_dtype)

    def __init__(self, dit: DiT, buckets: tuple[int, ...] = BUCKETS, cuda_graphs: bool = True, precision: str = "pure",
                 conv: str = "auto", attention: str = "auto", rope: str = "auto", branches: str = "auto",
                 tuning: str = "none"):
        super().__init__()
        device, dtype = dit.proj_out.weight.device, dit.proj_out.weight.dtype
        on_gpu, low = device.type == "cuda", dtype != torch.float32
        for flag, value in (("precision", precision), ("conv", conv), ("attention", attention), ("rope", rope), ("branches", branches),
                            ("tuning", tuning)):
            if value not in FLAG_VALUES[flag]:
                raise ValueError(f"build flag {flag} {value!r} is not one of {', '.join(FLAG_VALUES[flag])}")
        for flag, value, fast in (("conv", conv, "triton"), ("rope", rope, "kernel")):
            if value == fast and not on_gpu:
                raise ValueError(f"{flag} '{fast}' needs a CUDA device, not {device}; use {flag} 'auto'")
        if attention == "padded" and on_gpu and not low:
            raise ValueError("attention 'padded' runs an fp16/bf16 kernel on CUDA; use attention 'auto' for fp32")
        if precision == "mixed":
            dit.float()  # the low-precision copies below are made from it exactly (its values are `dtype`'s)
        self.dit, self.buckets = dit, tuple(buckets)
        self.cuda_graphs = cuda_graphs and on_gpu
        by_lengths = attention == "padded" or (attention == "auto" and on_gpu and low)
        rope_kernel = rope == "kernel" or (rope == "auto" and on_gpu)
        if branches == "streams" and not on_gpu:
            raise ValueError(f"branches 'streams' needs a CUDA device, not {device}; use branches 'auto'")
        self.branches = branches
        self.branch_stream = torch.cuda.Stream(device) if on_gpu and branches != "batched" else None
        for block in dit.transformer_blocks:
            block.attn = EngineAttention(block.attn, dtype, by_lengths, rope_kernel)
            first = block.ff.ff[0][0]
            block.ff.ff[0] = GeluLinear(first.weight, first.bias, dtype)
        first_conv = dit.input_embed.conv_pos_embed.conv1d[0]
        group_width = first_conv.in_channels // first_conv.groups  # the kernel's tile: tl.dot wants a power of two >= 16
        fits_triton = group_width >= 16 and group_width & (group_width - 1) == 0
        if conv == "triton" and not fits_triton:
            raise ValueError(f"conv 'triton' needs a power of two >= 16 channels per group, not {group_width}; use conv 'auto'")
        triton_conv = conv == "triton" or (conv == "auto" and on_gpu and low and fits_triton)
        position = TritonConvPositionEmbedding if triton_conv else ChannelsLastConvPositionEmbedding
        dit.input_embed.conv_pos_embed = position(dit.input_embed.conv_pos_embed, dtype).to(device)
        if precision == "mixed":
            matmuls_in(dit, dtype)  # the rest of the linear layers
            dit.transformer_blocks = nn.ModuleList(NormedInMatmulDtype(block, dtype) for block in dit.transformer_blocks)
        self.step_dtype = dit.proj_out.bias.dtype if precision == "pure" else torch.float32  # what flows between the matmuls
        self.embed_dtype = dit.text_embed.text_embed.weight.dtype
        for block in dit.transformer_blocks:  # one compiled block serves all: the same code, weights as inputs
            block.compile(dynamic=True, options=INDUCTOR_OPTIONS[tuning])
        dit.input_embed.compile(dynamic=True, options=INDUCTOR_OPTIONS[tuning])
        self.graphs: dict[tuple, GraphedLoop] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    def step(self, x, cond, text_emb, condition, lengths) -> torch.Tensor:
        """One flow step on bucket-padded rows: (b, N, mel) fp32 velocity."""
        d = self.step_dtype
        return self._flow(x, cond.to(d), text_emb.to(d), condition, Padding.of(lengths, x.shape[1])).float()

    def _flow(self, x, cond, text_emb, condition, padding: Padding) -> torch.Tensor:
        """DiT.flow with cond and text_emb already in the step's dtype (the loop casts them once);
        the velocity comes back in the step's dtype."""
        return self.dit.flow(x.to(self.step_dtype), cond, text_emb, condition, padding)

    def condition(self, time: torch.Tensor) -> list[torch.Tensor]:
        """DiT.condition in the step's dtype: rows of (k, d) modulations, one row per time."""
        return self.dit.condition(time.to(self.step_dtype))

    # --- FlowModel

    def embed_text(self, text: torch.Tensor, seq_len: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.dit.embed_text(text, seq_len, mask)

    def forward(self, x, cond, text_emb, time, mask=None):
        b, n, _ = x.shape
        size = bucket_for(n, self.buckets)
        pad = lambda t: F.pad(t, (0, 0, 0, size - n))  # noqa: E731
        condition = self.condition(time.expand(b))
        return self.step(pad(x), pad(cond), pad(text_emb), condition, row_lengths(mask, b, n, x.device))[:, :n]

    def integrate(self, velocity: GuidedVelocity, x0: torch.Tensor, t: torch.Tensor, on_step=None) -> torch.Tensor:
        """The Euler loop of sampler.euler, on bucket-padded inputs, as one graph replay on CUDA;
        the text is embedded in the loop's graph too (its ~60 small kernels otherwise launch one
        by one while the GPU waits)."""
        b, n, _ = x0.shape
        size = bucket_for(n, self.buckets)
        guided = velocity.cfg_strength >= 1e-5
        lengths = row_lengths(velocity.mask, b, n, x0.device)
        pad = lambda t_: F.pad(t_, (0, 0, 0, size - n))  # noqa: E731
        inputs = dict(x=pad(x0), cond=pad(velocity.cond), text=F.pad(velocity.text, (0, size - velocity.text.shape[1]), value=-1),
                      lengths=torch.cat((lengths, lengths)) if guided else lengths, t=t,
                      cfg=torch.full((), velocity.cfg_strength, device=x0.device, dtype=x0.dtype))
        if self.cuda_graphs:
            out = self._graph(size, b, len(t), guided, inputs).run(**inputs)
        else:
            out = self._loop(guided, **inputs)
        if on_step:
            for _ in range(len(t) - 1):
                on_step()
        return out[:, :n]

    def _loop(self, guided: bool, x, cond, text, lengths, t, cfg):
        """x, cond (b, N, mel) bucket-padded; text (rows, N) ids, -1 padded; lengths (rows,) of the
        rows the step sees (b, or 2b with guidance: the unconditioned rows follow)."""
        b, size = x.shape[:2]
        steps = self.condition(t[:-1])  # every step's conditioning at once: (steps, k, d) each
        d = self.step_dtype
        padding = Padding.of(lengths, size)  # the same every step
        text_emb = self.dit.embed_text(text, size, padding.mask).to(d)  # each row at its own length
        cond = (torch.cat((cond, torch.zeros_like(cond))) if guided else cond).to(d)  # guidance drops the audio condition
        split = guided and self._on_streams(b * size)
        if split:  # (conditioned, unconditioned) rows
            branches = [(cond[rows], text_emb[rows], Padding(padding.mask[rows], padding.lengths[rows]))
                        for rows in (slice(0, b), slice(b, None))]
        for i in range(len(t) - 1):
            condition = [c[i:i + 1] for c in steps]  # one row, broadcast over the batch
            if split:
                conditioned, unconditioned = self._on_two_streams(x, branches, condition)
                v = conditioned + (conditioned - unconditioned) * cfg
            else:
                out = self._flow(torch.cat((x, x)) if guided else x, cond, text_emb, condition, padding).float()
                v = out[:b] + (out[:b] - out[b:]) * cfg if guided else out
            x = x + (t[i + 1] - t[i]).to(x.dtype) * v
        return x

    def _on_streams(self, frames: int) -> bool:
        """Whether the guidance branches of `frames` frames each (rows x bucket) run on two CUDA
        streams, each one's launch gaps and memory-bound passes overlapping the other's kernels.
        ``auto`` does from BRANCH_STREAMS_FROM frames: below, kernels of half the rows lose more
        than the overlap wins (H100, docs/performance.md)."""
        if self.branch_stream is None:
            return False
        return self.branches == "streams" or frames >= BRANCH_STREAMS_FROM

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

    def _graph(self, size: int, b: int, steps: int, guided: bool, example: dict[str, torch.Tensor]) -> GraphedLoop:
        key = (size, b, steps, guided)
        if key not in self.graphs:
            start = time.perf_counter()
            static = {k: v.clone() for k, v in example.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside capture: compilation, cuBLAS/cuDNN workspaces
                self._loop(guided, **{**static, "t": static["t"][:2]})  # one step
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = self._loop(guided, **static)
            self.graphs[key] = GraphedLoop(graph, static, output)
            log.info("captured the ODE loop for %d frames x %d (%d steps) in %.1f s", size, b, steps - 1, time.perf_counter() - start)
        return self.graphs[key]

    def capture(self, steps: int = 32, guided: bool = True, batch: int = 1) -> None:
        """Capture every bucket's loop now (at load), so no request pays for it."""
        if not self.cuda_graphs:
            return
        rows = 2 * batch if guided else batch
        for size in self.buckets:
            x, cond, _, _, lengths = self.example_inputs(rows, size)
            example = dict(x=x[:batch], cond=cond[:batch], text=torch.full((rows, size), -1, device=x.device), lengths=lengths,
                           t=torch.linspace(0, 1, steps + 1, device=x.device), cfg=torch.tensor(2.0, device=x.device))
            self._graph(size, batch, steps + 1, guided, example)

    def example_inputs(self, rows: int, size: int) -> tuple:
        """Zeros shaped and typed as the loop calls the step: (x, cond, text_emb, condition, lengths)."""
        device, c = self.dit.proj_out.bias.device, self.dit.config
        zeros = lambda d, dtype: torch.zeros(rows, size, d, device=device, dtype=dtype)  # noqa: E731
        return (zeros(c.mel_dim, self.state_dtype), zeros(c.mel_dim, self.state_dtype), zeros(c.text_dim, self.embed_dtype),
                self.condition(torch.full((1,), 0.5, device=device)), torch.full((rows,), size, device=device, dtype=torch.int32))


class CompiledBackend(Backend):
    name = "compiled"
    modules = (model, checkpoint, base, Path(__file__),
               *(Path(__file__).with_name(f"{kernel}.py") for kernel in ("conv_kernel", "rope_kernel", "padded_attention")))
    engine_files = (WEIGHTS, COMPILE_CACHE)

    def default_flags(self) -> dict:
        return {"buckets": list(BUCKETS), "cuda_graphs": True, "precision": "auto", "conv": "auto", "attention": "auto", "rope": "auto",
                "branches": "auto", "tuning": "none"}

    def convert(self, export_dir: Path, dtype, out: Path) -> dict:
        return EagerBackend().convert(export_dir, dtype, out)  # the same cast weights; compiling is the build

    def engine(self, weights: Path, spec: EngineSpec, device: str) -> CompiledEngine:
        dit = DiT(spec.model)
        dit.load_state_dict(load_file(str(weights)))
        dit = dit.to(device=device, dtype=TORCH_DTYPES[spec.dtype]).eval().requires_grad_(False)
        flags = spec.build_flags
        precision = flags.get("precision", "pure")
        if precision == "auto":
            precision = "mixed" if spec.dtype == "bf16" else "pure"
        return CompiledEngine(dit, tuple(flags["buckets"]), flags["cuda_graphs"], precision, flags.get("conv", "cudnn"),
                              flags.get("attention", "masked"), flags.get("rope", "copy"), flags.get("branches", "batched"),
                              flags.get("tuning", "none"))

    def build(self, converted_dir: Path, spec: EngineSpec, out: Path) -> dict:
        """Compiles the step on the build's device (every shape the buckets need) and saves the
        compiler's cache artifacts beside the weights."""
        shutil.copyfile(converted_dir / WEIGHTS, out / WEIGHTS)
        device = spec.build_flags["device"]
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


def warm_up(engine: CompiledEngine, rows: int = 2) -> None:
    """A guided step (2 rows) at the smallest and the largest bucket: with dynamic shapes this
    compiles what every bucket needs. Other batch sizes compile on first use."""
    for size in (engine.buckets[0], engine.buckets[-1]):
        engine.step(*engine.example_inputs(rows, size))
