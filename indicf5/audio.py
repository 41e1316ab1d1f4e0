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
            raise AudioTooLong(
                f"audio {path} lasts {info.duration:.1f} s; references are limited to {max_seconds:g} s "
                f"(the first {MAX_REF_MS / 1000:g} s of speech are used): cut it shorter"
            )
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(f"cannot read audio {path}: {e}. Give a WAV, FLAC, OGG or MP3 file") from None
    if data.shape[0] == 0:
        raise InputError(f"audio file holds no samples: {path}")
    return np.ascontiguousarray(data.T), rate


def pcm16(samples: np.ndarray) -> np.ndarray:
    """float samples -> 16-bit little-endian integers, as every container and stream carries them."""
    return np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")


def wav_stream_header(rate: int) -> bytes:
    """The 44-byte header of a 16-bit mono WAV whose length is not known yet (a stream): the RIFF
    and data sizes are 0xFFFFFFFF, which readers take as "until the end"."""
    return (
        b"RIFF"
        + (0xFFFFFFFF).to_bytes(4, "little")
        + b"WAVEfmt "
        + (16).to_bytes(4, "little")
        + (1).to_bytes(2, "little")
        + (1).to_bytes(2, "little")
        + rate.to_bytes(4, "little")
        + (2 * rate).to_bytes(4, "little")
        + (2).to_bytes(2, "little")
        + (16).to_bytes(2, "little")
        + b"data"
        + (0xFFFFFFFF).to_bytes(4, "little")
    )


def audio_bytes(samples: np.ndarray, rate: int, container: str = "WAV") -> bytes:
    """16-bit audio in a WAV, FLAC or RAW (headerless little-endian) container; the samples are
    quantised here, once, so every container carries the same integers."""
    pcm = pcm16(samples)
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
# silence, in pydub's terms (IndicF5 prepares references with pydub): millisecond slices, each
# starting at sample int(ms * (rate / 1000.0)), their dBFS the RMS over the samples of every channel


class _Loudness:
    """dBFS of millisecond slices of a (channels, samples) clip, as pydub measures them."""

    def __init__(self, audio: np.ndarray, rate: int):
        self.rate, self.frames = rate, audio.shape[1]
        self.ms = self.ms_of(self.frames)
        power = np.mean(np.square(audio, dtype=np.float64), axis=0)  # every channel's samples alike
        self._cum = np.concatenate(([0.0], np.cumsum(power)))

    def ms_of(self, frames: int) -> int:
        """Milliseconds of `frames` samples, as pydub's len() counts them."""
        return round(1000 * frames / self.rate)

    def at(self, ms):
        """The sample that `ms` (an int or an array of them) falls on."""
        return (np.asarray(ms) * (self.rate / 1000.0)).astype(np.int64)

    def dbfs(self, start_ms, end_ms) -> np.ndarray:
        """dBFS of the slices [start_ms, end_ms); a slice past the end is filled with silence."""
        start, end = self.at(start_ms), self.at(end_ms)
        energy = self._cum[np.minimum(end, self.frames)] - self._cum[np.minimum(start, self.frames)]
        power = energy / np.maximum(end - start, 1)
        with np.errstate(divide="ignore"):
            return np.where(power > 0, 20 * np.log10(np.sqrt(power) + _EPS), -np.inf)


def nonsilent_ranges(
    loudness: _Loudness, min_silence_ms: int, thresh_db: float, seek_ms: int = 10
) -> list[tuple[int, int]]:
    """[start, end) millisecond ranges between silences (slices of min_silence_ms at most thresh_db,
    tried every seek_ms and at the very end)."""
    last = loudness.ms - min_silence_ms
    if last < 0:
        return [(0, loudness.ms)]
    starts = np.arange(0, last + 1, seek_ms)
    if last % seek_ms:
        starts = np.append(starts, last)
    silences: list[list[int]] = []
    for s in starts[loudness.dbfs(starts, starts + min_silence_ms) <= thresh_db].tolist():
        if silences and s <= silences[-1][1]:
            silences[-1][1] = s + min_silence_ms
        else:
            silences.append([s, s + min_silence_ms])
    ranges, pos = [], 0
    for s, e in silences:
        if s > pos:
            ranges.append((pos, s))
        pos = e
    if pos < loudness.ms:
        ranges.append((pos, loudness.ms))
    return ranges


def _split_on_silence(
    loudness: _Loudness, min_silence_ms: int, thresh_db: float, keep_ms: int
) -> list[tuple[int, int]]:
    """Non-silent millisecond ranges widened by keep_ms of their silence; overlaps split in the middle."""
    ranges = [[s - keep_ms, e + keep_ms] for s, e in nonsilent_ranges(loudness, min_silence_ms, thresh_db)]
    for prev, nxt in zip(ranges, ranges[1:]):
        if prev[1] > nxt[0]:
            prev[1] = nxt[0] = (prev[1] + nxt[0]) // 2
    return [(max(s, 0), min(e, loudness.ms)) for s, e in ranges]


def _pack(audio: np.ndarray, loudness: _Loudness, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Concatenate ranges until the next would pass 15 s (once more than 6 s are kept)."""
    kept, total = [], 0
    for s, e in ranges:
        piece = audio[:, loudness.at(s) : loudness.at(e)]
        if loudness.ms_of(total) > 6000 and loudness.ms_of(total + piece.shape[1]) > MAX_REF_MS:
            break
        kept.append(piece)
        total += piece.shape[1]
    return np.concatenate(kept, axis=1) if kept else audio[:, :0]


def clip_reference(audio: np.ndarray, rate: int) -> np.ndarray:
    """Shorten a reference to at most 15 s at silences, as upstream does; (channels, samples).
    Upstream always re-packs the clip, so silences longer than 2 s shrink to 2 s even in short clips."""
    loudness = _Loudness(audio, rate)
    packed = _pack(audio, loudness, _split_on_silence(loudness, 1000, -50, keep_ms=1000))
    if loudness.ms_of(packed.shape[1]) > MAX_REF_MS:  # no long silence to cut at: try short ones
        packed = _pack(audio, loudness, _split_on_silence(loudness, 100, -40, keep_ms=1000))
    return packed[:, : loudness.at(MAX_REF_MS)]


def silence_pad(rate: int) -> int:
    """Samples of the 50 ms of silence appended to a reference: pydub makes them at 11025 Hz and
    converts them to the clip's rate (audioop.ratecv: 1198 samples at 24 kHz, not 1200)."""
    return 550 * rate // 11025 + 1 if rate >= 11025 else int(50 * rate / 1000)


def trim_silence_edges(audio: np.ndarray, rate: int, thresh_db: float = -42.0) -> np.ndarray:
    """Drop leading silence in 10 ms steps and trailing silence in 1 ms steps; add 50 ms of silence."""
    loudness = _Loudness(audio, rate)
    start = 0
    while start < loudness.ms and loudness.dbfs(start, start + 10) < thresh_db:
        start += 10
    audio = audio[:, loudness.at(min(start, loudness.ms)) :]
    loudness = _Loudness(audio, rate)
    seconds = audio.shape[1] / rate
    for ms in range(loudness.ms - 1, -1, -1):
        if loudness.dbfs(ms, ms + 1) > thresh_db:
            break
        seconds -= 0.001  # IndicF5 counts the kept length down in float seconds
    tail = np.zeros((audio.shape[0], silence_pad(rate)), dtype=audio.dtype)
    return np.concatenate([audio[:, : loudness.at(int(seconds * 1000))], tail], axis=1)


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
        warnings.warn(
            f"reference audio {Path(path).name} lasts {audio.shape[1] / rate:.2f} s; "
            f"{clipped.shape[1] / rate:.2f} s of it are kept "
            f"(references are clipped to {MAX_REF_MS / 1000:g} s)"
        )
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
            sample_rate=mel.sample_rate,
            n_fft=mel.n_fft,
            win_length=mel.win_length,
            hop_length=mel.hop_length,
            n_mels=mel.n_mels,
            power=1,
            center=True,
            normalized=False,
            norm=None,
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(b, samples) -> (b, n_mels, frames), frames = samples // hop + 1."""
        return self.transform(wave).clamp(min=1e-5).log()


class CrossFade:
    """Chunks joined with a linear cross-fade of `seconds` (shortened to fit short chunks), as they
    come: `push` returns the samples that no later chunk can change, `close` the rest. Joining
    all chunks at once (`cross_fade`) is the same computation, so a stream equals the whole."""

    def __init__(self, rate: int, seconds: float):
        self.fade = int(seconds * rate)
        self.tail = np.zeros(0, dtype=np.float32)  # the output's last samples, which the next chunk fades into

    def push(self, wave: np.ndarray) -> np.ndarray:
        n = min(self.fade, len(self.tail), len(wave))  # the tail holds min(fade, all output so far): none at first
        if n <= 0:
            joined = np.concatenate([self.tail, wave])
        else:
            ramp = np.linspace(0.0, 1.0, n, dtype=self.tail.dtype)
            kept = self.tail[: len(self.tail) - n]
            joined = np.concatenate([kept, self.tail[len(self.tail) - n :] * (1 - ramp) + wave[:n] * ramp, wave[n:]])
        hold = min(max(self.fade, 0), len(joined))  # what the next chunk may still fade
        out, self.tail = joined[: len(joined) - hold], joined[len(joined) - hold :]
        return out

    def close(self) -> np.ndarray:
        out, self.tail = self.tail, self.tail[:0]
        return out


def cross_fade(waves: list[np.ndarray], rate: int, seconds: float) -> np.ndarray:
    """Join chunks with a linear cross-fade of `seconds` (shortened to fit short chunks)."""
    joiner = CrossFade(rate, seconds)
    return np.concatenate([*(joiner.push(w) for w in waves), joiner.close()])
