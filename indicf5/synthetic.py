"""Synthetic IndicF5 snapshots: the real file names and key layout, random weights, small sizes.

They stand in for ai4bharat/IndicF5 wherever the real one cannot be fetched (tests, CI, the
demo): same ``model.safetensors`` keys (``ema_model._orig_mod.transformer.*``,
``vocoder._orig_mod.*``), ``checkpoints/vocab.txt`` over the scripts IndicF5 speaks, a
``config.json``, and a short reference clip with its transcript.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from indicf5.audio import audio_bytes
from indicf5.checkpoint import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE
from indicf5.config import ModelConfig
from indicf5.model import DiT
from indicf5.store import atomic_dir
from indicf5.vocoder import build_vocos

# Devanagari, Bengali/Assamese, Gurmukhi, Gujarati, Odia, Tamil, Telugu, Kannada, Malayalam
INDIC_BLOCKS = [
    (0x0900, 0x0980),
    (0x0980, 0x0A00),
    (0x0A00, 0x0A80),
    (0x0A80, 0x0B00),
    (0x0B00, 0x0B80),
    (0x0B80, 0x0C00),
    (0x0C00, 0x0C80),
    (0x0C80, 0x0D00),
    (0x0D00, 0x0D80),
]
REF_TEXT = "नमस्ते, यह एक परीक्षण है।"
REF_WAV = "reference.wav"
REF_TXT = "reference.txt"


def synthetic_vocab() -> list[str]:
    """Space first (token 0, also read for unknown characters), then printable ASCII and every
    assigned character of the Indic blocks, plus the zero-width (non-)joiners."""
    chars = [" "] + [chr(c) for c in range(0x21, 0x7F)]
    chars += [chr(c) for lo, hi in INDIC_BLOCKS for c in range(lo, hi) if unicodedata.name(chr(c), "")]
    return chars + ["\u200c", "\u200d"]


def random_transformer(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """PyTorch's default init, with the zero-initialised parts (GRN) made non-trivial too."""
    torch.manual_seed(seed)
    model = DiT(config)
    for name, p in model.named_parameters():
        if ".grn." in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.state_dict()


def random_vocoder(seed: int, dim: int = 64, hidden: int = 192, layers: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_vocos(dim, hidden, layers).state_dict()


def reference_clip(seconds: float = 2.0, rate: int = 24_000, seed: int = 0) -> np.ndarray:
    """A voiced-sounding clip: a gliding harmonic tone under a syllable-rate envelope, with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    return (0.15 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def make_synthetic(out: str | Path, *, replace: bool = False, **sizes) -> Path:
    """A synthetic snapshot at `out`, written whole or not at all (see `write_synthetic` for `sizes`)."""
    out = Path(out)
    with atomic_dir(out, replace=replace) as tmp:
        write_synthetic(tmp, **sizes)
    return out


def write_synthetic(
    out: Path,
    *,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    text_dim: int = 32,
    conv_layers: int = 1,
    ff_mult: int = 2,
    seed: int = 0,
) -> dict:
    """The snapshot's files into the existing directory `out`; returns its config. The same sizes
    and seed give the same bytes."""
    vocab = synthetic_vocab()
    config = ModelConfig(
        dim=dim,
        depth=depth,
        heads=heads,
        dim_head=dim // heads,
        ff_mult=ff_mult,
        text_dim=text_dim,
        conv_layers=conv_layers,
        text_num_embeds=len(vocab),
    )
    tensors = {f"ema_model._orig_mod.transformer.{k}": v for k, v in random_transformer(config, seed).items()}
    tensors |= {f"vocoder._orig_mod.{k}": v for k, v in random_vocoder(seed).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / VOCAB_FILE).parent.mkdir()
    (out / VOCAB_FILE).write_text("".join(c + "\n" for c in vocab), encoding="utf-8")
    (out / CONFIG_FILE).write_text(
        json.dumps(
            {
                "architectures": ["INF5Model"],
                "model_type": "inf5",
                "vocab_path": VOCAB_FILE,
                "synthetic": True,
                "seed": seed,
                **config.model_dump(),
            },
            indent=2,
        )
    )
    (out / REF_WAV).write_bytes(audio_bytes(reference_clip(seed=seed), 24_000))
    (out / REF_TXT).write_text(REF_TEXT + "\n", encoding="utf-8")
    return config.model_dump()
