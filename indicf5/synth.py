"""Text + reference voice -> 24 kHz speech, as IndicF5's ``infer_process`` does it:

    reference wav ─prepare─> 24 kHz mono ─mel─> cond (1, n_ref, 100)
    text ─chunk (~25 s of speech each)─> for each chunk:
        ids(ref_text + chunk), frames ≈ n_ref * (1 + bytes(chunk) / bytes(ref_text)) / speed
        ─sample (flow model)─> mel ─drop reference frames─> vocoder ─> wave (scaled back to the ref's RMS)
    chunks ─cross-fade─> wave
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from indicf5.backends import load_engine
from indicf5.audio import MelSpectrogram, Reference, cross_fade, prepare_reference
from indicf5.checkpoint import build_model, load_checkpoint
from indicf5.config import TORCH_DTYPES, DType, MelConfig, SamplingConfig
from indicf5.sampler import FlowModel, sample
from indicf5.text import Vocab, check_text, chunk_budget, chunk_text, encode, estimate_frames, normalize_ref_text
from indicf5.vocoder import decode, load_vocoder

@dataclass
class Speech:
    wave: np.ndarray  # (samples,) float32 at sample_rate
    sample_rate: int
    mel: np.ndarray  # (n_mels, frames) the generated frames of all chunks
    chunks: list[str]


@dataclass
class Synthesizer:
    model: FlowModel
    vocoder: torch.nn.Module
    vocab: Vocab
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    mel_config: MelConfig = MelConfig()

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", dtype: DType = "fp32",
                        vocab: str | Path | None = None, vocoder_dir: str | Path | None = None) -> "Synthesizer":
        ckpt = load_checkpoint(path, vocab)
        torch_dtype = TORCH_DTYPES[dtype]
        vocoder = load_vocoder(ckpt.vocoder if vocoder_dir is None else None, vocoder_dir, device)
        return cls(build_model(ckpt, device, torch_dtype), vocoder, ckpt.vocab, device, torch_dtype)

    @classmethod
    def from_engine(cls, engine_dir: str | Path, *, device: str = "cpu", vocoder_dir: str | Path | None = None) -> "Synthesizer":
        """A built engine directory (any backend), as the build DAG leaves it."""
        model, spec, vocab_path, vocoder_state = load_engine(engine_dir, device)
        vocoder = load_vocoder(vocoder_state if vocoder_dir is None else None, vocoder_dir, device)
        return cls(model, vocoder, Vocab.load(vocab_path), device, TORCH_DTYPES[spec.dtype])

    def reference_mel(self, ref: Reference) -> torch.Tensor:
        """(1, frames, n_mels) conditioning mel of a prepared reference."""
        mel = MelSpectrogram(self.mel_config).to(self.device)
        return mel(ref.wave.to(self.device)).transpose(1, 2)

    def synthesize(self, text: str, ref_audio: str | Path, ref_text: str, sampling: SamplingConfig = SamplingConfig(),
                   progress: bool = False) -> Speech:
        check_text(text, self.vocab)
        check_text(ref_text, self.vocab, "reference text")
        ref = prepare_reference(ref_audio, sampling.target_rms, self.mel_config)
        ref_text = normalize_ref_text(ref_text)
        chunks = chunk_text(text, chunk_budget(ref_text, ref.seconds))
        if len(ref_text[-1].encode()) == 1:  # upstream adds one more space before the generated text
            ref_text += " "
        cond = self.reference_mel(ref)
        ref_frames = ref.wave.shape[-1] // self.mel_config.hop_length

        waves, mels = [], []
        with tqdm(total=len(chunks) * sampling.nfe, desc="synthesis", unit="step", disable=not progress) as bar:
            for chunk in chunks:
                chunk_ids = encode(ref_text + chunk, self.vocab)
                frames = estimate_frames(ref_frames, ref_text, chunk, sampling.speed)
                mel = sample(self.model, cond, chunk_ids[None].to(self.device), [frames], nfe=sampling.nfe,
                             cfg_strength=sampling.cfg_strength, sway_coef=sampling.sway_coef, seed=sampling.seed,
                             max_frames=sampling.max_frames, dtype=self.dtype, on_step=bar.update)
                generated = mel[:, ref_frames:, :].transpose(1, 2)  # (1, n_mels, frames)
                wave = decode(self.vocoder, generated)[0]
                if ref.source_rms < sampling.target_rms:
                    wave = wave * ref.source_rms / sampling.target_rms
                waves.append(wave.cpu().numpy())
                mels.append(generated[0].cpu().numpy())
        return Speech(cross_fade(waves, self.mel_config.sample_rate, sampling.cross_fade_s),
                      self.mel_config.sample_rate, np.concatenate(mels, axis=1), chunks)
