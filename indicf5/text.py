"""Text side of IndicF5: vocab.txt, character tokens, chunking of long text, duration estimate.

IndicF5 tokenises like F5-TTS's ``convert_char_to_pinyin`` over jieba segments: every non-ASCII
character (Indic scripts included) is one token, ASCII runs keep their characters, and a space is
inserted before a multi-character ASCII segment that follows anything but a space or quote.
Characters missing from vocab.txt read as token 0 (the space), as upstream does.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from indicf5.errors import InputError

_TRANSLATE = str.maketrans({";": ",", "“": '"', "”": '"', "‘": "'", "’": "'"})
_ASCII_BLOCK = re.compile(r"[a-zA-Z0-9+#&._%\-]+")  # what jieba cuts through its dictionary path
_ASCII_WORD = re.compile(r"([a-zA-Z0-9]+(?:\.\d+)?%?)")  # ... and how it splits such a block
# Sentence ends for chunking: upstream's ASCII and CJK marks, plus the danda (।, ॥) so that long
# Indic paragraphs split too (upstream would keep them as one over-long chunk).
_SENTENCE_END = re.compile(r"(?<=[;:,.!?।॥])\s+|(?<=[；：，。！？])")


@dataclass(frozen=True)
class Vocab:
    chars: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            raise InputError(f"vocab file not found: {path}") from None
        except UnicodeDecodeError:
            raise InputError(f"vocab file is not UTF-8 text: {path}") from None
        if lines and lines[-1] == "":
            lines.pop()  # the final newline ends the last entry; it is not an entry
        if not lines:
            raise InputError(f"vocab file is empty: {path}")
        return cls(tuple(lines))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}


def _segments(text: str):
    """jieba's segmentation of text without Chinese: ASCII words, then single characters."""
    pos = 0
    for block in _ASCII_BLOCK.finditer(text):
        yield from text[pos : block.start()]
        yield from (piece for piece in _ASCII_WORD.split(block.group()) if piece)
        pos = block.end()
    yield from text[pos:]


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for seg in _segments(text.translate(_TRANSLATE)):
        if seg.isascii() and len(seg) > 1 and tokens and tokens[-1] not in " :'\"":
            tokens.append(" ")
        tokens.extend(seg)
    return tokens


def check_text(text: str, vocab: Vocab, what: str = "text") -> None:
    """Refuses empty text and text with no character in the vocab; warns about unknown characters."""
    if not text.strip():
        raise InputError(f"{what} is empty: give some text to speak")
    index = vocab.index
    tokens = [t for t in tokenize(text) if not t.isspace()]
    unknown = sorted({t for t in tokens if t not in index})
    if len(unknown) == len(set(tokens)):
        raise InputError(f"none of the {what}'s characters is in the model's vocab.txt (e.g. {''.join(unknown[:10])!r}): "
                         "check the script/language")
    if unknown:
        warnings.warn(f"{what}: characters not in vocab.txt are read as a space: {' '.join(unknown)}", stacklevel=2)


def encode(text: str, vocab: Vocab) -> torch.Tensor:
    """Token ids (nt,); unknown characters read as 0 (the space), as upstream does."""
    index = vocab.index
    return torch.tensor([index.get(t, 0) for t in tokenize(text)], dtype=torch.long)


def normalize_ref_text(ref_text: str) -> str:
    """Upstream ends the reference text with '. ' so that it does not run into the generated text."""
    if not ref_text.strip():
        raise InputError("reference text is empty: give the transcript of the reference audio")
    if ref_text.endswith(". ") or ref_text.endswith("。"):
        return ref_text
    return ref_text + " " if ref_text.endswith(".") else ref_text + ". "


def chunk_text(text: str, max_bytes: int) -> list[str]:
    """Greedy sentence packing into chunks of at most max_bytes UTF-8 bytes (a single longer
    sentence stays whole)."""
    chunks: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text):
        piece = sentence + " " if sentence and len(sentence[-1].encode()) == 1 else sentence
        if len(current.encode()) + len(sentence.encode()) <= max_bytes:
            current += piece
        else:
            if current:
                chunks.append(current.strip())
            current = piece
    if current.strip():
        chunks.append(current.strip())
    return chunks


def chunk_budget(ref_text: str, ref_seconds: float) -> int:
    """Bytes of text per chunk so that reference + chunk stay under ~25 s of speech."""
    return int(len(ref_text.encode()) / ref_seconds * (25 - ref_seconds))


def estimate_frames(ref_frames: int, ref_text: str, gen_text: str, speed: float) -> int:
    """Total frames (reference + generated): the reference's frames-per-byte rate, over speed."""
    return ref_frames + int(ref_frames / len(ref_text.encode()) * len(gen_text.encode()) / speed)
