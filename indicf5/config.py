"""Typed settings at the library's edges: model architecture, mel features, sampling."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

DType = Literal["fp32", "fp16", "bf16"]
Schedule = Literal["uniform", "epss"]
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SEED_MAX = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1; a signed 64-bit seed survives every JSON client
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


def check_device(name: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N (N below the GPU count)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"no device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


Device = Annotated[str, AfterValidator(check_device)]


class ModelConfig(BaseModel):
    """The F5-TTS DiT as IndicF5 configures it (F5TTS_Base: the v0 architecture)."""

    model_config = ConfigDict(frozen=True)

    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 2
    text_dim: int = 512
    conv_layers: int = 4
    mel_dim: int = 100
    text_num_embeds: int = Field(2545, description="vocab size; the embedding has one more row (filler 0)")

    @model_validator(mode="after")
    def _heads_fit(self) -> "ModelConfig":
        if self.heads * self.dim_head != self.dim:
            raise ValueError(
                f"heads*dim_head must equal dim, got {self.heads}*{self.dim_head} != {self.dim}: "
                "choose heads that divide dim"
            )
        return self


class MelConfig(BaseModel):
    """Vocos' 24 kHz mel front end; IndicF5 was trained on exactly these features."""

    model_config = ConfigDict(frozen=True)

    sample_rate: int = 24_000
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 100


class SamplingConfig(BaseModel):
    """IndicF5's inference defaults (f5_tts/infer/utils_infer.py)."""

    nfe: int = Field(32, ge=1, le=1024, description="Euler steps (number of function evaluations)")
    cfg_strength: float = Field(2.0, ge=0.0, description="classifier-free guidance strength")
    sway_coef: float | None = Field(-1.0, description="sway sampling coefficient; None for a uniform grid")
    schedule: Schedule = Field(
        "uniform",
        description="time grid before sway: uniform (IndicF5's), or epss, f5-tts "
        "1.1's Empirically Pruned Step Sampling for 5, 6, 7, 10, 12 and 16 steps (uniform otherwise)",
    )
    speed: float = Field(1.0, gt=0.0, description="speech rate; >1 is faster (shorter duration)")
    target_rms: float = Field(0.1, gt=0.0, description="quiet references are raised to this RMS")
    cross_fade_s: float = Field(0.15, ge=0.0, description="cross-fade between text chunks")
    max_frames: int = Field(4096, description="IndicF5's longest generated sequence (~43.7 s)")
    seed: Seed | None = None
