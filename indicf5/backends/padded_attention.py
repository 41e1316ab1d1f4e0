"""Attention over bucket-padded rows, exactly, two ways: by cuDNN's padding mask
(`padded_attention`), or by cuDNN's unmasked kernel on zeroed padding, rescaled
(`rescaled_attention`).

The compiled engine pads a request of n frames to its bucket N. SDPA with a (b, 1, 1, N) boolean
key mask runs cuDNN's kernel with a bias read for every score, at about 60% of the rate of the
unmasked kernel on an H100 (bench/kernel_bench.py). cuDNN's own padding mask (``seq_len_q``,
``seq_len_kv``) takes the lengths instead; PyTorch's SDPA does not expose it, so this module
builds the cuDNN graph through cuDNN's Python frontend (nvidia-cudnn-frontend), once per shape,
dtype and layout, and runs it inside a custom op. q, k and v may be strided views (of the fused
q|k|v projection): cuDNN reads them where they are. The lengths live on the device, so the op is
captured in CUDA graphs and one graph serves every length in a bucket.

Queries past a row's length produce no defined output; the caller masks those rows (their output
is never used). Off CUDA the op is SDPA with the key mask, the reference's computation.

The padding mask still costs: cuDNN runs the same sm90 kernel as unmasked attention, 20% slower
(0.095 against 0.077 ms a layer at 2048 frames on an H100, docs/performance.md). The unmasked
kernel is exact too once the padding cannot matter. With a row's P padded keys and values zeroed,
each padded key scores exactly q . 0 = 0, so it adds e^0 = 1 to the softmax's sum and nothing to
the output. Let Z_real be the sum of e^s over the row's real keys, Z = Z_real + P, and L = log Z
the log-sum-exp the kernel reports beside its output ("stats"). Then

    out_all = sum_real e^s v / Z,        out = sum_real e^s v / Z_real = out_all / (1 - P e^-L)

which is one element-wise pass after the kernel. The factor Z / Z_real grows as the real keys'
scores fall far below 0 (Z_real << P); it multiplies the kernel's fp32 rounding of L (~1e-6), so
the result stays exact to fp16/bf16 unless every real score of a query is below about
log(P) - 10. The parity gate against the fp32 reference checks every engine at build time.
"""

from __future__ import annotations

import threading

import torch

from indicf5.model import sdpa_attend
from indicf5.sampler import lengths_to_mask

INSTALL = "pip install 'nvidia-cudnn-frontend==1.14.*'"


def available() -> bool:
    """Whether cuDNN's Python frontend can be imported (the CUDA path needs it)."""
    try:
        import cudnn  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _cudnn():
    try:
        import cudnn
    except (ImportError, OSError) as e:
        raise RuntimeError(f"attention 'padded' needs cuDNN's Python frontend: {INSTALL} ({e})") from e
    return cudnn


def _layout(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """A (b, n, h, dh) tensor as cuDNN's (b, h, n, dh) dims and strides, without moving it."""
    b, n, h, dh = t.shape
    return [b, h, n, dh], [t.stride(0), t.stride(2), t.stride(1), t.stride(3)]


class AttentionGraph:
    """One cuDNN SDPA graph for a shape, dtype and layout of q, k and v: with the padding mask
    (the rows' lengths as inputs), or unmasked with the softmax stats as a second output (`lse`)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None = None):
        cudnn = _cudnn()
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("padded_attention builds its cuDNN graph eagerly: run the shape once before capturing it")
        if q.device not in _handles:
            _handles[q.device] = cudnn.create_handle()
        self.handle = _handles[q.device]
        io_type = {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16}[q.dtype]
        graph = cudnn.pygraph(io_data_type=io_type, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        tensors = {name: graph.tensor(*_layout(t), data_type=io_type, name=name) for name, t in zip("qkv", (q, k, v))}
        self.masked = lse is None
        if self.masked:
            for name in ("seq_len_q", "seq_len_kv"):
                tensors[name] = graph.tensor(dim=[q.shape[0], 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32,
                                             name=name)
            o, _ = graph.sdpa(q=tensors["q"], k=tensors["k"], v=tensors["v"], generate_stats=False, attn_scale=q.shape[-1] ** -0.5,
                              use_padding_mask=True, seq_len_q=tensors["seq_len_q"], seq_len_kv=tensors["seq_len_kv"],
                              name="attention")
        else:
            o, stats = graph.sdpa(q=tensors["q"], k=tensors["k"], v=tensors["v"], generate_stats=True,
                                  attn_scale=q.shape[-1] ** -0.5, name="attention")
            tensors["lse"] = stats.set_output(True).set_dim([*lse.shape, 1]).set_stride([*lse.stride(), 1]) \
                .set_data_type(cudnn.data_type.FLOAT)
        dims, strides = _layout(out)
        tensors["o"] = o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(io_type)
        graph.validate()
        graph.build_operation_graph()
        # the heuristic's first plan: timing all six on an H100 found none faster (docs/performance.md)
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph, self.tensors = graph, tensors

    def __call__(self, q, k, v, out, lengths=None, lse=None) -> None:
        """Launches on torch's current stream (a capture's, too): `lengths` for the padding mask,
        `lse` for the unmasked graph's stats."""
        _cudnn().set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        workspace = torch.empty(self.graph.get_workspace_size(), device=q.device, dtype=torch.uint8)
        t = self.tensors
        extra = {t["seq_len_q"]: lengths, t["seq_len_kv"]: lengths} if self.masked else {t["lse"]: lse}
        self.graph.execute({t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: out, **extra}, workspace, handle=self.handle)


# One handle per device and one graph per shape, for the life of the process: CUDA graphs captured
# with them replay their kernels later, from any thread. A handle is not thread-safe: the lock
# makes binding its stream and launching one step.
_handles: dict[torch.device, object] = {}
_graphs: dict[tuple, AttentionGraph] = {}
_lock = threading.Lock()


@torch.library.custom_op("indicf5::padded_attention", mutates_args=())
def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q, k, v (b, n, h, dh), any strides with dh contiguous; lengths (b,) int32 real frames per
    row -> (b, n, h, dh): each row's first `length` queries attend to its first `length` keys."""
    if not q.is_cuda:
        return sdpa_attend(q, k, v, lengths_to_mask(lengths, q.shape[1])).contiguous()
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lengths = lengths.to(torch.int32)
    with _lock:
        _graph(q, k, v, out)(q, k, v, out, lengths=lengths)
    return out


@padded_attention.register_fake
def _(q, k, v, lengths):
    return torch.empty(q.shape, device=q.device, dtype=q.dtype)


def _graph(q, k, v, out, lse=None) -> AttentionGraph:
    """The process's cuDNN graph for these tensors' shapes, strides and dtype (built on first use)."""
    key = (q.device, q.dtype, lse is None, *(tuple(t.shape) + tuple(t.stride()) for t in (q, k, v)))
    if key not in _graphs:
        _graphs[key] = AttentionGraph(q, k, v, out, lse)
    return _graphs[key]


@torch.library.custom_op("indicf5::attention_with_lse", mutates_args=())
def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (b, n, h, dh), any strides with dh contiguous -> out (b, n, h, dh) and lse (b, h, n)
    fp32: softmax attention over all n keys, and each query's log-sum-exp of its scaled scores."""
    if not q.is_cuda:  # PyTorch's CPU flash attention reports the log-sum-exp too
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous(), lse.float().contiguous()
    b, n, h, _ = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    with _lock:
        _graph(q, k, v, out, lse)(q, k, v, out, lse=lse)
    return out, lse


@attention_with_lse.register_fake
def _(q, k, v):
    b, n, h, _ = q.shape
    return torch.empty(q.shape, device=q.device, dtype=q.dtype), torch.empty(b, h, n, device=q.device, dtype=torch.float32)


def rescaled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """What `padded_attention` computes, by the unmasked kernel (see the module's docstring). k and
    v must already be zero past each row's length (the engine clears them in place)."""
    out, lse = attention_with_lse(q, k, v)
    padded = (q.shape[1] - lengths).float()[:, None, None]  # (b, 1, 1) zeroed keys a row
    real_share = 1.0 - padded * torch.exp(-lse)  # (b, h, n): Z_real / Z
    return (out.float() / real_share.transpose(1, 2)[..., None]).to(out.dtype)
