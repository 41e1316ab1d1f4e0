"""The compiled engine on CPU: a real build artifact, padding to buckets changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_l2

from indicf5.backends.compiled import CompiledBackend, CompiledEngine, EngineFlags, bucket_for
from indicf5.backends.compiled.engine import SCHEDULE_ROWS
from indicf5.backends.compiled.modules import ShiftedSumDepthwiseConv
from indicf5.checkpoint import build_model
from indicf5.sampler import sample


def run_python(script: str, *args: str, **env: str) -> str:
    """stdout of `script` in a fresh interpreter (its own Triton/Inductor state), `env` added."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_engine_turns_cublaslt_s_workspace_off_unless_the_user_set_one():
    """Its split-K GEMMs put a Memset node before each in the graph (engine.py says why); the
    variable must be set at import, before torch's first cuBLASLt call, and a user's value kept."""
    script = "import os, indicf5.backends.compiled; print(os.environ['CUBLASLT_WORKSPACE_SIZE'])"
    env = {k: v for k, v in os.environ.items() if k != "CUBLASLT_WORKSPACE_SIZE"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stderr[-2000:]
    assert run_python(script, CUBLASLT_WORKSPACE_SIZE="4096").strip() == "4096"


def test_bucket_choice():
    assert (
        bucket_for(100, (128, 256)) == 128 and bucket_for(128, (128, 256)) == 128 and bucket_for(129, (128, 256)) == 256
    )
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(300, (128, 256))


def test_padding_to_a_bucket_does_not_change_the_result(checkpoint):
    reference = build_model(checkpoint)
    engine = CompiledEngine(build_model(checkpoint), EngineFlags(buckets=(128, 256)))
    torch.manual_seed(0)
    for n in (70, 128, 200):  # inside a bucket, exactly a bucket, inside the next
        cond, text = torch.randn(1, n // 3, 100), torch.randint(0, 100, (1, n // 4))
        want = sample(reference, cond, text, [n], nfe=3, seed=1)
        got = sample(engine, cond, text, [n], nfe=3, seed=1)
        assert rel_l2(got, want) <= 1e-5, n


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_both_schedules_run_on_one_compilation_and_match_the_reference(checkpoint, device):
    """The time grid is an input of the engine's loop: epss after uniform at the same step count
    compiles nothing new, and on CUDA replays the loop's one captured graph. On CPU each schedule
    matches the fp32 reference; on CUDA (fp16) the graph's replay matches the loop run uncaptured."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    engine = CompiledEngine(build_model(checkpoint, device, dtype), EngineFlags(buckets=(128,)))
    torch.manual_seed(4)
    cond, text = torch.randn(1, 30, 100, device=device), torch.randint(0, 100, (1, 25), device=device)

    def run(model, schedule):
        return sample(
            model, cond, text, [110], nfe=7, schedule=schedule, seed=2, dtype=getattr(model, "state_dtype", None)
        )

    uniform = run(engine, "uniform")
    with torch._dynamo.config.patch(error_on_recompile=True):
        epss = run(engine, "epss")
    assert rel_l2(epss, uniform) > 1e-3  # the grid did reach the loop
    if device == "cuda":
        assert engine.captures == 1  # one shape captured, for both grids
        engine.cuda_graphs = False
        reference = engine
    else:
        reference = build_model(checkpoint)
    tolerance = 1e-3 if device == "cuda" else 1e-5
    assert rel_l2(uniform, run(reference, "uniform")) <= tolerance
    assert rel_l2(epss, run(reference, "epss")) <= tolerance


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_attention_by_lengths_keeps_rows_of_different_lengths_apart(checkpoint, device):
    """The engine's attention by row lengths in a batch whose rows end at different frames inside
    one bucket, as batched requests do. On CUDA it is the Triton kernel in fp16, each row checked
    against the same engine sampling it alone; on CPU, the op's SDPA fallback against the reference."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    engine = CompiledEngine(build_model(checkpoint, device, dtype), EngineFlags(buckets=(128, 256), attention="padded"))
    reference = engine if device == "cuda" else build_model(checkpoint)
    torch.manual_seed(2)
    conds = [torch.randn(1, 40, 100, device=device), torch.randn(1, 25, 100, device=device)]
    texts = [torch.randint(0, 100, (1, 30), device=device), torch.randint(0, 100, (1, 12), device=device)]
    frames = [150, 90]  # one bucket of 256: the second row has 166 frames of padding
    cond = torch.cat((conds[0], torch.nn.functional.pad(conds[1], (0, 0, 0, 15))))
    text = torch.cat((texts[0], torch.nn.functional.pad(texts[1], (0, 18), value=-1)))
    got = sample(engine, cond, text, frames, ref_lens=[40, 25], nfe=3, seed=5, dtype=engine.state_dtype)
    for row, (c, t, n) in enumerate(zip(conds, texts, frames)):
        alone = sample(reference, c, t, [n], nfe=3, seed=5, dtype=engine.state_dtype)
        assert rel_l2(got[row : row + 1, :n], alone) <= (2e-3 if device == "cuda" else 1e-5), row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_guidance_branches_on_two_streams_compute_what_one_batch_does(checkpoint):
    """branches 'streams' (each guidance branch on its own CUDA stream, in the loop's graph and
    without it) samples what the one batch of both branches does."""
    engines = {
        branches: CompiledEngine(
            build_model(checkpoint, "cuda", torch.float16), EngineFlags(buckets=(256,), branches=branches)
        )
        for branches in ("batched", "streams")
    }
    torch.manual_seed(3)
    cond, text = torch.randn(1, 50, 100, device="cuda"), torch.randint(0, 100, (1, 40), device="cuda")
    run = lambda engine: sample(engine, cond, text, [200], nfe=4, seed=2, dtype=engine.state_dtype)
    want = run(engines["batched"])
    streams = engines["streams"]
    assert rel_l2(run(streams), want) <= 2e-3 and streams.graphs  # the graph of both streams
    streams.cuda_graphs = False
    assert rel_l2(run(streams), want) <= 2e-3


PADDED_ATTENTION_CHECK = """
import torch
from triton.runtime import interpreter

patch_tensor = interpreter._patch_lang_tensor

# triton-lang/triton#9171: Triton 3.6's interpreter casts a 1-element array with int(), which NumPy 2.4 refuses
def patched(tensor, scope):
    patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

interpreter._patch_lang_tensor = patched
from indicf5.backends.compiled.kernels.attention import attend
from indicf5.model import sdpa_attend
torch.manual_seed(0)
n, h, dh = 200, 2, 64  # not a multiple of the 128-query tile; the short row ends inside a key tile
qkv = torch.randn(2, n, 3, h, dh)  # (b, n, q|k|v, h, dh) as the fused projection lays it out
lengths = torch.tensor([n, 93], dtype=torch.int32)
low = qkv.half()
low[1, 93:] = float("nan")  # the short row's padding must never be read
got = attend(*low.unbind(2), lengths).float()
for row, length in enumerate(lengths.tolist()):
    q, k, v = (t[row:row + 1, :length] for t in qkv.unbind(2))
    want = sdpa_attend(q, k, v)
    err = float((got[row:row + 1, :length] - want).norm() / want.norm())
    print(row, err, int(torch.isfinite(got[row, :length]).all()))
"""


def test_padded_attention_attends_each_row_to_its_length_only():
    """kernels/attention.py's kernel, run by Triton's interpreter on the CPU, on the q|k|v views the
    engine hands it (fp16): each row's real queries match attention over that row alone, and
    NaN in a row's padding changes nothing (TMA reads the last key tile whole: its padded keys must
    not score, and their values must be cleared before they are summed)."""
    out = run_python(PADDED_ATTENTION_CHECK, TRITON_INTERPRET="1")
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 2 and all(float(err) <= 1e-3 and finite == "1" for _, err, finite in rows), rows


def test_padded_attention_refuses_a_layout_it_cannot_tile():
    """The kernel reads tokens as rows of one matrix; heads-first tensors are refused with the
    reason, before anything is launched."""
    from indicf5.backends.compiled.kernels.attention import attend

    q = torch.zeros(2, 16, 4, 64, dtype=torch.float16).transpose(1, 2)  # (b, n, h, dh) view of heads-first memory
    with pytest.raises(ValueError, match="tokens are rows of one matrix"):
        attend(q, q, q, torch.full((2,), 4, dtype=torch.int32))


def test_padded_attention_off_cuda_gives_a_row_the_same_bits_in_any_bucket_and_batch():
    """Off CUDA the op attends each row alone, so a row's output does not depend, to the bit, on
    how far it is padded or on its batch-mates: a server's batch equals its rows rendered alone.
    (SDPA with a key mask over the padding rounds differently at 256 and 512 keys on a CPU.)"""
    from indicf5.backends.compiled.kernels.attention import padded_attention
    from indicf5.model import sdpa_attend

    torch.manual_seed(0)
    h, dh, n = 4, 16, 242
    row = torch.randn(1, n, 3, h, dh)

    def attend(size: int, lengths: list[int]) -> torch.Tensor:  # the row first, batch-mates after
        qkv = torch.randn(len(lengths), size, 3, h, dh)  # a projection's layout; padding is noise
        qkv[:1, :n] = row
        q, k, v = qkv.unbind(2)
        return padded_attention(q, k, v, torch.tensor(lengths, dtype=torch.int32))

    alone = attend(256, [n])
    assert torch.equal(attend(512, [n, 500, 300])[:1, :n], alone[:, :n])
    assert torch.equal(attend(2560, [n, 2000])[:1, :n], alone[:, :n])
    assert rel_l2(alone[:, :n], sdpa_attend(*row.unbind(2))) <= 1e-6


def test_engine_flags_that_cannot_run_here_say_so(checkpoint):
    for flags, match in (
        ({"conv": "triton"}, "conv 'triton' needs a CUDA device"),
        ({"rope": "kernel"}, "rope 'kernel' needs a CUDA device"),
        ({"branches": "streams"}, "branches 'streams' needs a CUDA device"),
        ({"branches": "two"}, "build flag branches 'two' is not one of auto, streams, batched"),
        ({"tuning": "max"}, "unknown build flag 'tuning' for the compiled backend"),
        ({"batch_sizes": [2, 4]}, "batch_sizes must be increasing and start at 1"),
        ({"max_tokens": 64}, "max_tokens 64 must hold one utterance of the largest bucket"),
    ):
        with pytest.raises(ValueError, match=match):
            CompiledEngine(build_model(checkpoint), EngineFlags.parse({"buckets": [128], **flags}))
    if torch.cuda.is_available():  # the synthetic model's 4 channels a group do not fit the Triton kernel's tiles
        with pytest.raises(ValueError, match="power of two >= 16 channels per group, not 4"):
            CompiledEngine(build_model(checkpoint, "cuda", torch.float16), EngineFlags(buckets=(128,), conv="triton"))


def test_auto_flags_resolve_per_device_and_dtype():
    """One flags model: `auto` becomes the concrete choice for a device and dtype, and the backend's
    defaults are that model's."""
    flags = EngineFlags()
    assert CompiledBackend().default_flags() == flags.model_dump(mode="json", exclude={"device"})
    cpu = flags.resolve(torch.device("cpu"), torch.bfloat16, 64)
    assert cpu.precision == "mixed" and not (cpu.triton_conv or cpu.rope_kernel or cpu.cuda_graphs)
    assert cpu.by_lengths  # the op attends each row alone off CUDA
    assert cpu.branch_streams is None
    assert flags.resolve(torch.device("cpu"), torch.float16, 64).precision == "pure"
    gpu = flags.resolve(torch.device("cuda"), torch.float16, 64)
    assert gpu.triton_conv and gpu.by_lengths and gpu.rope_kernel and gpu.cuda_graphs
    assert [gpu.two_streams(frames) for frames in (2047, 2048, 8192, 8193)] == [False, True, True, False]
    streams, batched = (
        EngineFlags(branches=b).resolve(torch.device("cuda"), torch.float16, 64) for b in ("streams", "batched")
    )
    assert streams.two_streams(256) and streams.two_streams(32 * 4096) and not batched.two_streams(4096)
    assert not flags.resolve(torch.device("cuda"), torch.float16, 4).triton_conv  # the groups do not fit its tiles
    assert not flags.resolve(torch.device("cuda"), torch.float32, 64).by_lengths


def test_build_saves_compiler_artifacts_and_loads(tmp_path, checkpoint):
    from safetensors.torch import save_file

    from indicf5.backends.base import EngineSpec

    backend = CompiledBackend()
    converted, engine_dir = tmp_path / "converted", tmp_path / "engine"
    converted.mkdir(), engine_dir.mkdir()
    save_file(checkpoint.transformer, str(converted / "model.safetensors"))
    spec = EngineSpec(
        backend="compiled",
        dtype="fp32",
        model=checkpoint.config,
        build_flags={**backend.default_flags(), "buckets": [128, 256], "device": "cpu"},
    )
    info = backend.build(converted, spec, engine_dir)
    assert (engine_dir / "compile_cache.bin").stat().st_size > 0 and info["device"] == "cpu"
    engine = backend.load(engine_dir, spec, "cpu")
    reference = build_model(checkpoint)
    cond, text = torch.randn(1, 30, 100), torch.randint(0, 100, (1, 20))
    assert (
        rel_l2(sample(engine, cond, text, [100], nfe=2, seed=0), sample(reference, cond, text, [100], nfe=2, seed=0))
        <= 1e-5
    )


def test_mixed_precision_bf16_keeps_closer_to_fp32_than_pure_bf16(checkpoint):
    reference = build_model(checkpoint)
    cond, text = torch.randn(1, 60, 100), torch.randint(0, 100, (1, 50))
    want = sample(reference, cond, text, [200], nfe=8, seed=0)
    pure = sample(
        build_model(checkpoint, "cpu", torch.bfloat16), cond, text, [200], nfe=8, seed=0, dtype=torch.bfloat16
    )
    errors = {}
    for precision in ("pure", "mixed"):
        engine = CompiledEngine(
            build_model(checkpoint, "cpu", torch.bfloat16), EngineFlags(buckets=(256,), precision=precision)
        )
        got = sample(engine, cond, text, [200], nfe=8, seed=0, dtype=engine.state_dtype)
        assert torch.isfinite(got).all()
        errors[precision] = rel_l2(got, want)
    # the fp32 ODE state alone helps; fp32 between the matmuls helps most
    assert errors["mixed"] < errors["pure"] < rel_l2(pure, want), (errors, rel_l2(pure, want))
    assert errors["mixed"] < 0.5 * rel_l2(pure, want)


TRITON_CONV_CHECK = """
import sys, torch
from indicf5.backends.compiled import Padding, TritonConvPositionEmbedding
from indicf5.model import ConvPositionEmbedding
torch.manual_seed(0)
reference = ConvPositionEmbedding(128).eval()
x = torch.randn(2, 150, 128)
padding = Padding.of(torch.tensor([150, 97], dtype=torch.int32), 150)  # a full row and a padded one
with torch.no_grad():
    want = reference(x, padding.mask)
    for dtype in (torch.float32, torch.float16):
        got = TritonConvPositionEmbedding(reference, dtype)(x.to(dtype), padding).float()
        print(str(dtype), float((got - want).norm() / want.norm()))
"""


def test_the_triton_position_convolution_computes_the_reference():
    """kernels/conv.py's kernel, run by Triton's interpreter on the CPU, as the engine calls it."""
    out = run_python(TRITON_CONV_CHECK, TRITON_INTERPRET="1")
    errors = dict(line.split() for line in out.splitlines())
    assert float(errors["torch.float32"]) <= 1e-5 and float(errors["torch.float16"]) <= 2e-3, errors


GELU_QUANTIZE_CHECK = """
import torch, triton
from indicf5.backends.compiled.kernels.quantize import _gelu_quantize_rows_kernel, tile
torch.manual_seed(0)
x = (torch.randn(13, 256) * 3).to(torch.bfloat16)
x[5] = 0  # a padding row
gelu = torch.nn.functional.gelu(x.float(), approximate="tanh")
want_scale = gelu.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
want = (gelu / want_scale).clamp(-448.0, 448.0)
scaled, scale = torch.empty(13, 256), torch.empty(13, 1)  # fp32 where the engine stores e4m3: the values uncast
block, warps = tile(256)
_gelu_quantize_rows_kernel[(triton.cdiv(13, block),)](x, scaled, scale, 13, K=256, BLOCK_M=block, num_warps=warps)
scale_err = (scale - want_scale).abs().max() / want_scale.max()
print(float(scale_err), float((scaled - want).abs().max()), float(scaled.abs().max()))
"""


def test_the_gelu_quantization_kernel_scales_each_row_to_e4m3_s_range():
    """kernels/quantize.py's kernel, run by Triton's interpreter on the CPU with an fp32 output (the
    interpreter's own e4m3 cast is not the GPU's): each row's tanh-GELU over its scale, clamped to
    +-448, and the scales max|gelu| / 448, for rows that do not fill the last program and a zero row."""
    out = run_python(GELU_QUANTIZE_CHECK, TRITON_INTERPRET="1")
    scale_err, value_err, largest = (float(v) for v in out.split())
    assert scale_err <= 1e-6 and value_err <= 1e-3 and largest == 448.0, out


ROPE_KERNEL_CHECK = """
import torch
from indicf5.backends.compiled.kernels.rope import rotate_first_head_
from indicf5.model import rope_angles, rope_inv_freq, rotate_first_head
torch.manual_seed(0)
b, n, h, dh = 2, 76, 4, 16
angles = rope_angles(n, rope_inv_freq(dh))
for dtype in (torch.float32, torch.float16):
    qkv = torch.randn(b, n, 3 * h * dh).to(dtype)
    q, k, v = qkv.view(b, n, 3, h, dh).unbind(2)
    want_q, want_k = rotate_first_head(q, k, angles)
    got = qkv.clone()
    rotate_first_head_(got, angles, h)
    got_q, got_k, got_v = got.view(b, n, 3, h, dh).unbind(2)
    err = max(float((g.float() - w.float()).abs().max()) for g, w in ((got_q, want_q), (got_k, want_k)))
    print(str(dtype), err, int(torch.equal(got_v, v)))
"""


def test_the_rotary_kernel_rotates_the_first_head_in_place():
    """kernels/rope.py's kernel, run by Triton's interpreter on the CPU: q's and k's first head
    rotated where the projection left them, as the reference's copy does; v untouched."""
    out = run_python(ROPE_KERNEL_CHECK, TRITON_INTERPRET="1")
    results = {dtype: (float(err), int(v_kept)) for dtype, err, v_kept in (line.split() for line in out.splitlines())}
    assert results["torch.float32"][0] <= 1e-5 and results["torch.float16"][0] <= 1e-3, results
    assert all(v_kept for _, v_kept in results.values()), results


CONSTANT_ROWS = {"rows": "i32", "K": "constexpr", "BLOCK_M": "constexpr"}  # the quantization kernel's other arguments


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_triton_kernels_compile_for_hopper(dtype):
    """The four Triton kernels compile to sm_90 machine code at IndicF5's tiles, here without a GPU,
    and attention also for an RTX 3090 (sm_86, no TMA: Triton lowers the descriptors to loads).
    Triton's interpreter (the tests above) runs code its compiler refuses, such as a plain global
    read inside a kernel; this catches that before a device run does."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from indicf5.backends.compiled.kernels import attention as padded_attention
    from indicf5.backends.compiled.kernels import conv as conv_kernel
    from indicf5.backends.compiled.kernels import quantize as quantize_kernel
    from indicf5.backends.compiled.kernels import rope as rope_kernel

    hopper, pointer = GPUTarget("cuda", 90, 32), f"*{dtype}"
    rope = ASTSource(
        fn=rope_kernel._rotate_first_head_kernel,
        signature={
            "qkv_ptr": pointer,
            "angles_ptr": "*fp32",
            "n_frames": "i32",
            "token_stride": "i32",
            "k_offset": "i32",
            "HALF": "constexpr",
            "BLOCK_T": "constexpr",
        },
        constexprs={"HALF": 32, "BLOCK_T": rope_kernel.BLOCK_TOKENS},
    )
    conv = ASTSource(
        fn=conv_kernel._conv_mish_kernel,
        signature={
            "x_ptr": pointer,
            "w_ptr": pointer,
            "bias_ptr": pointer,
            "lengths_ptr": "*i32",
            "out_ptr": pointer,
            "n_frames": "i32",
            "dim": "i32",
            "KERNEL": "constexpr",
            "GROUPS": "constexpr",
            "CHANNELS": "constexpr",
            "BLOCK_T": "constexpr",
        },
        constexprs={"KERNEL": 31, "GROUPS": 16, "CHANNELS": 64, "BLOCK_T": conv_kernel.BLOCK_FRAMES},
    )
    q_tile, k_tile = (
        f"tensordesc<{dtype}[{rows},64]>" for rows in (padded_attention.BLOCK_QUERIES, padded_attention.BLOCK_KEYS)
    )
    attention = ASTSource(
        fn=padded_attention._attention_kernel,
        signature={
            "q_desc": q_tile,
            "k_desc": k_tile,
            "v_desc": k_tile,
            "o_ptr": pointer,
            "lengths_ptr": "*i32",
            **{name: "i32" for name in ("n_frames", "heads", "o_stride_b", "o_stride_n", "o_stride_h")},
            "scale_log2": "fp32",
            "HEAD": "constexpr",
            "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr",
        },
        constexprs={"HEAD": 64, "BLOCK_M": padded_attention.BLOCK_QUERIES, "BLOCK_N": padded_attention.BLOCK_KEYS},
    )
    gelu_quantize = ASTSource(
        fn=quantize_kernel._gelu_quantize_rows_kernel,
        signature={"x_ptr": pointer, "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", **CONSTANT_ROWS},
        constexprs={"K": 2048, "BLOCK_M": quantize_kernel.tile(2048)[0]},
    )
    quantized = triton_compile(gelu_quantize, target=hopper, options={"num_warps": quantize_kernel.tile(2048)[1]})
    assert "cvt.rn.satfinite.e4m3x2.f32" in quantized.asm["ptx"]  # round to nearest, as torch's cast
    for source, warps in ((rope, 4), (conv, conv_kernel.WARPS), (attention, padded_attention.WARPS)):
        compiled = triton_compile(source, target=hopper, options={"num_warps": warps})
        assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"], source.fn
    assert "cp.async.bulk.tensor" in compiled.asm["ptx"]  # the last one, attention's: q, k and v tiles by TMA
    ampere = triton_compile(attention, target=GPUTarget("cuda", 86, 32), options={"num_warps": padded_attention.WARPS})
    assert (
        ".target sm_86" in ampere.asm["ptx"] and "cp.async.bulk.tensor" not in ampere.asm["ptx"]
    )  # no TMA there: plain loads


def test_a_batch_padded_to_a_batch_size_renders_each_row_as_alone(checkpoint):
    """Rows of different lengths in one batch, padded up to the next batch size with copies of the
    first row (3 -> 4 here), give each row exactly what it gives alone."""
    engine = CompiledEngine(build_model(checkpoint), EngineFlags(buckets=(128, 256), batch_sizes=(1, 4)))
    assert engine.batch_size_for(3) == 4 and engine.batch_size_for(1) == 1 and engine.batch_size_for(5) == 5
    torch.manual_seed(4)
    frames, refs, texts = [150, 90, 200], [40, 25, 60], [30, 12, 41]
    conds = [torch.randn(1, r, 100) for r in refs]
    ids = [torch.randint(0, 100, (1, n)) for n in texts]
    cond = torch.nn.utils.rnn.pad_sequence([c[0] for c in conds], batch_first=True)
    text = torch.nn.utils.rnn.pad_sequence([t[0] for t in ids], batch_first=True, padding_value=-1)
    together = sample(engine, cond, text, frames, ref_lens=refs, nfe=3, seed=[1, 2, 3])
    for row, (c, t, n) in enumerate(zip(conds, ids, frames)):
        alone = sample(engine, c, t, [n], nfe=3, seed=row + 1)
        assert torch.equal(together[row : row + 1, :n], alone), row


def test_max_batch_follows_the_token_budget(checkpoint):
    engine = CompiledEngine(
        build_model(checkpoint), EngineFlags(buckets=(128, 256, 512), batch_sizes=(1, 2, 4, 8), max_tokens=1024)
    )
    assert [engine.max_batch(n) for n in (100, 200, 500)] == [8, 4, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_shapes_serve_every_batch_without_capturing_again(checkpoint):
    """After capture(max_batch=4), batches of 1 to 4 rows at any length and either schedule replay
    what was captured (the counter stays), and each row equals the same engine sampling it alone."""
    engine = CompiledEngine(
        build_model(checkpoint, "cuda", torch.float16), EngineFlags(buckets=(128, 256), batch_sizes=(1, 2, 4))
    )
    with torch.inference_mode():
        engine.capture(max_batch=4)
    captured = engine.captures
    assert captured == 2 * 3 and engine.graph_memory_bytes() > 0
    assert 0 < engine.batch_seconds(3, 150) == engine.step_seconds[(256, 4, True)]  # 3 rows run as 4
    assert engine.batch_seconds(1, 257) is None  # past the largest bucket
    torch.manual_seed(5)
    frames = [150, 90, 200]
    conds = [torch.randn(1, 30 + i, 100, device="cuda") for i in range(3)]
    texts = [torch.randint(0, 100, (1, 20 + i), device="cuda") for i in range(3)]
    cond = torch.nn.utils.rnn.pad_sequence([c[0] for c in conds], batch_first=True)
    text = torch.nn.utils.rnn.pad_sequence([t[0] for t in texts], batch_first=True, padding_value=-1)
    for schedule in ("uniform", "epss"):
        together = sample(
            engine,
            cond,
            text,
            frames,
            ref_lens=[30, 31, 32],
            nfe=7,
            schedule=schedule,
            seed=[1, 2, 3],
            dtype=engine.state_dtype,
        )
        for row in range(3):
            alone = sample(
                engine,
                conds[row],
                texts[row],
                [frames[row]],
                nfe=7,
                schedule=schedule,
                seed=row + 1,
                dtype=engine.state_dtype,
            )
            assert rel_l2(together[row : row + 1, : frames[row]], alone) <= 2e-3, (schedule, row)
    assert engine.captures == captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capturing_more_shapes_than_the_schedule_has_rows(checkpoint):
    """Each capture's warm-up step reads the schedule at the step index: a server capturing more
    shapes than the schedule's rows must not read past them (a device-side assert at load)."""
    buckets = tuple(range(32, 32 * (SCHEDULE_ROWS + 3), 32))
    engine = CompiledEngine(build_model(checkpoint, "cuda", torch.float16), EngineFlags(buckets=buckets))
    with torch.inference_mode():
        engine.capture()
        torch.cuda.synchronize()
        assert engine.captures == len(buckets) > SCHEDULE_ROWS
        cond, text = torch.randn(1, 30, 100, device="cuda"), torch.randint(0, 100, (1, 20), device="cuda")
        mel = sample(engine, cond, text, [100], nfe=7, seed=0, dtype=engine.state_dtype)
    assert torch.isfinite(mel).all()


def test_the_text_convolution_by_shifted_sums_computes_the_depthwise_conv():
    """What the CUDA engine runs for the text blocks' depthwise conv equals nn.Conv1d (fp32 math),
    at the ends of the sequence too, for fp32 and fp16 inputs."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(32, 32, kernel_size=7, padding=3, groups=32)
    by_sums = ShiftedSumDepthwiseConv(conv)
    x = torch.randn(3, 32, 50)
    assert torch.allclose(by_sums(x), conv(x), atol=1e-5, rtol=1e-5)
    half = x.half()
    got = by_sums(half)
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), conv(half.float()), atol=2e-3, rtol=2e-3)


def test_a_module_that_would_run_uncompiled_is_an_error_not_a_slow_engine(snapshot):
    """Past Dynamo's recompile limit a compiled module silently runs eager; the engine refuses to."""
    script = """if True:
        import sys, torch
        from indicf5.backends.compiled import CompiledEngine, EngineFlags
        from indicf5.checkpoint import build_model, load_checkpoint
        engine = CompiledEngine(build_model(load_checkpoint(sys.argv[1])), EngineFlags(buckets=(64,)))
        engine.step(*engine.example_inputs(2, 64))
        with torch._dynamo.config.patch(recompile_limit=1):
            engine.step(*engine.example_inputs(2, 64))  # the same shape: its graph is there
            print("same shape ran")
            try:
                engine.step(*engine.example_inputs(1, 64))  # one row: Dynamo specializes sizes of 1
            except RuntimeError as e:
                print("refused:", e)
    """
    out = run_python(script, str(snapshot))
    assert "same shape ran" in out
    assert "refused: a compiled module of the engine needed more than" in out and "recompile_limit (1)" in out
