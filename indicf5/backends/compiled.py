"""The compiled backend: the DiT's flow step through torch.compile (Inductor), and on CUDA the
whole NFE-step ODE loop captured in one CUDA graph per length bucket.

    request of n frames ─pad to bucket N (zeros), lengths = n─> compiled step, masked:
        attention sees only each row's first n keys; the position convolutions zero the padding;
        the text features are computed once at the true length (GRN sees no padding)
    ─> the first n frames, equal to the reference's (padding changes nothing)

Engine files: ``model.safetensors`` (weights in the engine's dtype), ``compile_cache.bin``
(torch.compiler's cache artifacts: a fresh process loads the compiled kernels instead of
compiling from scratch), ``engine.json``. Why this and not AOTInductor: the same compiled step
also runs the CPU path in CI, and Dynamo's dynamic sequence length keeps one artifact for every
bucket; CUDA graphs (captured here, per bucket) remove the launch gaps either way.

Attention is SDPA with a key-padding mask (on an H100 as fast as flash attention in its
variable-length form, measured: docs/performance.md), or cuDNN's fused attention (flag
``attention: cudnn``); q, k, v come from one fused matmul.
"""

from __future__ import annotations

import bisect
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from indicf5 import checkpoint, model
from indicf5.backends import base
from indicf5.backends.base import Backend, EngineSpec
from indicf5.backends.eager import WEIGHTS, EagerBackend
from indicf5.config import TORCH_DTYPES
from indicf5.model import DiT, sdpa_attend
from indicf5.sampler import GuidedVelocity

log = logging.getLogger(__name__)

BUCKETS = (256, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096)
COMPILE_CACHE = "compile_cache.bin"


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} frames exceed the engine's largest bucket ({buckets[-1]})")
    return buckets[i]


def cudnn_attend(q, k, v, mask=None):
    """model.sdpa_attend through cuDNN's fused attention (Hopper), the padding as an additive bias."""
    bias = None if mask is None else torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, float("-inf"))[:, None, None, :]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return h.transpose(1, 2)


ATTENTION = {"sdpa": sdpa_attend, "cudnn": cudnn_attend}


class FusedQKV(nn.Module):
    """q, k and v from one matmul of the three weights stacked: one larger GEMM instead of three."""

    def __init__(self, attn: model.Attention):
        super().__init__()
        self.register_buffer("weight", torch.cat((attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)).detach())
        self.register_buffer("bias", torch.cat((attn.to_q.bias, attn.to_k.bias, attn.to_v.bias)).detach())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return F.linear(x, self.weight, self.bias).chunk(3, dim=-1)


class ChannelsLastConvPositionEmbedding(nn.Module):
    """The position convolutions on (b, n, d) data without transposing it: viewed as a
    (b, d, 1, n) image it is already channels-last, which cuDNN convolves as it is."""

    def __init__(self, reference: model.ConvPositionEmbedding):
        super().__init__()
        convs = [m for m in reference.conv1d if isinstance(m, nn.Conv1d)]
        self.groups, self.padding = convs[0].groups, convs[0].padding[0]
        for i, conv in enumerate(convs):
            self.register_buffer(f"weight{i}", conv.weight.detach().unsqueeze(2).contiguous(memory_format=torch.channels_last))
            self.register_buffer(f"bias{i}", conv.bias.detach().clone())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x.transpose(1, 2).unsqueeze(2)  # (b, d, 1, n), a view: channels-last memory
        keep = None if mask is None else mask[:, None, None, :]
        for i in range(2):
            if keep is not None:
                h = h.masked_fill(~keep, 0.0)
            h = F.mish(F.conv2d(h, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"), padding=(0, self.padding), groups=self.groups))
        if keep is not None:
            h = h.masked_fill(~keep, 0.0)
        return h.squeeze(2).transpose(1, 2)


def row_lengths(mask: torch.Tensor | None, b: int, n: int, device) -> torch.Tensor:
    """(b,) real frames per row: all n when there is no mask."""
    return torch.full((b,), n, device=device) if mask is None else mask.sum(-1)


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

    def __init__(self, dit: DiT, buckets: tuple[int, ...] = BUCKETS, cuda_graphs: bool = True, attention: str = "sdpa"):
        super().__init__()
        device = dit.proj_out.weight.device
        self.dit, self.buckets = dit, tuple(buckets)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        for block in dit.transformer_blocks:
            block.attn.project = FusedQKV(block.attn)
            block.attn.attend = ATTENTION[attention]
        dit.input_embed.conv_pos_embed = ChannelsLastConvPositionEmbedding(dit.input_embed.conv_pos_embed).to(device)
        self.step = torch.compile(self._masked_step, dynamic=True)
        self.graphs: dict[tuple, GraphedLoop] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    def _masked_step(self, x, cond, text_emb, time, lengths):
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        return self.dit(x, cond, text_emb, time, mask)

    # --- FlowModel

    def embed_text(self, text: torch.Tensor, seq_len: int) -> torch.Tensor:
        return self.dit.embed_text(text, seq_len)  # once per utterance, at its true length

    def forward(self, x, cond, text_emb, time, mask=None):
        b, n, _ = x.shape
        size = bucket_for(n, self.buckets)
        pad = lambda t: F.pad(t, (0, 0, 0, size - n))  # noqa: E731
        return self.step(pad(x), pad(cond), pad(text_emb), time.expand(b), row_lengths(mask, b, n, x.device))[:, :n]

    def integrate(self, velocity: GuidedVelocity, x0: torch.Tensor, t: torch.Tensor, on_step=None) -> torch.Tensor:
        """The Euler loop of sampler.euler, on bucket-padded inputs, as one graph replay on CUDA."""
        b, n, _ = x0.shape
        size = bucket_for(n, self.buckets)
        guided = velocity.cfg_strength >= 1e-5
        lengths = row_lengths(velocity.mask, b, n, x0.device)
        cond = torch.cat((velocity.cond, torch.zeros_like(velocity.cond))) if guided else velocity.cond
        pad = lambda t_: F.pad(t_, (0, 0, 0, size - n))  # noqa: E731
        inputs = dict(x=pad(x0), cond=pad(cond), text_emb=pad(velocity.text_emb),
                      lengths=torch.cat((lengths, lengths)) if guided else lengths, t=t,
                      cfg=torch.tensor(velocity.cfg_strength, device=x0.device, dtype=x0.dtype))
        if self.cuda_graphs:
            out = self._graph(size, b, len(t), guided, inputs).run(**inputs)
        else:
            out = self._loop(guided, **inputs)
        if on_step:
            for _ in range(len(t) - 1):
                on_step()
        return out[:, :n]

    def _loop(self, guided: bool, x, cond, text_emb, lengths, t, cfg):
        b = x.shape[0]
        rows = 2 * b if guided else b
        for i in range(len(t) - 1):
            out = self.step(torch.cat((x, x)) if guided else x, cond, text_emb, t[i].to(x.dtype).expand(rows), lengths)
            v = out[:b] + (out[:b] - out[b:]) * cfg if guided else out
            x = x + (t[i + 1] - t[i]).to(x.dtype) * v
        return x

    def _graph(self, size: int, b: int, steps: int, guided: bool, example: dict[str, torch.Tensor]) -> GraphedLoop:
        key = (size, b, steps, guided)
        if key not in self.graphs:
            start = time.perf_counter()
            static = {k: v.clone() for k, v in example.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside capture: compilation, cuBLAS/cuDNN workspaces
                self._loop(guided, **static)
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
        p = self.dit.proj_out.weight
        mel, text_dim = self.dit.config.mel_dim, self.dit.config.text_dim
        rows = 2 * batch if guided else batch
        for size in self.buckets:
            example = dict(x=torch.zeros(batch, size, mel, device=p.device, dtype=p.dtype),
                           cond=torch.zeros(rows, size, mel, device=p.device, dtype=p.dtype),
                           text_emb=torch.zeros(rows, size, text_dim, device=p.device, dtype=p.dtype),
                           lengths=torch.full((rows,), size, device=p.device), t=torch.linspace(0, 1, steps + 1, device=p.device),
                           cfg=torch.tensor(2.0, device=p.device, dtype=p.dtype))
            self._graph(size, batch, steps + 1, guided, example)


class CompiledBackend(Backend):
    name = "compiled"
    modules = (model, checkpoint, base)
    engine_files = (WEIGHTS, COMPILE_CACHE)

    def default_flags(self) -> dict:
        return {"buckets": list(BUCKETS), "cuda_graphs": True, "attention": "sdpa"}

    def convert(self, export_dir: Path, dtype, out: Path) -> dict:
        return EagerBackend().convert(export_dir, dtype, out)  # the same cast weights; compiling is the build

    def engine(self, weights: Path, spec: EngineSpec, device: str) -> CompiledEngine:
        dit = DiT(spec.model)
        dit.load_state_dict(load_file(str(weights)))
        dit = dit.to(device=device, dtype=TORCH_DTYPES[spec.dtype]).eval().requires_grad_(False)
        flags = spec.build_flags
        return CompiledEngine(dit, tuple(flags["buckets"]), flags["cuda_graphs"], flags.get("attention", "sdpa"))

    def build(self, converted_dir: Path, spec: EngineSpec, out: Path) -> dict:
        """Compiles the step on the build's device (every shape the buckets need) and saves the
        compiler's cache artifacts beside the weights."""
        shutil.copyfile(converted_dir / WEIGHTS, out / WEIGHTS)
        device = spec.build_flags["device"]
        engine = self.engine(out / WEIGHTS, spec, device)
        start = time.perf_counter()
        with torch.inference_mode():
            warm_up(engine, spec)
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
            warm_up(engine, spec)
            engine.capture()
        return engine


def warm_up(engine: CompiledEngine, spec: EngineSpec, rows: int = 2) -> None:
    """A guided step (2 rows) at the smallest and the largest bucket: with dynamic shapes this
    compiles what every bucket needs. Other batch sizes compile on first use."""
    p = engine.dit.proj_out.weight
    for size in (engine.buckets[0], engine.buckets[-1]):
        zeros = lambda d: torch.zeros(rows, size, d, device=p.device, dtype=p.dtype)  # noqa: E731
        engine.step(zeros(spec.model.mel_dim), zeros(spec.model.mel_dim), zeros(spec.model.text_dim),
                    torch.full((rows,), 0.5, device=p.device, dtype=p.dtype), torch.full((rows,), size, device=p.device))
