"""Audio side: read/write, the reference clip's preparation, and the 24 kHz vocos mel.

Reference preparation follows IndicF5's ``preprocess_ref_audio_text`` + ``infer_batch_process``:
clip references over 15 s at a silence (long silences first, then short ones, else a hard cut),
trim leading/trailing silence and append 50 ms of it, downmix, raise a quiet clip to the target
RMS, resample to 24 kHz. Silence is judged in dBFS over windows, as pydub does.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from indicf5.config import MelConfig
from indicf5.errors import InputError
from indicf5.store import atomic_write_bytes

MAX_REF_MS = 15_000
# The longest reference file read. Clipping keeps at most MAX_REF_MS, cut at a silence within the file;
# a longer file is refused from its header, before decoding (30 minutes of 48 kHz audio decode to GBs).
MAX_REF_FILE_S = 60.0
_EPS = 1e-10


class AudioTooLong(InputError):
    pass


def read_audio(path: str | Path, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """(channels, samples) float32 in [-1, 1] and the sample rate; a file over `max_seconds` (by its
    header) is refused undecoded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
        if max_seconds is not None and info.duration > max_seconds:
            raise AudioTooLong(f"audio {path} lasts {info.duration:.1f} s; references are limited to {max_seconds:g} s "
                               f"(the first {MAX_REF_MS / 1000:g} s of speech are used): cut it shorter")
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(f"cannot read audio {path}: {e}. Give a WAV, FLAC, OGG or MP3 file") from None
    if data.shape[0] == 0:
        raise InputError(f"audio file holds no samples: {path}")
    return np.ascontiguousarray(data.T), rate


def audio_bytes(samples: np.ndarray, rate: int, container: str = "WAV") -> bytes:
    """16-bit audio in a WAV, FLAC or RAW (headerless little-endian) container; the samples are
    quantised here, once, so every container carries the same integers."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format=container, subtype="PCM_16", **({"endian": "LITTLE"} if container == "RAW" else {}))
    return buf.getvalue()


def _output_target(path: Path) -> Path:
    return path.resolve() if path.is_symlink() else path  # a link stays a link: its target is written


def check_writable(path: str | Path) -> None:
    """Refuses an output that write_wav could not write (a directory, a place without write access),
    before any work is done."""
    target = _output_target(Path(path))
    if target.is_dir():
        raise InputError(f"{path} is a directory: give a file name for the output, e.g. {Path(path) / 'out.wav'}")
    try:
        if target.exists() and not target.is_file():  # a device node or FIFO is written through
            ok = os.access(target, os.W_OK)
        else:  # a regular file is replaced by a temporary file beside it
            above = next(p for p in target.absolute().parents if p.exists())
            if not above.is_dir():
                raise InputError(f"cannot write {path}: {above} is not a directory: choose another output path")
            target.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=target.parent).close()
            ok = True
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}: choose another output path") from None
    if not ok:
        raise InputError(f"cannot write {path}: permission denied: choose another output path")


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> None:
    """A regular file is written whole or not at all (a temporary file renamed into place); a link's
    target is written, and a device node or FIFO written through, never replaced (think /dev/null)."""
    target, data = _output_target(Path(path)), audio_bytes(samples, rate)
    if target.exists() and not target.is_file():
        with target.open("wb") as f:
            f.write(data)
    else:
        atomic_write_bytes(target, data)


# ---------------------------------------------------------------------------------------------
# silence, in pydub's terms: dBFS of windows of a mono signal


def _dbfs(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + _EPS) if x.size else -np.inf


def _window_dbfs(mono: np.ndarray, window: int, hop: int) -> np.ndarray:
    """dBFS of mono[i*hop : i*hop + window] for every full window."""
    if len(mono) < window:
        return np.empty(0)
    cum = np.concatenate(([0.0], np.cumsum(np.square(mono, dtype=np.float64))))
    starts = np.arange(0, len(mono) - window + 1, hop)
    power = (cum[starts + window] - cum[starts]) / window
    return 20 * np.log10(np.sqrt(power) + _EPS)


def nonsilent_ranges(mono: np.ndarray, rate: int, min_silence_ms: int, thresh_db: float, seek_ms: int = 10) -> list[tuple[int, int]]:
    """[start, end) sample ranges between silences of at least min_silence_ms."""
    ms = rate / 1000
    window, hop = int(min_silence_ms * ms), max(1, int(seek_ms * ms))
    silent_starts = np.nonzero(_window_dbfs(mono, window, hop) < thresh_db)[0] * hop
    silences: list[list[int]] = []
    for s in silent_starts:
        if silences and s <= silences[-1][1]:
            silences[-1][1] = s + window
        else:
            silences.append([s, s + window])
    ranges, pos = [], 0
    for s, e in silences:
        if s > pos:
            ranges.append((pos, s))
        pos = e
    if pos < len(mono):
        ranges.append((pos, len(mono)))
    return ranges


def _split_on_silence(mono: np.ndarray, rate: int, min_silence_ms: int, thresh_db: float, keep_ms: int) -> list[tuple[int, int]]:
    """Non-silent ranges widened by keep_ms of their silence; overlaps split in the middle."""
    keep = int(keep_ms * rate / 1000)
    ranges = [[max(0, s - keep), min(len(mono), e + keep)] for s, e in nonsilent_ranges(mono, rate, min_silence_ms, thresh_db)]
    for prev, nxt in zip(ranges, ranges[1:]):
        if prev[1] > nxt[0]:
            prev[1] = nxt[0] = (prev[1] + nxt[0]) // 2
    return [(s, e) for s, e in ranges]


def _pack(audio: np.ndarray, ranges: list[tuple[int, int]], rate: int) -> np.ndarray:
    """Concatenate ranges until the next would pass 15 s (once at least 6 s are kept)."""
    kept, total, ms = [], 0, rate / 1000
    for s, e in ranges:
        if total > 6000 * ms and total + (e - s) > MAX_REF_MS * ms:
            break
        kept.append(audio[:, s:e])
        total += e - s
    return np.concatenate(kept, axis=1) if kept else audio[:, :0]


def clip_reference(audio: np.ndarray, rate: int) -> np.ndarray:
    """Shorten a reference to at most 15 s at silences, as upstream does; (channels, samples).
    Upstream always re-packs the clip, so silences longer than 2 s shrink to 2 s even in short clips."""
    mono = audio.mean(axis=0)
    limit = int(MAX_REF_MS * rate / 1000)
    packed = _pack(audio, _split_on_silence(mono, rate, 1000, -50, keep_ms=1000), rate)
    if packed.shape[1] > limit:  # no long silence to cut at: try short ones
        packed = _pack(audio, _split_on_silence(mono, rate, 100, -40, keep_ms=1000), rate)
    return packed[:, :limit]


def trim_silence_edges(audio: np.ndarray, rate: int, thresh_db: float = -42.0) -> np.ndarray:
    """Drop leading silence in 10 ms steps and trailing silence in 1 ms steps; add 50 ms of silence."""
    mono = audio.mean(axis=0)
    ms = max(1, rate // 1000)
    start = 0
    while start < len(mono) and _dbfs(mono[start : start + 10 * ms]) < thresh_db:
        start += 10 * ms
    end = len(mono)
    while end > start and _dbfs(mono[end - ms : end]) <= thresh_db:
        end -= ms
    tail = np.zeros((audio.shape[0], 50 * ms), dtype=audio.dtype)
    return np.concatenate([audio[:, start:end], tail], axis=1)


@dataclass
class Reference:
    """A reference clip ready for the model: 24 kHz mono at (at least) the target RMS."""

    wave: torch.Tensor  # (1, samples) at 24 kHz
    source_rms: float  # the clip's RMS before raising; outputs are scaled back by it
    seconds: float  # duration after clipping and trimming


def prepare_reference(path: str | Path, target_rms: float, mel: MelConfig = MelConfig()) -> Reference:
    audio, rate = read_audio(path, MAX_REF_FILE_S)
    clipped = clip_reference(audio, rate)
    if audio.shape[1] > MAX_REF_MS * rate / 1000:  # (clipping also shortens long silences in shorter clips)
        warnings.warn(f"reference audio {Path(path).name} lasts {audio.shape[1] / rate:.2f} s; "
                      f"{clipped.shape[1] / rate:.2f} s of it are kept "
                      f"(references are clipped to {MAX_REF_MS / 1000:g} s)")
    audio = trim_silence_edges(clipped, rate)
    seconds = audio.shape[1] / rate
    wave = torch.from_numpy(audio).mean(dim=0, keepdim=True)
    rms = float(torch.sqrt(torch.mean(wave.square())))
    if rms < 1e-6:
        raise InputError(f"reference audio is silent: {path}")
    if rms < target_rms:
        wave = wave * target_rms / rms
    if rate != mel.sample_rate:
        wave = torchaudio.functional.resample(wave, rate, mel.sample_rate)
    return Reference(wave=wave, source_rms=rms, seconds=seconds)


class MelSpectrogram(torch.nn.Module):
    """log-mel as F5-TTS computes it for vocos: |STFT| (power 1), centred, HTK mel, log clamp 1e-5."""

    def __init__(self, mel: MelConfig = MelConfig()):
        super().__init__()
        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=mel.sample_rate, n_fft=mel.n_fft, win_length=mel.win_length,
            hop_length=mel.hop_length, n_mels=mel.n_mels, power=1, center=True, normalized=False, norm=None,
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(b, samples) -> (b, n_mels, frames), frames = samples // hop + 1."""
        return self.transform(wave).clamp(min=1e-5).log()


def cross_fade(waves: list[np.ndarray], rate: int, seconds: float) -> np.ndarray:
    """Join chunks with a linear cross-fade of `seconds` (shortened to fit short chunks)."""
    out = waves[0]
    for nxt in waves[1:]:
        n = min(int(seconds * rate), len(out), len(nxt))
        if n <= 0:
            out = np.concatenate([out, nxt])
            continue
        fade = np.linspace(0.0, 1.0, n, dtype=out.dtype)
        out = np.concatenate([out[:-n], out[-n:] * (1 - fade) + nxt[:n] * fade, nxt[n:]])
    return out
