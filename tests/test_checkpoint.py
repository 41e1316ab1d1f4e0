"""Checkpoint layouts: every prefix seen in the wild loads to the same state; bad files are refused."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from indicf5.checkpoint import build_model, load_checkpoint, split_state
from indicf5.errors import InputError

PREFIXES = [
    "ema_model._orig_mod.transformer.",
    "ema_model.transformer.",
    "model.transformer.",
    "transformer.",
    "_orig_mod.",
    "",
]


@pytest.fixture()
def raw(snapshot):
    return load_file(str(snapshot / "model.safetensors"))


def transformer_keys(raw):
    return {k.removeprefix("ema_model._orig_mod.transformer."): v for k, v in raw.items() if k.startswith("ema_model.")}


def test_snapshot_layout_is_indicf5s(snapshot, raw):
    assert (snapshot / "checkpoints" / "vocab.txt").is_file() and (snapshot / "config.json").is_file()
    assert any(k.startswith("ema_model._orig_mod.transformer.transformer_blocks.0.attn.to_q") for k in raw)
    assert any(k.startswith("vocoder._orig_mod.backbone.") for k in raw)
    assert all(k.startswith(("ema_model._orig_mod.transformer.", "vocoder._orig_mod.")) for k in raw)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_every_prefix_loads_to_the_same_state(tmp_path, snapshot, checkpoint, raw, prefix, suffix):
    state = {prefix + k: v for k, v in transformer_keys(raw).items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save({"ema_model_state_dict": state | {"initted": torch.tensor(True), "step": torch.tensor(5)}}, path)
    else:
        save_file(state, str(path))
    loaded = load_checkpoint(path, vocab_path=snapshot / "checkpoints" / "vocab.txt")
    assert loaded.config == checkpoint.config
    assert loaded.transformer.keys() == checkpoint.transformer.keys()
    assert all(torch.equal(loaded.transformer[k], checkpoint.transformer[k]) for k in loaded.transformer)


def test_vocoder_weights_are_found_under_both_prefixes(raw):
    for prefix in ("vocoder._orig_mod.", "vocoder."):
        renamed = {k.replace("vocoder._orig_mod.", prefix): v for k, v in raw.items()}
        _, vocoder = split_state(renamed)
        assert "backbone.embed.weight" in vocoder and "head.out.weight" in vocoder


def test_ema_weights_win_over_plain_model_weights(raw):
    ema = transformer_keys(raw)
    plain = {f"model.transformer.{k}": torch.zeros_like(v) for k, v in ema.items()}
    state, _ = split_state(plain | {f"ema_model.transformer.{k}": v for k, v in ema.items()})
    assert all(torch.equal(state[k], ema[k]) for k in ema)


def test_sizes_are_read_off_the_weights(checkpoint, snapshot):
    declared = json.loads((snapshot / "config.json").read_text())
    for field in ("dim", "depth", "heads", "dim_head", "text_dim", "conv_layers", "ff_mult", "text_num_embeds"):
        assert getattr(checkpoint.config, field) == declared[field], field


def _write_snapshot(tmp_path, snapshot, tensors):
    out = tmp_path / "snap"
    shutil.copytree(snapshot, out)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_missing_unexpected_and_misshapen_keys_are_named_in_one_error(tmp_path, snapshot, raw):
    broken = dict(raw)
    del broken["ema_model._orig_mod.transformer.transformer_blocks.1.attn.to_v.weight"]
    broken["ema_model._orig_mod.transformer.transformer_blocks.0.attn.q_norm.weight"] = torch.ones(16)
    key = "ema_model._orig_mod.transformer.proj_out.bias"
    broken[key] = torch.zeros(broken[key].shape[0] + 1)
    with pytest.raises(InputError) as err:
        load_checkpoint(_write_snapshot(tmp_path, snapshot, broken))
    message = str(err.value)
    assert "transformer_blocks.1.attn.to_v.weight" in message and "missing" in message
    assert "transformer_blocks.0.attn.q_norm.weight" in message and "unexpected" in message
    assert "proj_out.bias" in message and "wrong shape" in message


def test_another_architecture_is_refused(tmp_path, snapshot):
    other = {"ema_model._orig_mod.transformer.layers.0.attn.to_q.weight": torch.zeros(8, 8)}
    with pytest.raises(InputError, match="not an F5-TTS DiT checkpoint"):
        load_checkpoint(_write_snapshot(tmp_path, snapshot, other))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_are_refused(tmp_path, snapshot, damage):
    out = tmp_path / "snap"
    shutil.copytree(snapshot, out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(out)


def test_pt_files_load_with_weights_only(tmp_path, snapshot):
    """A pickle that would run code on load is refused, not executed."""
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(snapshot),))

    with open(path, "wb") as f:
        pickle.dump({"ema_model_state_dict": Payload()}, f)
    with pytest.raises(InputError, match="weights_only=True"):
        load_checkpoint(path, vocab_path=snapshot / "checkpoints" / "vocab.txt")
    assert snapshot.is_dir()


def test_missing_files_and_wrong_vocab_are_refused(tmp_path, snapshot):
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")
    out = tmp_path / "snap"
    shutil.copytree(snapshot, out)
    (out / "checkpoints" / "vocab.txt").write_text("a\nb\nc\n")
    with pytest.raises(InputError, match="vocab.txt has 3 entries"):
        load_checkpoint(out)
    (out / "checkpoints" / "vocab.txt").unlink()
    with pytest.raises(InputError, match="vocab file not found"):
        load_checkpoint(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(InputError, match="checkpoint file not found"):
        load_checkpoint(out)
    with pytest.raises(InputError, match="--vocab"):
        load_checkpoint(snapshot / "model.safetensors")


def test_build_model_casts_to_the_dtype(checkpoint):
    model = build_model(checkpoint, dtype=torch.float16)
    assert model.proj_out.weight.dtype == torch.float16
    assert torch.equal(model.proj_out.weight.float(), checkpoint.transformer["proj_out.weight"].half().float())
