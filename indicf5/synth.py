"""Text + reference voice -> 24 kHz speech, as IndicF5's ``infer_process`` does it:

    reference wav ─prepare─> 24 kHz mono ─mel─> cond (n_ref, 100)
    text ─chunk (~25 s of speech each)─> one Row per chunk:
        ids(ref_text + chunk), frames ≈ n_ref * (1 + bytes(chunk) / bytes(ref_text)) / speed
    rows ─render (sample, any batch of rows)─> mel ─drop reference frames─> vocoder ─> wave
    waves ─finish (scaled back to the ref's RMS, cross-faded)─> speech

`synthesize` renders an utterance's rows one at a time; the server renders rows of several
requests in one batch (a row's result does not depend on its batch-mates).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from indicf5.backends import load_engine
from indicf5.audio import CrossFade, MelSpectrogram, Reference, cross_fade, prepare_reference
from indicf5.checkpoint import build_model, load_checkpoint
from indicf5.config import TORCH_DTYPES, DType, MelConfig, SamplingConfig
from torch.nn.utils.rnn import pad_sequence

from indicf5.sampler import FlowModel, fit_durations, sample
from indicf5.text import (
    Vocab,
    check_text,
    chunk_budget,
    chunk_text,
    encode,
    estimate_frames,
    frames_budget,
    normalize_ref_text,
)
from indicf5.vocoder import decode, load_vocoder


@dataclass
class Speech:
    wave: np.ndarray  # (samples,) float32 at sample_rate
    sample_rate: int
    mel: np.ndarray  # (n_mels, frames) the generated frames of all chunks
    chunks: list[str]


@dataclass
class Row:
    """One chunk of one utterance: one row of the sampler's batch."""

    cond: torch.Tensor  # (n_ref, n_mels) the reference's mel
    ids: torch.Tensor  # (nt,) reference text + chunk
    frames: int  # total frames wanted, reference included
    ref_frames: int  # frames of the result that belong to the reference (dropped)
    seed: int | None


@dataclass
class Rendered:
    wave: np.ndarray  # (samples,) the row's generated speech
    mel: np.ndarray  # (n_mels, frames)


@dataclass
class Utterance:
    rows: list[Row]
    chunks: list[str]
    source_rms: float  # the reference's loudness: the output is scaled back to it


def text_chunks(
    text: str, ref_text: str, ref_seconds: float, ref_frames: int, sampling: SamplingConfig
) -> tuple[str, list[str]]:
    """(the reference text as the model reads it, the text's chunks) for a prepared reference of
    `ref_seconds` and `ref_frames`: chunks of ~25 s of speech that fit the model's max_frames."""
    ref_text = normalize_ref_text(ref_text)
    budget = chunk_budget(ref_text, ref_seconds)
    if len(ref_text[-1].encode()) == 1:  # upstream adds one more space before the generated text
        ref_text += " "
    return ref_text, chunk_text(
        text, min(budget, frames_budget(ref_frames, ref_text, sampling.speed, sampling.max_frames))
    )


def urgent_stream(device: str) -> torch.cuda.Stream | None:
    """On a CUDA device, a stream above the default priority (None elsewhere): the GPU starts its
    kernels ahead of the default stream's queued ones, so short work (a reference's mel, a
    vocoder call) takes milliseconds while a batch's loop keeps the GPU full."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.Stream(device, priority=-1)  # lower is more urgent; the default is 0


@dataclass
class Synthesizer:
    model: FlowModel
    vocoder: torch.nn.Module
    vocab: Vocab
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    mel_config: MelConfig = MelConfig()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: DType = "fp32",
        vocab: str | Path | None = None,
        vocoder_dir: str | Path | None = None,
    ) -> "Synthesizer":
        ckpt = load_checkpoint(path, vocab)
        torch_dtype = TORCH_DTYPES[dtype]
        vocoder = load_vocoder(ckpt.vocoder if vocoder_dir is None else None, vocoder_dir, device)
        return cls(build_model(ckpt, device, torch_dtype), vocoder, ckpt.vocab, device, torch_dtype)

    @classmethod
    def from_engine(
        cls,
        engine_dir: str | Path,
        *,
        device: str = "cpu",
        vocoder_dir: str | Path | None = None,
        backend: str | None = None,
    ) -> "Synthesizer":
        """A built engine directory (any backend), as the build DAG leaves it; `backend` runs its
        files on another backend that can (e.g. the PyTorch path, eager, on a compiled engine)."""
        model, spec, vocab_path, vocoder_state = load_engine(engine_dir, device, backend)
        vocoder = load_vocoder(vocoder_state if vocoder_dir is None else None, vocoder_dir, device)
        return cls(model, vocoder, Vocab.load(vocab_path), device, TORCH_DTYPES[spec.dtype])

    def reference_mel(self, ref: Reference) -> torch.Tensor:
        """(frames, n_mels) conditioning mel of a prepared reference, complete on return for any
        stream that reads it. On a GPU it runs on an urgent stream: a server prepares requests
        while a batch's loop fills the GPU, and on the default stream it would wait for that loop."""
        stream = urgent_stream(self.device)
        with torch.cuda.stream(stream):
            mel = MelSpectrogram(self.mel_config).to(self.device)
            cond = mel(ref.wave.to(self.device))[0].transpose(0, 1)
        if stream is not None:
            stream.synchronize()
        return cond

    def prepare(
        self, text: str, ref_audio: str | Path, ref_text: str, sampling: SamplingConfig = SamplingConfig()
    ) -> Utterance:
        """Checks the texts, prepares the reference and cuts the text into rows."""
        check_text(text, self.vocab)
        check_text(ref_text, self.vocab, "reference text")
        ref = prepare_reference(ref_audio, sampling.target_rms, self.mel_config)
        ref_frames = ref.wave.shape[-1] // self.mel_config.hop_length
        ref_text, chunks = text_chunks(text, ref_text, ref.seconds, ref_frames, sampling)
        cond = self.reference_mel(ref)
        rows = [
            Row(
                cond,
                encode(ref_text + chunk, self.vocab),
                estimate_frames(ref_frames, ref_text, chunk, sampling.speed),
                ref_frames,
                sampling.seed,
            )
            for chunk in chunks
        ]
        needs = fit_durations(
            [r.frames for r in rows],
            [r.cond.shape[0] for r in rows],
            [len(r.ids) for r in rows],
            max_frames=sys.maxsize,
        )  # what the sampler would give each row without the limit
        if max(needs) > sampling.max_frames:
            over = sum(n > sampling.max_frames for n in needs)
            warnings.warn(
                f"{over} of {len(rows)} text chunks need more frames than the model's {sampling.max_frames} "
                f"(up to {max(needs)}): their ends are cut; use a shorter reference or a faster speed",
                stacklevel=2,
            )
        return Utterance(rows, chunks, ref.source_rms)

    def render(self, rows: list[Row], sampling: SamplingConfig = SamplingConfig(), on_step=None) -> list[Rendered]:
        """Samples the rows as one batch (they share the sampling settings) and vocodes each."""
        return self.vocode(self.sample_rows(rows, sampling, on_step))

    def sample_rows(
        self, rows: list[Row], sampling: SamplingConfig = SamplingConfig(), on_step=None
    ) -> list[torch.Tensor]:
        """The rows' generated mels, (1, n_mels, frames) each on the device, from one batch of the
        sampler; on CUDA the work is queued, not waited for (a server vocodes the previous batch meanwhile)."""
        cond = pad_sequence([r.cond for r in rows], batch_first=True)
        text = pad_sequence([r.ids for r in rows], batch_first=True, padding_value=-1).to(self.device)
        ref_lens = [r.cond.shape[0] for r in rows]
        mel = sample(
            self.model,
            cond,
            text,
            [r.frames for r in rows],
            ref_lens=ref_lens,
            nfe=sampling.nfe,
            cfg_strength=sampling.cfg_strength,
            sway_coef=sampling.sway_coef,
            schedule=sampling.schedule,
            seed=[r.seed for r in rows],
            max_frames=sampling.max_frames,
            dtype=self.dtype,
            on_step=on_step,
        )
        lengths = fit_durations([r.frames for r in rows], ref_lens, [len(r.ids) for r in rows], sampling.max_frames)
        return [m[row.ref_frames : n].T[None] for row, m, n in zip(rows, mel, lengths)]

    def vocode(self, mels: list[torch.Tensor]) -> list[Rendered]:
        """Each generated mel (1, n_mels, frames) -> its wave, both on the host."""
        return [Rendered(decode(self.vocoder, mel)[0].cpu().numpy(), mel[0].cpu().numpy()) for mel in mels]

    def loudness_scale(self, utterance: Utterance, sampling: SamplingConfig) -> float:
        """A quiet reference was raised to target_rms: the speech is scaled back to its loudness."""
        return utterance.source_rms / sampling.target_rms if utterance.source_rms < sampling.target_rms else 1.0

    def finish(
        self, utterance: Utterance, rendered: list[Rendered], sampling: SamplingConfig = SamplingConfig()
    ) -> Speech:
        """The rendered rows of an utterance joined into its speech."""
        scale = self.loudness_scale(utterance, sampling)
        waves = [r.wave * scale for r in rendered]
        return Speech(
            cross_fade(waves, self.mel_config.sample_rate, sampling.cross_fade_s),
            self.mel_config.sample_rate,
            np.concatenate([r.mel for r in rendered], axis=1),
            utterance.chunks,
        )

    def stream(self, text: str, ref_audio: str | Path, ref_text: str, sampling: SamplingConfig = SamplingConfig()):
        """`synthesize`'s speech as it is rendered: an iterator of samples, each piece final as soon
        as its chunk is (the cross-fade holds back only the samples the next chunk fades into)."""
        utterance = self.prepare(text, ref_audio, ref_text, sampling)
        scale, joiner = (
            self.loudness_scale(utterance, sampling),
            CrossFade(self.mel_config.sample_rate, sampling.cross_fade_s),
        )
        for row in utterance.rows:
            yield joiner.push(self.render([row], sampling)[0].wave * scale)
        yield joiner.close()

    def synthesize(
        self,
        text: str,
        ref_audio: str | Path,
        ref_text: str,
        sampling: SamplingConfig = SamplingConfig(),
        progress: bool = False,
    ) -> Speech:
        utterance = self.prepare(text, ref_audio, ref_text, sampling)
        with tqdm(total=len(utterance.rows) * sampling.nfe, desc="synthesis", unit="step", disable=not progress) as bar:
            rendered = [self.render([row], sampling, bar.update)[0] for row in utterance.rows]
        return self.finish(utterance, rendered, sampling)
