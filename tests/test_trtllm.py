"""The TensorRT-LLM backend without TensorRT: the converter against the naming table, and the
converted checkpoint executed by torch with the network's math against the reference DiT."""

from __future__ import annotations

import importlib.util
import json
import py_compile
from pathlib import Path

import pytest
import torch

from conftest import rel_l2
from indicf5.backends import get_backend
from indicf5.backends.trtllm.backend import TRTLLM_SOURCES
from indicf5.checkpoint import build_model, export_transformer, load_export
from indicf5.errors import InputError
from indicf5.parity import ParityConfig
from indicf5.synthetic import make_synthetic
from indicf5.backends.trtllm.convert import convert_checkpoint, trtllm_weights
from indicf5.backends.trtllm.executor import CheckpointExecutor
from indicf5.backends.trtllm.layout import checkpoint_config, is_text_weight, model_config_of, weight_table

SIZES = {
    "small": dict(dim=64, depth=2, heads=4),
    "wider": dict(dim=96, depth=3, heads=6, text_dim=48, conv_layers=2),
    "two-heads": dict(dim=128, depth=1, heads=2),
}


@pytest.fixture(scope="module", params=list(SIZES))
def export(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    out = root / "export"
    out.mkdir()
    export_transformer(make_synthetic(root / "IndicF5", **SIZES[request.param], seed=3), out)
    return out


def converted(export: Path, dtype: str, root: Path) -> Path:
    out = root / f"checkpoint-{dtype}"
    out.mkdir()
    convert_checkpoint(export, dtype, out)
    return out


def inputs(config, b: int = 3, n: int = 57, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, cond = torch.randn(b, n, config.mel_dim, generator=g), torch.randn(b, n, config.mel_dim, generator=g)
    text_emb = torch.randn(b, n, config.text_dim, generator=g)
    return x, cond, text_emb, torch.rand(b, generator=g), torch.tensor([n, n - 13, 9][:b])


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_the_converted_checkpoint_computes_the_reference_dit(export, dtype, tmp_path):
    ckpt = load_export(export)
    reference = build_model(ckpt)
    executor = CheckpointExecutor(converted(export, dtype, tmp_path))
    x, cond, text_emb, time, lengths = inputs(ckpt.config)
    mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    wd = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    limit = 1e-5 if dtype == "fp32" else ParityConfig().thresholds["fp16"]
    with torch.no_grad():
        full = executor(x.to(wd), cond.to(wd), text_emb.to(wd), time, torch.full_like(lengths, x.shape[1])).float()
        assert rel_l2(full, reference(x, cond, text_emb, time)) <= limit
        masked = executor(x.to(wd), cond.to(wd), text_emb.to(wd), time, lengths).float()
        want = reference(x, cond, text_emb, time, mask)
        for row, n in enumerate(lengths.tolist()):  # each row's real frames; padding is not compared
            assert rel_l2(masked[row, :n], want[row, :n]) <= limit, row


def test_converter_output_is_what_the_naming_table_promises(export, tmp_path):
    ckpt = load_export(export)
    out = converted(export, "fp16", tmp_path)
    from safetensors.torch import load_file

    weights = load_file(str(out / "rank0.safetensors"))
    table = weight_table(ckpt.config)
    assert {name: tuple(t.shape) for name, t in weights.items()} == {w.name: w.shape for w in table}
    assert {t.dtype for t in weights.values()} == {torch.float16}
    used = {s for w in table for s in w.sources}
    text = load_file(str(out / "text_embed.safetensors"))
    assert set(text) == {k for k in ckpt.transformer if is_text_weight(k)}
    assert set(ckpt.transformer) - used - set(text) <= {"rotary_embed.inv_freq"}  # every weight goes somewhere
    config = json.loads((out / "config.json").read_text())
    assert config == checkpoint_config(ckpt.config, "fp16") and config["architecture"] == "IndicF5DiT"
    assert model_config_of(config) == ckpt.config
    # fused q|k|v rows, and 2-D convolution kernels
    assert torch.equal(
        weights["blocks.0.attn.qkv.weight"][: ckpt.config.dim].float(),
        ckpt.transformer["transformer_blocks.0.attn.to_q.weight"].half().float(),
    )
    assert weights["input_embed.conv1.weight"].shape[2] == 1


@pytest.mark.parametrize("damage", ["missing", "misshapen"])
def test_a_missing_or_misshapen_tensor_is_refused_by_name(export, damage):
    ckpt = load_export(export)
    state = dict(ckpt.transformer)
    name = "transformer_blocks.0.attn.to_k.weight"
    if damage == "missing":
        del state[name]
    else:
        state[name] = state[name][:, :-1]
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        trtllm_weights(state, ckpt.config, "fp16")


def test_network_runtime_and_config_sources_compile_and_key_the_cache():
    names = {p.name for p in TRTLLM_SOURCES}
    assert {"model.py", "config.py", "runtime.py", "convert.py", "layout.py", "executor.py"} <= names
    for path in TRTLLM_SOURCES:
        py_compile.compile(str(path), doraise=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here")
def test_without_tensorrt_llm_the_backend_says_how_to_install_it():
    from indicf5.environment import check_environment

    why = get_backend("trtllm").unavailable()
    assert "TensorRT-LLM" in why and "pip install" in why and "0.16.0" in why
    assert check_environment().backends["trtllm"] == why
