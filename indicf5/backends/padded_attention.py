"""Attention over bucket-padded rows by cuDNN's padding mask: each row's length is a device
tensor the kernel reads, so it attends to exactly the row's real keys, with no mask tensor and
no work on the padding.

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
    """One cuDNN SDPA graph: a shape, dtype and layout of q, k and v."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor):
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
        for name in ("seq_len_q", "seq_len_kv"):
            tensors[name] = graph.tensor(dim=[q.shape[0], 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32,
                                         name=name)
        o, _ = graph.sdpa(q=tensors["q"], k=tensors["k"], v=tensors["v"], generate_stats=False, attn_scale=q.shape[-1] ** -0.5,
                          use_padding_mask=True, seq_len_q=tensors["seq_len_q"], seq_len_kv=tensors["seq_len_kv"], name="attention")
        dims, strides = _layout(out)
        tensors["o"] = o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(io_type)
        graph.validate()
        graph.build_operation_graph()
        # the heuristic's first plan: timing all six on an H100 found none faster (docs/performance.md)
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph, self.tensors = graph, tensors

    def __call__(self, q, k, v, out, lengths) -> None:
        """Launches on torch's current stream (a capture's, too)."""
        _cudnn().set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        workspace = torch.empty(self.graph.get_workspace_size(), device=q.device, dtype=torch.uint8)
        t = self.tensors
        self.graph.execute({t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: out, t["seq_len_q"]: lengths, t["seq_len_kv"]: lengths},
                           workspace, handle=self.handle)


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
    key = (q.device, q.dtype, *(tuple(t.shape) + tuple(t.stride()) for t in (q, k, v)))
    with _lock:
        if key not in _graphs:
            _graphs[key] = AttentionGraph(q, k, v, out)
        _graphs[key](q, k, v, out, lengths)
    return out


@padded_attention.register_fake
def _(q, k, v, lengths):
    return torch.empty(q.shape, device=q.device, dtype=q.dtype)
