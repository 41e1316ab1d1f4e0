from __future__ import annotations

import re
import warnings

import pytest
from upstream import char_tokenizer, infer_utils

from indicf5.errors import InputError
from indicf5.synthetic import synthetic_vocab
from indicf5.text import (
    Vocab,
    check_text,
    chunk_budget,
    chunk_text,
    encode,
    estimate_frames,
    frames_budget,
    normalize_ref_text,
    tokenize,
)

SAMPLES = [
    "नमस्ते! संगीत की तरह जीवन भी खूबसूरत होता है, बस इसे सही ताल में जीना आना चाहिए.",  # Hindi
    "ਭਹੰਪੀ ਵਿੱਚ ਸਮਾਰਕਾਂ ਦੇ ਭਵਨ ਨਿਰਮਾਣ ਕਲਾ ਦੇ ਵੇਰਵੇ ਗੁੰਝਲਦਾਰ ਅਤੇ ਹੈਰਾਨ ਕਰਨ ਵਾਲੇ ਹਨ, ਜੋ ਮੈਨੂੰ ਖੁਸ਼ ਕਰਦੇ  ਹਨ।",  # Punjabi
    "আমি ভাত খাই।",
    "હું ઘરે જાઉં છું.",
    "ನಾನು ಮನೆಗೆ ಹೋಗುತ್ತೇನೆ.",
    "ഞാൻ വീട്ടിൽ പോകുന്നു.",
    "ମୁଁ ଘରକୁ ଯାଉଛି।",
    "நான் வீட்டுக்குப் போகிறேன்.",
    "నేను ఇంటికి వెళ్తున్నాను.",
    "मेरा email है test123@mail.com; price 3.5% AT&T x+y a--b “quoted” ‘single’",
    "नमस्तेhello,world:'ok' \"fine\"bye",
    "मैं C++ और C# में abc++x लिखता हूँ, cc++ c#d AT&T&T",  # jieba's dictionary words
    "पहली पंक्ति।\r\nदूसरी\r\n\r\nx\r\r\ny\n\rz",  # jieba keeps \r\n as one segment
]
# Texts with dandas, several scripts, ASCII punctuation, runs of whitespace
PARAGRAPHS = [
    "यह पहला वाक्य है। यह दूसरा वाक्य है॥ तीसरा, थोड़ा लंबा वाक्य है.  चौथा!\nपाँचवाँ वाक्य यहाँ है। अंत",
    "ਇਹ ਪਹਿਲਾ ਵਾਕ ਹੈ। ਇਹ ਦੂਜਾ ਹੈ। ਤੀਜਾ ਵਾਕ ਲੰਬਾ ਹੈ, ਅਤੇ ਇਸ ਵਿੱਚ ਕਾਮੇ ਹਨ। ਅੰਤ.",
    "আমি ভাত খাই। তুমি কী খাও? আমরা সবাই মিলে খাই।  শেষ",
    "நான் வீட்டுக்குப் போகிறேன். நீ எங்கே போகிறாய்? நாங்கள் எல்லோரும் போகிறோம்.",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenize_matches_indicf5(text):
    assert tokenize(text) == char_tokenizer()(text)


def test_synthetic_vocab_covers_every_script_indicf5_speaks():
    vocab = Vocab(tuple(synthetic_vocab()))
    assert vocab.chars[0] == " "
    for text in SAMPLES[:9]:
        assert not {t for t in tokenize(text) if t not in vocab.index}, text


def test_vocab_is_read_as_indicf5_reads_it(tmp_path):
    """Without a final newline IndicF5's reader drops the last entry's last character: so do we, saying so."""
    get_tokenizer = infer_utils().get_tokenizer
    path = tmp_path / "vocab.txt"
    path.write_text(" \na\nक\nxy", encoding="utf-8")
    with pytest.warns(UserWarning, match="does not end with a newline"):
        vocab = Vocab.load(path)
    theirs, size = get_tokenizer(str(path), "custom")
    assert vocab.index == theirs and len(vocab) == size == 4


def test_vocab_with_a_repeated_entry_is_refused(tmp_path):
    """IndicF5 would index the repeated character past its embedding (it sizes it by distinct entries)."""
    path = tmp_path / "vocab.txt"
    path.write_text(" \na\nक\na\nb\n", encoding="utf-8")
    assert len(infer_utils().get_tokenizer(str(path), "custom")[0]) == 4
    with pytest.raises(InputError, match="line 4 repeats line 2"):
        Vocab.load(path)


def test_vocab_reads_one_entry_per_line(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text(" \na\nक\n", encoding="utf-8")
    assert Vocab.load(path).chars == (" ", "a", "क")
    assert encode("क a b", Vocab.load(path)).tolist() == [2, 0, 1, 0, 0]  # unknown "b" reads as 0, the space


def test_check_text_refuses_empty_and_unknown_scripts_and_warns_about_strays():
    vocab = Vocab(tuple(synthetic_vocab()))
    with pytest.raises(InputError, match="empty"):
        check_text("   ", vocab)
    with pytest.raises(InputError, match="none of the text's characters"):
        check_text("Привет мир", vocab)
    with pytest.warns(UserWarning, match="Ж"):
        check_text("नमस्ते Ж", vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_text(SAMPLES[0], vocab)


def test_reference_text_ends_with_a_full_stop_and_space():
    assert normalize_ref_text("नमस्ते") == "नमस्ते. "
    assert normalize_ref_text("नमस्ते.") == "नमस्ते. "
    assert normalize_ref_text("नमस्ते. ") == "नमस्ते. "
    with pytest.raises(InputError):
        normalize_ref_text(" ")


def test_chunks_respect_the_byte_budget_and_keep_all_text():
    text = " ".join(SAMPLES[:3] * 4)
    chunks = chunk_text(text, max_bytes=300)
    assert len(chunks) > 1
    assert all(len(c.encode()) <= 300 for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")


def test_danda_splits_an_over_long_sentence_and_keeps_its_space():
    text = "पहला वाक्य है। दूसरा वाक्य है। तीसरा वाक्य है।"
    assert chunk_text(text, max_bytes=60) == ["पहला वाक्य है।", "दूसरा वाक्य है।", "तीसरा वाक्य है।"]
    assert chunk_text(text, max_bytes=len(text.encode())) == [text]  # the space after each danda stays


@pytest.mark.parametrize("text", PARAGRAPHS)
def test_unsplit_text_gives_indicf5s_chunk_and_tokens(text):
    ui = infer_utils()
    ref_text = "संदर्भ का पाठ. "
    budget = len(text.encode()) + 5
    ours, theirs = chunk_text(text, budget), ui.chunk_text(text, budget)
    assert ours == theirs and len(ours) == 1
    assert tokenize(ref_text + ours[0]) == ui.convert_char_to_pinyin([ref_text + theirs[0]])[0]
    assert estimate_frames(300, ref_text, ours[0], 1.0) == 300 + int(
        300 / len(ref_text.encode()) * len(theirs[0].encode())
    )


def take(chunk: str, chunks: list[str]) -> list[str]:
    """Consecutive chunks of ours that make up `chunk`, split at its whitespace or, inside a word,
    between characters."""
    pieces, pos = [], 0
    while pos < len(chunk):
        pos += len(chunk[pos:]) - len(chunk[pos:].lstrip())
        pieces.append(chunks.pop(0))
        assert chunk.startswith(pieces[-1], pos), (chunk, pieces)
        pos += len(pieces[-1])
    return pieces


@pytest.mark.parametrize("text", PARAGRAPHS)
def test_split_text_gives_indicf5s_chunks_and_splits_only_over_long_ones(text):
    """Every chunk of IndicF5's within the budget is ours too; one over it (IndicF5 keeps a long
    sentence whole) becomes consecutive chunks of ours within the budget, split after a danda,
    at a space, or (in a word over the budget) between characters."""
    ui = infer_utils()
    for budget in range(20, len(text.encode()) + 20, 7):
        ours, theirs = chunk_text(text, budget), ui.chunk_text(text, budget)
        rest = list(ours)
        for chunk in theirs:
            pieces = take(chunk, rest)
            if len(chunk.encode()) <= budget:
                assert pieces == [chunk], budget
            assert all(len(p.encode()) <= budget for p in pieces), (budget, pieces)
            for a, b in zip(pieces, pieces[1:]):
                if not re.search(re.escape(a) + r"\s+" + re.escape(b), chunk):  # cut inside a word: only a long one
                    word = next(w for w in chunk.split() if a.split()[-1] + b.split()[0] in w)
                    assert len(word.encode()) > budget, (budget, a, b)
        assert not rest, budget


def test_long_text_without_punctuation_is_split_at_spaces_and_then_anywhere():
    words = ("शब्द", "वाक्यांश", "ਪੰਜਾਬੀ", "தமிழ்")
    text = " ".join(words[i % 4] for i in range(5000))
    chunks = chunk_text(text, max_bytes=300)
    assert all(len(c.encode()) <= 300 for c in chunks) and " ".join(chunks) == text
    assert len(chunks) == pytest.approx(len(text.encode()) / 300, rel=0.1)
    long_word = "क" * 50 + "ि" + "ख" * 50  # one "word" of 303 bytes: cut between characters, marks kept
    chunks = chunk_text(f"अ {long_word} आ", max_bytes=60)
    assert "".join(chunks).replace(" ", "") == f"अ{long_word}आ" and all(len(c.encode()) <= 60 for c in chunks)
    assert not any(c[0] == "ि" for c in chunks)


def test_budget_and_duration_follow_the_reference_rate():
    assert chunk_budget("a" * 100, 5.0) == 400  # 20 bytes/s for the remaining 20 s of 25
    assert estimate_frames(300, "a" * 100, "b" * 50, speed=1.0) == 450
    assert estimate_frames(300, "a" * 100, "b" * 50, speed=2.0) == 375


def test_frames_budget_keeps_a_chunk_within_the_frame_limit():
    for speed in (0.3, 0.5, 1.0):
        budget = frames_budget(300, "a" * 100, speed, max_frames=4096)
        assert (
            estimate_frames(300, "a" * 100, "b" * budget, speed)
            <= 4096
            < estimate_frames(300, "a" * 100, "b" * (budget + 2), speed)
        )
