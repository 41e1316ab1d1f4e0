"""Text side of IndicF5: vocab.txt, character tokens, chunking of long text, duration estimate.

IndicF5 tokenises like F5-TTS's ``convert_char_to_pinyin`` over jieba segments: every non-ASCII
character (Indic scripts included) is one token, ASCII runs keep their characters, and a space is
inserted before a multi-character ASCII segment that follows anything but a space or quote.
Characters missing from vocab.txt read as token 0 (the space), as upstream does.

Long text is chunked as IndicF5 chunks it; a chunk over the budget (IndicF5 keeps an over-long
sentence whole, and the model's frame limit then cuts it) is split further, at dandas, then at
spaces, then between characters.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from indicf5.errors import InputError

_TRANSLATE = str.maketrans({";": ",", "“": '"', "”": '"', "‘": "'", "’": "'"})
_ASCII_BLOCK = re.compile(r"[a-zA-Z0-9+#&._%\-]+")  # what jieba cuts through its dictionary path
_ASCII_WORD = re.compile(r"([a-zA-Z0-9]+(?:\.\d+)?%?)")  # ... and how it splits such a block
_DICT_WORD = re.compile(r"(AT&T|[Cc]\+\+|[Cc]#)")  # the ASCII words in jieba's dictionary stay whole
_CRLF = re.compile(r"(\r\n)")  # jieba's one whitespace segment of two characters
# IndicF5's sentence ends for chunking: ASCII marks (the whitespace after them is dropped), CJK marks
_SENTENCE_END = re.compile(r"(?<=[;:,.!?])\s+|(?<=[；：，。！？])")
# Where an over-long chunk is split, in order of preference: after a danda (the whitespace after it
# stays, so the text is unchanged), before a word
_FINER_SPLITS = (re.compile(r"(?<=[।॥])(?=\s)"), re.compile(r"(?<=\s)(?=\S)"))


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
        if lines[-1] == "":
            lines.pop()  # the final newline ends the last entry; it is not an entry
        elif lines[-1]:
            # IndicF5 (F5-TTS's get_tokenizer) drops each line's last character, taken for its newline
            warnings.warn(
                f"{path} does not end with a newline: its last entry {lines[-1]!r} is read as "
                f"{lines[-1][:-1]!r}, as IndicF5 reads it",
                stacklevel=2,
            )
            lines[-1] = lines[-1][:-1]
        if not lines:
            raise InputError(f"vocab file is empty: {path}")
        first: dict[str, int] = {}
        for number, entry in enumerate(lines, 1):
            if entry in first:
                # IndicF5 would map it to the later line yet size its embedding by the distinct entries
                raise InputError(
                    f"{path}: line {number} repeats line {first[entry]} ({entry!r}); IndicF5 cannot "
                    "read a vocab.txt with a repeated entry: give the checkpoint's own vocab.txt"
                )
            first[entry] = number
        return cls(tuple(lines))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}


def _characters(text: str):
    """jieba outside its word blocks: single characters, but \\r\\n as one segment."""
    for piece in _CRLF.split(text):
        yield from [piece] if piece == "\r\n" else piece


def _ascii_block(block: str):
    """jieba inside a block of word characters: its dictionary's ASCII words whole, the rest as
    runs of letters and digits (with a decimal part and a percent sign), other characters alone."""
    for i, part in enumerate(_DICT_WORD.split(block)):
        yield from [part] if i % 2 else (piece for piece in _ASCII_WORD.split(part) if piece)


def _segments(text: str):
    """jieba's segmentation of text without Chinese."""
    pos = 0
    for block in _ASCII_BLOCK.finditer(text):
        yield from _characters(text[pos : block.start()])
        yield from _ascii_block(block.group())
        pos = block.end()
    yield from _characters(text[pos:])


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
        raise InputError(
            f"none of the {what}'s characters is in the model's vocab.txt (e.g. {''.join(unknown[:10])!r}): "
            "check the script/language"
        )
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


def _nbytes(text: str) -> int:
    return len(text.encode())


def _pack(pieces: list[str], max_bytes: int, levels: tuple[re.Pattern, ...]) -> list[str]:
    """Greedy packing of consecutive pieces (their concatenation is the text) into chunks of at most
    max_bytes, whitespace kept; a piece longer than that alone is split finer (`_split`)."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if _nbytes(current) + _nbytes(piece) <= max_bytes:
            current += piece
            continue
        if current.strip():
            chunks.append(current)
        current = piece
        if _nbytes(piece) > max_bytes:
            *done, current = _split(piece, max_bytes, levels)
            chunks.extend(done)
    return chunks + [current]


def _split(text: str, max_bytes: int, levels: tuple[re.Pattern, ...]) -> list[str]:
    """Text over max_bytes packed from its pieces at the first level that divides it, else from its
    characters; a single character over max_bytes stays whole."""
    for i, level in enumerate(levels):
        pieces = level.split(text)
        if len(pieces) > 1:
            return _pack(pieces, max_bytes, levels[i + 1 :])
    pieces = _characters_of(text)
    return _pack(pieces, max_bytes, ()) if len(pieces) > 1 else [text]


def _characters_of(text: str) -> list[str]:
    """Characters with their combining marks (a vowel sign or virama stays with its consonant)."""
    pieces: list[str] = []
    for c in text:
        if pieces and unicodedata.category(c).startswith("M"):
            pieces[-1] += c
        else:
            pieces.append(c)
    return pieces


def chunk_text(text: str, max_bytes: int) -> list[str]:
    """IndicF5's chunks: sentences packed greedily into chunks of at most max_bytes UTF-8 bytes,
    each sentence that ends in a one-byte character followed by a space. A chunk still over
    max_bytes (a sentence longer than that) is split at its dandas, its spaces, or its characters;
    no text is dropped."""
    chunks: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text):
        piece = sentence + " " if sentence and _nbytes(sentence[-1]) == 1 else sentence
        if _nbytes(current) + _nbytes(sentence) <= max_bytes:
            current += piece
        else:
            if current:
                chunks.append(current.strip())
            current = piece
    if current.strip():
        chunks.append(current.strip())
    return [
        piece.strip()
        for chunk in chunks
        for piece in (_split(chunk, max_bytes, _FINER_SPLITS) if _nbytes(chunk) > max_bytes else [chunk])
        if piece.strip()
    ]


def chunk_budget(ref_text: str, ref_seconds: float) -> int:
    """Bytes of text per chunk so that reference + chunk stay under ~25 s of speech."""
    return int(len(ref_text.encode()) / ref_seconds * (25 - ref_seconds))


def frames_budget(ref_frames: int, ref_text: str, speed: float, max_frames: int) -> int:
    """Bytes of text whose estimated frames (`estimate_frames`) still fit in max_frames: at a slow
    speed IndicF5's ~25 s chunk would pass the model's limit and be cut."""
    return int((max_frames - ref_frames) * speed * len(ref_text.encode()) / ref_frames)


def estimate_frames(ref_frames: int, ref_text: str, gen_text: str, speed: float) -> int:
    """Total frames (reference + generated): the reference's frames-per-byte rate, over speed."""
    return ref_frames + int(ref_frames / len(ref_text.encode()) * len(gen_text.encode()) / speed)
