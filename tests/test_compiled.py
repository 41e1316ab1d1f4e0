"""The compiled engine on CPU: a real build artifact, padding to buckets changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_l2

from indicf5.backends.compiled import CompiledBackend, CompiledEngine, bucket_for
from indicf5.checkpoint import build_model
from indicf5.sampler import sample


def test_bucket_choice():
    assert bucket_for(100, (128, 256)) == 128 and bucket_for(128, (128, 256)) == 128 and bucket_for(129, (128, 256)) == 256
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(300, (128, 256))


def test_padding_to_a_bucket_does_not_change_the_result(checkpoint):
    reference = build_model(checkpoint)
    engine = CompiledEngine(build_model(checkpoint), buckets=(128, 256))
    torch.manual_seed(0)
    for n in (70, 128, 200):  # inside a bucket, exactly a bucket, inside the next
        cond, text = torch.randn(1, n // 3, 100), torch.randint(0, 100, (1, n // 4))
        want = sample(reference, cond, text, [n], nfe=3, seed=1)
        got = sample(engine, cond, text, [n], nfe=3, seed=1)
        assert rel_l2(got, want) <= 1e-5, n


def test_build_saves_compiler_artifacts_and_loads(tmp_path, checkpoint):
    from safetensors.torch import save_file

    from indicf5.backends.base import EngineSpec

    backend = CompiledBackend()
    converted, engine_dir = tmp_path / "converted", tmp_path / "engine"
    converted.mkdir(), engine_dir.mkdir()
    save_file(checkpoint.transformer, str(converted / "model.safetensors"))
    spec = EngineSpec(backend="compiled", dtype="fp32", model=checkpoint.config,
                      build_flags={**backend.default_flags(), "buckets": [128, 256], "device": "cpu"})
    info = backend.build(converted, spec, engine_dir)
    assert (engine_dir / "compile_cache.bin").stat().st_size > 0 and info["device"] == "cpu"
    engine = backend.load(engine_dir, spec, "cpu")
    reference = build_model(checkpoint)
    cond, text = torch.randn(1, 30, 100), torch.randint(0, 100, (1, 20))
    assert rel_l2(sample(engine, cond, text, [100], nfe=2, seed=0), sample(reference, cond, text, [100], nfe=2, seed=0)) <= 1e-5


def test_mixed_precision_bf16_keeps_closer_to_fp32_than_pure_bf16(checkpoint):
    reference = build_model(checkpoint)
    cond, text = torch.randn(1, 60, 100), torch.randint(0, 100, (1, 50))
    want = sample(reference, cond, text, [200], nfe=8, seed=0)
    pure = sample(build_model(checkpoint, "cpu", torch.bfloat16), cond, text, [200], nfe=8, seed=0, dtype=torch.bfloat16)
    errors = {}
    for precision in ("pure", "mixed"):
        engine = CompiledEngine(build_model(checkpoint, "cpu", torch.bfloat16), buckets=(256,), precision=precision)
        got = sample(engine, cond, text, [200], nfe=8, seed=0, dtype=engine.state_dtype)
        assert torch.isfinite(got).all()
        errors[precision] = rel_l2(got, want)
    # the fp32 ODE state alone helps; fp32 between the matmuls helps most
    assert errors["mixed"] < errors["pure"] < rel_l2(pure, want), (errors, rel_l2(pure, want))
    assert errors["mixed"] < 0.5 * rel_l2(pure, want)


TRITON_CONV_CHECK = """
import sys, torch
from indicf5.backends.compiled import TritonConvPositionEmbedding
from indicf5.model import ConvPositionEmbedding
torch.manual_seed(0)
reference = ConvPositionEmbedding(128).eval()
x = torch.randn(2, 150, 128)
mask = torch.arange(150)[None] < torch.tensor([150, 97])[:, None]  # a full row and a padded one
with torch.no_grad():
    want = reference(x, mask)
    for dtype in (torch.float32, torch.float16):
        got = TritonConvPositionEmbedding(reference, dtype)(x.to(dtype), mask).float()
        print(str(dtype), float((got - want).norm() / want.norm()))
"""


def test_the_triton_position_convolution_computes_the_reference():
    """conv_kernel.py's kernel, run by Triton's interpreter on the CPU, as the engine calls it."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TRITON_CONV_CHECK], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    errors = dict(line.split() for line in done.stdout.splitlines())
    assert float(errors["torch.float32"]) <= 1e-5 and float(errors["torch.float16"]) <= 2e-3, errors


def test_the_triton_convolution_needs_cuda(checkpoint):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CompiledEngine(build_model(checkpoint), buckets=(128,), conv="triton")
