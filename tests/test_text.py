from __future__ import annotations

import warnings

import pytest
from upstream import char_tokenizer

from indicf5.errors import InputError
from indicf5.synthetic import synthetic_vocab
from indicf5.text import Vocab, check_text, chunk_budget, chunk_text, encode, estimate_frames, normalize_ref_text, tokenize

SAMPLES = [
    "नमस्ते! संगीत की तरह जीवन भी खूबसूरत होता है, बस इसे सही ताल में जीना आना चाहिए.",  # Hindi
    "ਭਹੰਪੀ ਵਿੱਚ ਸਮਾਰਕਾਂ ਦੇ ਭਵਨ ਨਿਰਮਾਣ ਕਲਾ ਦੇ ਵੇਰਵੇ ਗੁੰਝਲਦਾਰ ਅਤੇ ਹੈਰਾਨ ਕਰਨ ਵਾਲੇ ਹਨ, ਜੋ ਮੈਨੂੰ ਖੁਸ਼ ਕਰਦੇ  ਹਨ।",  # Punjabi
    "আমি ভাত খাই।", "હું ઘરે જાઉં છું.", "ನಾನು ಮನೆಗೆ ಹೋಗುತ್ತೇನೆ.", "ഞാൻ വീട്ടിൽ പോകുന്നു.", "ମୁଁ ଘରକୁ ଯାଉଛି।",
    "நான் வீட்டுக்குப் போகிறேன்.", "నేను ఇంటికి వెళ్తున్నాను.",
    "मेरा email है test123@mail.com; price 3.5% AT&T x+y a--b “quoted” ‘single’",
    "नमस्तेhello,world:'ok' \"fine\"bye",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenize_matches_indicf5(text):
    assert tokenize(text) == char_tokenizer()(text)


def test_synthetic_vocab_covers_every_script_indicf5_speaks():
    vocab = Vocab(tuple(synthetic_vocab()))
    assert vocab.chars[0] == " "
    for text in SAMPLES[:9]:
        assert not {t for t in tokenize(text) if t not in vocab.index}, text


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


def test_danda_ends_a_sentence_for_chunking():
    text = "पहला वाक्य है। दूसरा वाक्य है। तीसरा वाक्य है।"
    assert chunk_text(text, max_bytes=60) == ["पहला वाक्य है।", "दूसरा वाक्य है।", "तीसरा वाक्य है।"]


def test_budget_and_duration_follow_the_reference_rate():
    assert chunk_budget("a" * 100, 5.0) == 400  # 20 bytes/s for the remaining 20 s of 25
    assert estimate_frames(300, "a" * 100, "b" * 50, speed=1.0) == 450
    assert estimate_frames(300, "a" * 100, "b" * 50, speed=2.0) == 375
