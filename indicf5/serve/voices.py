"""Named reference voices, persisted on disk: ``<root>/<name>/{reference<.ext>, voice.json}``.
The clip is kept byte for byte as uploaded, so a voice speaks exactly as its file does with
``indicf5 synth --ref-audio``.

A voice is stored only once its audio has been read (the server also checks it can be prepared
as a reference), and is written to a temporary directory that is renamed into place.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pydantic import BaseModel

from indicf5.audio import read_audio
from indicf5.errors import InputError
from indicf5.store import atomic_dir

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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


class VoiceStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        if not NAME.match(name):
            raise InputError(f"bad voice name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return self.root / name

    def list(self) -> list[Voice]:
        return [Voice.model_validate_json((d / META).read_text()) for d in sorted(self.root.iterdir())
                if NAME.match(d.name) and (d / META).is_file()]

    def get(self, name: str) -> tuple[Voice, Path]:
        """The voice and its reference audio."""
        d = self._dir(name)
        if not (d / META).is_file():
            known = ", ".join(v.name for v in self.list()) or "none yet; add one with POST /v1/voices"
            raise UnknownVoice(f"unknown voice {name!r} (known: {known})")
        voice = Voice.model_validate_json((d / META).read_text())
        return voice, d / voice.audio_file

    def add(self, name: str, audio_file: Path, ref_text: str, suffix: str = ".wav") -> Voice:
        """Stores the audio (any format soundfile reads; `suffix` from the uploaded name) and its transcript."""
        d = self._dir(name)
        if (d / META).is_file():
            raise VoiceExists(f"voice {name!r} exists; DELETE /v1/voices/{name} first to replace it")
        if not ref_text.strip():
            raise InputError("ref_text is empty: give the transcript of the reference audio")
        samples, rate = read_audio(audio_file)
        suffix = suffix.lower() if suffix.lower() in AUDIO_SUFFIXES else ".wav"
        voice = Voice(name=name, ref_text=ref_text.strip(), seconds=round(samples.shape[1] / rate, 3), audio_file=f"reference{suffix}")
        with atomic_dir(d) as tmp:
            shutil.copyfile(audio_file, tmp / voice.audio_file)
            (tmp / META).write_text(voice.model_dump_json(indent=2))
        return voice

    def delete(self, name: str) -> None:
        self.get(name)
        shutil.rmtree(self._dir(name))
