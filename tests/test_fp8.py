"""The FP8 path of the compiled engine on the CPU: quantization, scales as stored, the GEMM
emulated from the same quantized operands, and a clear refusal where no FP8 tensor cores are."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_l2
from safetensors.torch import load_file, save_file

from indicf5.backends.compiled import fp8
from indicf5.backends.compiled import CompiledEngine, EngineFlags
from indicf5.checkpoint import build_model
from indicf5.model import DiTBlock


def test_rows_quantize_within_e4m3_rounding():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different magnitude, as tokens are
    x[5] = 0.0  # a padded token
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(-1)[[0, 63]], torch.tensor([448.0, 448.0]))  # each row spans the format
    back = fp8.dequantize(q, scale)
    assert torch.equal(back[5], torch.zeros(256))
    rows = [i for i in range(64) if i != 5]
    per_row = (back - x)[rows].norm(dim=-1) / x[rows].norm(dim=-1)
    assert per_row.max() <= 0.04  # e4m3 has 3 mantissa bits: a relative rounding of at most 2^-4 per element


def test_the_fp8_linear_is_the_float_linear_within_the_rounding_of_its_operands():
    torch.manual_seed(1)
    weight, bias = torch.randn(96, 128) / 11, torch.randn(96)
    x = torch.randn(3, 40, 128)
    want = torch.nn.functional.linear(x, weight, bias)
    layer = fp8.Fp8Linear.of(weight, bias, torch.float32)
    assert layer.emulate  # no FP8 tensor cores here
    got = layer(x)
    assert got.shape == want.shape and 1e-4 < rel_l2(got, want) <= 0.05
    x_q, x_scale = fp8.quantize_rows(x.flatten(0, 1))  # exactly the quantized operands' product, plus the bias
    exact = (
        fp8.dequantize(x_q, x_scale) @ fp8.dequantize(layer.weight, layer.scale).t() + bias.to(torch.bfloat16).float()
    )
    assert torch.allclose(got.flatten(0, 1), exact, rtol=1e-6, atol=1e-6)
    weight2, bias2 = torch.randn(64, 96) / 10, torch.randn(64)
    second = fp8.Fp8Linear.of(weight2, bias2, torch.float32, gelu_in=True)  # the feed-forward's second layer
    assert not second.fused_gelu  # the fused kernel is CUDA's
    after_gelu = fp8.Fp8Linear.of(weight2, bias2, torch.float32)(torch.nn.functional.gelu(got, approximate="tanh"))
    assert torch.allclose(second(got), after_gelu, rtol=1e-6, atol=1e-6)


def test_quantized_block_weights_survive_the_engine_file(checkpoint, tmp_path):
    dit = build_model(checkpoint)
    stored = fp8.quantize_blocks(dit.transformer_blocks)
    assert len(stored) == 2 * 3 * len(dit.transformer_blocks)  # q|k|v, ff1, ff2: a weight and a scale each
    save_file(stored, str(tmp_path / fp8.FP8_FILE))
    loaded = load_file(str(tmp_path / fp8.FP8_FILE))
    assert all(torch.equal(loaded[k].float(), v.float()) and loaded[k].dtype == v.dtype for k, v in stored.items())
    block = dit.transformer_blocks[0]
    q_weight = torch.cat((block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight)).detach()
    assert rel_l2(fp8.dequantize(loaded["0.qkv.weight"], loaded["0.qkv.scale"]), q_weight) <= 0.04
    assert loaded["0.ff1.weight"].shape == block.ff.ff[0][0].weight.shape


def test_fp8_is_refused_without_fp8_tensor_cores(checkpoint):
    with pytest.raises(
        ValueError, match=r"precision 'fp8' runs FP8 tensor-core GEMMs on a CUDA GPU \(Hopper or Ada\), not cpu"
    ):
        CompiledEngine(build_model(checkpoint, "cpu", torch.float16), EngineFlags(buckets=(128,), precision="fp8"))
    with pytest.raises(ValueError, match="runs inside an fp16 or bf16 engine"):
        CompiledEngine(build_model(checkpoint), EngineFlags(buckets=(128,), precision="fp8"))


CUDA_FP8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 tensor cores"
)


def test_the_fp8_gemm_asks_for_rowwise_scales_the_bias_and_fast_accumulation(monkeypatch):
    """What the engine's GEMM asks torch._scaled_mm for (CPUs have none, so its arguments are
    recorded): per-token and per-channel scales, the bias in bf16, bf16 out, and the tensor cores'
    fast accumulation (docs/performance.md, "FP8 engine"); split accumulation only when asked."""
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kw: calls.append((a, b, kw)) or a.float() @ b.float())
    x_q, x_scale = fp8.quantize_rows(torch.randn(5, 16))
    w_q, w_scale = fp8.quantize_rows(torch.randn(8, 16))
    fp8.fp8_matmul(x_q, x_scale, w_q, w_scale, torch.zeros(8))
    fp8.fp8_matmul(x_q, x_scale, w_q, w_scale, torch.zeros(8), fast_accum=False)
    (a, b, fast), (_, _, split) = calls
    assert a is x_q and b.shape == (16, 8) and fast["scale_a"] is x_scale and fast["scale_b"].shape == (1, 8)
    assert fast["bias"].dtype == fast["out_dtype"] == torch.bfloat16
    assert fast["use_fast_accum"] is True and split["use_fast_accum"] is False


@CUDA_FP8
def test_the_fp8_gemm_is_its_emulation_on_the_gpu():
    torch.manual_seed(2)
    weight, bias = torch.randn(1024, 512, device="cuda") / 20, torch.randn(1024, device="cuda")
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16)
    layer = fp8.Fp8Linear.of(weight, bias, torch.bfloat16)
    assert not layer.emulate
    emulated = fp8.Fp8Linear.of(weight, bias, torch.bfloat16)
    emulated.emulate = True
    assert rel_l2(layer(x).float(), emulated(x).float()) <= 1e-2  # bf16 output rounding only


@CUDA_FP8
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_fp8_engine_samples_close_to_its_precision(checkpoint, dtype):
    from indicf5.sampler import sample

    reference = build_model(checkpoint, "cuda")
    engine = CompiledEngine(build_model(checkpoint, "cuda", dtype), EngineFlags(buckets=(256,), precision="fp8"))
    torch.manual_seed(3)
    cond, text = torch.randn(1, 60, 100, device="cuda"), torch.randint(0, 100, (1, 50), device="cuda")
    want = sample(reference, cond, text, [200], nfe=8, seed=0)
    got = sample(engine, cond, text, [200], nfe=8, seed=0, dtype=engine.state_dtype)
    assert torch.isfinite(got).all() and rel_l2(got, want) <= 0.1, rel_l2(got, want)


def test_the_parity_gate_holds_fp8_engines_to_their_own_threshold(checkpoint):
    from types import SimpleNamespace

    from indicf5.parity import ParityConfig, check_parity

    reference = build_model(checkpoint)

    class Fp8Like(torch.nn.Module):  # the reference, flagged as an FP8 engine is
        choice = SimpleNamespace(precision="fp8")

        def forward(self, *args, **kwargs):
            return reference(*args, **kwargs)

        def embed_text(self, *args, **kwargs):
            return reference.embed_text(*args, **kwargs)

    config = ParityConfig(lengths=[60], nfe=2)
    report = check_parity(reference, Fp8Like(), "fp32", checkpoint.config.text_num_embeds, "cpu", config)
    assert report.threshold == config.thresholds["fp8"] == 1.5e-2 and report.passed
    assert (
        check_parity(reference, reference, "fp32", checkpoint.config.text_num_embeds, "cpu", config).threshold == 1e-4
    )


@CUDA_FP8
def test_the_fused_gelu_quantization_is_the_torch_one_on_the_gpu():
    """kernels/quantize.py against fp8.quantize_rows of the tanh-GELU: the same scales, and the
    same e4m3 values but where the two GELUs round to opposite sides of an e4m3 midpoint."""
    from indicf5.backends.compiled.kernels.quantize import gelu_quantize_rows

    torch.manual_seed(4)
    x = (torch.randn(1000, 2048, device="cuda") * 3).to(torch.bfloat16)
    x[7] = 0  # a padding row
    q, scale = gelu_quantize_rows(x)
    want_q, want_scale = fp8.quantize_rows(torch.nn.functional.gelu(x.float(), approximate="tanh"))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (1000, 1)
    assert torch.allclose(scale, want_scale, rtol=1e-5, atol=0)
    assert (q.float() != want_q.float()).float().mean() < 1e-3
    assert rel_l2(fp8.dequantize(q, scale), fp8.dequantize(want_q, want_scale)) < 1e-3
    layer = fp8.Fp8Linear.of(
        torch.randn(512, 2048, device="cuda") / 40, torch.randn(512, device="cuda"), torch.bfloat16, gelu_in=True
    )
    assert layer.fused_gelu
    unfused = fp8.Fp8Linear(layer.weight, layer.scale, layer.bias, torch.bfloat16)  # the same weights
    after_gelu = unfused(torch.nn.functional.gelu(x.float(), approximate="tanh"))
    assert rel_l2(layer(x).float(), after_gelu.float()) < 5e-3


def test_fp8_blocks_hand_the_next_its_input_quantized_as_each_layer_would_quantize_it(checkpoint):
    """The FP8 engine's modules, eager on the CPU (GEMMs emulated): every block but the last gives
    the next one its q|k|v input as QuantizedRows, and the step is bit for bit the same as when
    each FP8 layer quantizes its own input."""
    from indicf5.backends.compiled.engine import Resolved, engine_modules
    from indicf5.backends.compiled.modules import Padding

    dit = build_model(checkpoint, "cpu", torch.bfloat16)
    choice = Resolved(
        "fp8", triton_conv=False, by_lengths=True, rope_kernel=False, branch_streams=None, cuda_graphs=False
    )
    engine_modules(dit, choice)
    *quantizing, last = blocks = dit.transformer_blocks
    assert all(isinstance(block, fp8.QuantizedNormOut) for block in quantizing) and isinstance(last, DiTBlock)
    kinds = {
        name: type(layer)
        for name, layer in [("qkv", last.attn.qkv), ("out", last.attn.to_out), *last.ff.ff.named_children()]
    }
    assert kinds == {
        "qkv": fp8.Fp8Linear,
        "out": torch.nn.Linear,
        "0": fp8.Fp8Linear,
        "1": torch.nn.Identity,
        "2": fp8.Fp8Linear,
    }
    received = []
    for block in [*(block.block for block in quantizing), last]:
        block.register_forward_pre_hook(lambda _, args: received.append(type(args[1])))

    torch.manual_seed(5)
    n, lengths = 96, torch.tensor([70, 96], dtype=torch.int32)
    padding = Padding.of(lengths, n)
    x, cond = torch.randn(2, n, 100, dtype=torch.bfloat16), torch.randn(2, n, 100, dtype=torch.bfloat16)
    text_emb = dit.embed_text(torch.randint(0, 50, (2, 40)), n, padding.mask).to(torch.bfloat16)
    condition = dit.condition(torch.tensor([0.3, 0.3], dtype=torch.bfloat16))
    got = dit.flow(x, cond, text_emb, condition, padding)
    assert received == [torch.Tensor] + [fp8.QuantizedRows] * (len(blocks) - 1)

    dit.transformer_blocks = torch.nn.ModuleList([*(block.block for block in quantizing), last])  # unquantized outputs
    want = dit.flow(x, cond, text_emb, condition, padding)
    assert torch.isfinite(got).all() and torch.equal(got, want)
