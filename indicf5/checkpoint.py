"""IndicF5 checkpoints as found in the wild, normalised to the DiT's own parameter names.

An HF snapshot of ai4bharat/IndicF5 holds ``model.safetensors`` (keys
``ema_model._orig_mod.transformer.*`` and ``vocoder._orig_mod.*``), ``checkpoints/vocab.txt`` and
``config.json``. Trainer checkpoints (``.pt``) hold ``{"ema_model_state_dict": ...}``; exports and
other tools use ``ema_model.transformer.``, ``model.transformer.``, ``transformer.`` or
``_orig_mod.`` prefixes. All of them load to the same state. Sizes are read off the weights.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from indicf5.config import ModelConfig
from indicf5.errors import InputError
from indicf5.model import DiT, rope_inv_freq
from indicf5.text import Vocab

WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "checkpoints/vocab.txt"
CONFIG_FILE = "config.json"

_VOCODER = re.compile(r"^vocoder\.(_orig_mod\.)?")
_WRAPPER = re.compile(r"^(ema_model\.|model\.)?(_orig_mod\.)?(transformer\.)?")
# CFM/EMA bookkeeping that is not part of the transformer
_NOT_WEIGHTS = re.compile(r"^(initted|step|mel_spec\..*)$")
_OPTIONAL = {"rotary_embed.inv_freq"}  # derived from dim_head; older exports omit it


@dataclass
class Checkpoint:
    config: ModelConfig
    transformer: dict[str, torch.Tensor]  # the DiT's own names
    vocoder: dict[str, torch.Tensor] | None  # Vocos' own names, when bundled
    vocab: Vocab
    source: Path


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix in (".pt", ".pth", ".ckpt"):
            raw = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("ema_model_state_dict", "model_state_dict"):  # EMA weights are the ones to serve
                if isinstance(raw, dict) and key in raw:
                    return raw[key]
            return raw
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise InputError(
                f"checkpoint {path} holds Python objects besides tensors and was refused "
                "(.pt files load with weights_only=True): save a plain state dict"
            ) from None
        raise InputError(
            f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0]}): download it again"
        ) from None
    except (SafetensorError, RuntimeError, EOFError, OSError) as e:
        raise InputError(
            f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0]}): download it again"
        ) from None
    raise InputError(f"unsupported checkpoint file {path.name}: expected .safetensors or .pt")


def split_state(raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Raw keys -> (transformer state, vocoder state), prefixes stripped; EMA wins over plain copies."""
    transformer, vocoder = {}, {}
    for key in sorted(raw, key=lambda k: not k.startswith("ema_model.")):
        if not isinstance(raw[key], torch.Tensor):
            continue
        if _VOCODER.match(key):
            vocoder[_VOCODER.sub("", key)] = raw[key]
            continue
        name = _WRAPPER.sub("", key)
        if not _NOT_WEIGHTS.match(name):
            transformer.setdefault(name, raw[key])
    return transformer, vocoder


def infer_config(state: dict[str, torch.Tensor], config_json: dict | None = None) -> ModelConfig:
    """Sizes from the weights' shapes; dim_head from the rotary buffer or config.json, else 64."""
    try:
        dim = state["time_embed.time_mlp.0.weight"].shape[0]
        vocab_rows, text_dim = state["text_embed.text_embed.weight"].shape
        ff_hidden = state["transformer_blocks.0.ff.ff.0.0.weight"].shape[0]
        mel_dim = state["proj_out.weight"].shape[0]
    except KeyError as e:
        raise InputError(
            f"not an F5-TTS DiT checkpoint: it has no {e.args[0]!r} (keys seen: {', '.join(sorted(state)[:5])}, ...)"
        ) from None
    count = lambda prefix: len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})
    config_json = config_json or {}
    if "rotary_embed.inv_freq" in state:
        dim_head = 2 * state["rotary_embed.inv_freq"].shape[0]
    else:
        dim_head = int(config_json.get("dim_head", 64))
    try:
        return ModelConfig(
            dim=dim,
            depth=count("transformer_blocks."),
            heads=dim // dim_head,
            dim_head=dim_head,
            ff_mult=ff_hidden // dim,
            text_dim=text_dim,
            conv_layers=count("text_embed.text_blocks."),
            mel_dim=mel_dim,
            text_num_embeds=vocab_rows - 1,
        )
    except ValueError as e:
        raise InputError(f"checkpoint sizes are inconsistent: {e}") from None


def validate(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every expected tensor present with the right shape, nothing extra; one error names all."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiT(config).state_dict().items()}
    state = dict(state)
    for key in _OPTIONAL - state.keys():
        state[key] = rope_inv_freq(config.dim_head)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
        if items
    ]
    if problems:
        raise InputError("checkpoint does not match IndicF5's DiT architecture: " + "; ".join(problems))
    check_finite(state, "checkpoint")
    return state


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Weights holding NaN or Inf would synthesise silence without a word: refuse them, naming the tensors."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise InputError(
            f"{what} weights hold NaN or Inf in {len(bad)} tensor(s): {', '.join(bad[:8])}"
            f"{' ...' if len(bad) > 8 else ''}: the file is damaged; download or export it again"
        )


def load_checkpoint(path: str | Path, vocab_path: str | Path | None = None) -> Checkpoint:
    """A snapshot directory, or a single .safetensors/.pt file (then vocab_path is needed)."""
    path = Path(path)
    config_json = None
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        vocab_path = vocab_path or path / VOCAB_FILE
        if (path / CONFIG_FILE).is_file():
            try:
                config_json = json.loads((path / CONFIG_FILE).read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"{path / CONFIG_FILE} is not valid JSON: {e}") from None
    elif path.exists():
        weights = path
        if vocab_path is None:
            raise InputError(f"{path} is a single weights file: also give its vocab.txt (--vocab)")
    else:
        raise InputError(f"checkpoint not found: {path} (a snapshot directory or a .safetensors/.pt file)")
    transformer, vocoder = split_state(_read_weights(weights))
    config = infer_config(transformer, config_json)
    transformer = validate(transformer, config)
    if vocoder:
        check_finite(vocoder, "the bundled vocoder's")
    vocab = Vocab.load(vocab_path)
    if len(vocab) != config.text_num_embeds:
        raise InputError(
            f"vocab.txt has {len(vocab)} entries but the checkpoint's text embedding expects {config.text_num_embeds}: "
            "wrong vocab.txt for this model"
        )
    return Checkpoint(config, transformer, vocoder or None, vocab, path)


def build_model(ckpt: Checkpoint, device="cpu", dtype: torch.dtype = torch.float32) -> DiT:
    model = DiT(ckpt.config)
    model.load_state_dict(ckpt.transformer)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# runbook step 1: export the transformer

EXPORT_PT = "indicf5_transformer.pt"
EXPORT_SAFETENSORS = "indicf5_transformer.safetensors"
EXPORT_VOCAB = "vocab.txt"
EXPORT_VOCODER = "vocoder.safetensors"
EXPORT_PREFIX = "ema_model.transformer."  # what the runbook's TensorRT-LLM converter expects


def export_transformer(snapshot: str | Path, out: Path) -> dict:
    """Writes ``indicf5_transformer.pt`` ({"ema_model_state_dict": {"ema_model.transformer.*"}}),
    its safetensors twin, the vocab and (when bundled) the vocoder weights into `out`."""
    ckpt = load_checkpoint(snapshot)
    state = {EXPORT_PREFIX + k: v.contiguous() for k, v in ckpt.transformer.items()}
    torch.save({"ema_model_state_dict": state}, out / EXPORT_PT)
    save_file(state, str(out / EXPORT_SAFETENSORS), metadata={"format": "pt"})
    (out / EXPORT_VOCAB).write_text("".join(c + "\n" for c in ckpt.vocab.chars), encoding="utf-8")
    if ckpt.vocoder:
        save_file({k: v.contiguous() for k, v in ckpt.vocoder.items()}, str(out / EXPORT_VOCODER))
    return {
        "model": ckpt.config.model_dump(),
        "parameters": sum(v.numel() for v in ckpt.transformer.values()),
        "vocoder_bundled": bool(ckpt.vocoder),
    }


def load_export(export_dir: Path) -> Checkpoint:
    ckpt = load_checkpoint(export_dir / EXPORT_SAFETENSORS, export_dir / EXPORT_VOCAB)
    if (export_dir / EXPORT_VOCODER).is_file():
        ckpt.vocoder = load_file(str(export_dir / EXPORT_VOCODER))
    return ckpt
