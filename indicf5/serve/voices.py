"""Named reference voices, persisted on disk: ``<root>/<name>/{reference<.ext>, voice.json}``.
The clip is kept byte for byte as uploaded, so a voice speaks exactly as its file does with
``indicf5 synth --ref-audio``.

A voice is stored only once its audio has been read (the server also checks it can be prepared
as a reference), and is written to a temporary directory that is renamed into place. The rename
fails when the name is taken, so of concurrent adds of one name exactly one succeeds, and no voice
is ever replaced. Optional quotas bound the count of voices and the disk they use.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
from pathlib import Path

from pydantic import BaseModel

from indicf5.audio import read_audio
from indicf5.errors import InputError
from indicf5.store import temp_dir_beside

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # matched whole (fullmatch: no trailing newline)
META = "voice.json"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


class Voice(BaseModel):
    name: str
    ref_text: str
    seconds: float
    audio_file: str


class UnknownVoice(InputError):
    pass


class VoiceExists(InputError):
    pass


class VoiceQuotaExceeded(InputError):
    pass


def audio_suffix(filename: str | None) -> str:
    """The file name's suffix when it names an audio format, else .wav."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if suffix in AUDIO_SUFFIXES else ".wav"


class VoiceStore:
    def __init__(self, root: Path, max_voices: int | None = None, max_bytes: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_voices, self.max_bytes = max_voices, max_bytes
        self._adding = threading.Lock()  # the quotas hold under concurrent adds

    def _dir(self, name: str) -> Path:
        if not NAME.fullmatch(name):
            raise InputError(
                f"bad voice name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        return self.root / name

    def list(self) -> list[Voice]:
        return [
            Voice.model_validate_json((d / META).read_text())
            for d in sorted(self.root.iterdir())
            if NAME.fullmatch(d.name) and (d / META).is_file()
        ]

    def get(self, name: str) -> tuple[Voice, Path]:
        """The voice and its reference audio."""
        d = self._dir(name)
        if not (d / META).is_file():
            known = ", ".join(v.name for v in self.list()) or "none yet; add one with POST /v1/voices"
            raise UnknownVoice(f"unknown voice {name!r} (known: {known})")
        voice = Voice.model_validate_json((d / META).read_text())
        return voice, d / voice.audio_file

    def bytes_used(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def _check_quota(self, adding_bytes: int) -> None:
        if self.max_voices is not None and len(self.list()) >= self.max_voices:
            raise VoiceQuotaExceeded(
                f"the server holds {self.max_voices} voices, its limit (TTS_MAX_VOICES): "
                "delete one (DELETE /v1/voices/<name>) first"
            )
        if self.max_bytes is not None and self.bytes_used() + adding_bytes > self.max_bytes:
            raise VoiceQuotaExceeded(
                f"storing this voice would pass the {self.max_bytes} bytes the voices may use "
                "(TTS_MAX_VOICES_BYTES): delete a voice first or send a shorter clip"
            )

    def _exists(self, name: str) -> VoiceExists:
        return VoiceExists(f"voice {name!r} exists; DELETE /v1/voices/{name} first to replace it")

    def add(self, name: str, audio_file: Path, ref_text: str) -> Voice:
        """Stores the audio (any format soundfile reads; its suffix is kept when it names one) and its transcript."""
        d = self._dir(name)
        if (d / META).is_file():
            raise self._exists(name)
        if not ref_text.strip():
            raise InputError("ref_text is empty: give the transcript of the reference audio")
        samples, rate = read_audio(audio_file)
        voice = Voice(
            name=name,
            ref_text=ref_text.strip(),
            seconds=round(samples.shape[1] / rate, 3),
            audio_file=f"reference{audio_suffix(audio_file.name)}",
        )
        with self._adding, temp_dir_beside(d) as tmp:
            self._check_quota(audio_file.stat().st_size)
            shutil.copyfile(audio_file, tmp / voice.audio_file)
            (tmp / META).write_text(voice.model_dump_json(indent=2))
            try:
                os.rename(tmp, d)  # refuses a non-empty target: the name was taken meanwhile
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise self._exists(name) from None
                raise
        return voice

    def delete(self, name: str) -> None:
        self.get(name)
        shutil.rmtree(self._dir(name))
