"""The Vocos vocoder (mel -> 24 kHz wave) through the ``vocos`` package, never from the hub.

Weights come from the snapshot when it bundles them (``vocoder._orig_mod.*``, as IndicF5's
model.safetensors does) or from a local vocos directory (``config.yaml`` + ``pytorch_model.bin``,
the files of charactr/vocos-mel-24khz). Sizes are read off the weights, so small synthetic
vocoders load the same way as the real one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from vocos import Vocos
from vocos.feature_extractors import MelSpectrogramFeatures
from vocos.heads import ISTFTHead
from vocos.models import VocosBackbone

from indicf5.config import MelConfig
from indicf5.errors import InputError


def build_vocos(dim: int = 512, hidden: int = 1536, layers: int = 8, mel: MelConfig = MelConfig()) -> Vocos:
    """An untrained mel Vocos; the defaults are charactr/vocos-mel-24khz's sizes."""
    return Vocos(
        feature_extractor=MelSpectrogramFeatures(
            mel.sample_rate, mel.n_fft, mel.hop_length, mel.n_mels, padding="center"
        ),
        backbone=VocosBackbone(mel.n_mels, dim, hidden, layers),
        head=ISTFTHead(dim, mel.n_fft, mel.hop_length, padding="same"),
    )


def vocos_for_weights(state: dict[str, torch.Tensor], mel: MelConfig = MelConfig()) -> Vocos:
    """An untrained Vocos whose sizes match `state`."""
    try:
        dim = state["backbone.embed.weight"].shape[0]
        hidden = state["backbone.convnext.0.pwconv1.weight"].shape[0]
    except KeyError as e:
        raise InputError(f"vocoder weights lack {e.args[0]}: not a mel Vocos vocoder") from None
    layers = len({k.split(".")[2] for k in state if k.startswith("backbone.convnext.")})
    return build_vocos(dim, hidden, layers, mel)


def load_vocoder(
    state: dict[str, torch.Tensor] | None = None, local_dir: str | Path | None = None, device="cpu"
) -> Vocos:
    if state is None and local_dir is None:
        raise InputError(
            "no vocoder: the checkpoint bundles no vocoder weights; pass --vocoder DIR with a local copy of "
            "charactr/vocos-mel-24khz (config.yaml + pytorch_model.bin)"
        )
    if state is None:
        local_dir = Path(local_dir)
        config, weights = local_dir / "config.yaml", local_dir / "pytorch_model.bin"
        for f in (config, weights):
            if not f.is_file():
                raise InputError(f"vocoder directory lacks {f.name}: {local_dir}")
        vocoder = Vocos.from_hparams(str(config))
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        vocoder = vocos_for_weights(state)
    try:
        vocoder.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"vocoder weights do not fit a Vocos model: {str(e).splitlines()[0]}") from None
    return vocoder.eval().to(device)


@torch.inference_mode()
def decode(vocoder: Vocos, mel: torch.Tensor) -> torch.Tensor:
    """(b, n_mels, frames) log-mel in fp32 -> (b, samples) wave; 256 samples a frame."""
    return vocoder.decode(mel.float())
