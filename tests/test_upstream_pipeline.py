"""The whole pipeline against f5-tts 1.1.22's own infer_process / infer_batch_process.

Where 1.1.22's rules are IndicF5's, every stage is compared: reference preparation (clipping at
silences, edge trimming, the 50 ms pad, downmix, RMS, resampling), the reference text, chunks,
tokens, durations, the sampled mel, the vocoder and the cross-fade. Where they are not (1.1.22
clips references at 12 s, budgets chunks at 22 s x speed, and speaks chunks under 10 bytes at
speed 0.3), the references stay under 12 s, chunks over 10 bytes, and 1.1.22 is given our chunks.
Both run the same synthetic weights from the same noise (seeded), fp32, few steps.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import rel_l2
from upstream import f5tts_base_kwargs, infer_utils, load

from indicf5.audio import clip_reference, prepare_reference, read_audio, silence_pad, trim_silence_edges
from indicf5.config import SamplingConfig
from indicf5.synth import Synthesizer
from indicf5.synthetic import reference_clip
from indicf5.text import chunk_budget, estimate_frames, frames_budget, normalize_ref_text

SEED = 11


class RecordingCFM:
    """Upstream's CFM as infer_batch_process calls it, seeded, recording what it was given and gave."""

    def __init__(self, cfm):
        self.cfm, self.calls = cfm, []

    def sample(self, **kwargs):
        out, trajectory = self.cfm.sample(**kwargs, seed=SEED)
        self.calls.append({**kwargs, "out": out})
        return out, trajectory


@pytest.fixture(scope="module")
def pipelines(checkpoint):
    """(ours, upstream's inference module, its recording CFM, its vocab map) on the same weights."""
    ui = infer_utils()
    dit, cfm = load()
    transformer = dit(**f5tts_base_kwargs(checkpoint.config)).eval()
    transformer.load_state_dict(checkpoint.transformer)
    vocab_map = {c: i for i, c in enumerate(checkpoint.vocab.chars)}
    ours = Synthesizer.from_checkpoint(checkpoint.source)
    return ours, ui, RecordingCFM(cfm(transformer=transformer, vocab_char_map=vocab_map).eval()), vocab_map


def write_reference(path, rate: int, seconds: float, *, stereo=False, lead=0.0, tail=0.0, pause_at=None, gain=1.0):
    """16-bit PCM (what pydub reads exactly) of a voiced clip with digital silence at its edges and,
    optionally, a 2.5 s pause; a stereo clip's right channel starts 0.4 s late (one-sided). The
    clip ends on 30 ms of a tone: 1.1.22 trims a trailing edge in 10 ms steps where IndicF5 takes
    1 ms steps, which differ on a fading edge only."""
    voiced = gain * reference_clip(seconds, rate, seed=rate)
    voiced[-int(0.03 * rate) :] = 0.3 * gain * np.sin(2 * np.pi * 440 * np.arange(int(0.03 * rate)) / rate)
    if pause_at is not None:
        cut = int(pause_at * rate)
        voiced = np.concatenate([voiced[:cut], np.zeros(int(2.5 * rate), np.float32), voiced[cut:]])
    audio = np.concatenate([np.zeros(int(lead * rate), np.float32), voiced, np.zeros(int(tail * rate), np.float32)])
    if stereo:
        right = 0.6 * audio.copy()
        right[: int((lead + 0.4) * rate)] = 0
        audio = np.stack([audio, right], axis=1)
    sf.write(path, audio, rate, subtype="PCM_16")
    return path


REFERENCES = {  # rate, seconds of voice, edges and pauses: all under 12 s once prepared
    "24k-quiet": dict(rate=24_000, seconds=3.0, lead=0.25, tail=0.3, gain=0.3),
    "44k-stereo": dict(rate=44_100, seconds=4.0, stereo=True, lead=0.1, tail=0.2),
    "16k-pause": dict(rate=16_000, seconds=5.0, pause_at=2.0, tail=0.05),
    "48k": dict(rate=48_000, seconds=3.5, lead=0.5),
}
CASES = [  # reference, its transcript, text, speed, steps, schedule
    ("24k-quiet", "नमस्ते, यह एक परीक्षण है।", "यह पहला वाक्य है। यह दूसरा वाक्य है॥ तीसरा वाक्य, थोड़ा लंबा।", 1.0, 4, "uniform"),
    ("44k-stereo", "ਇਹ ਇੱਕ ਪਰੀਖਿਆ ਹੈ।", "ਇਹ ਪਹਿਲਾ ਵਾਕ ਹੈ। ਦੂਜਾ ਵਾਕ ਇੱਥੇ ਹੈ. ਤੀਜਾ ਵਾਕ ਵੀ ਹੈ। " * 2, 1.25, 3, "uniform"),
    ("16k-pause", "আমি ভাত খাই।", "তুমি কী খাও? আমরা সবাই মিলে খাই। তারপর আমরা বাড়ি যাই। আমরা খুশি।", 0.8, 3, "uniform"),
    ("48k", "நான் வீட்டுக்குப் போகிறேன்.", "நீ எங்கே போகிறாய்? நாங்கள் எல்லோரும் போகிறோம். அது நல்லது।", 1.0, 7, "epss"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_stage_equals_upstreams(case, pipelines, tmp_path, monkeypatch):
    ours, ui, cfm, vocab_map = pipelines
    name, ref_text, text, speed, nfe, schedule = case
    path = write_reference(tmp_path / f"{name}.wav", **REFERENCES[name])
    monkeypatch.setattr(ui, "_ref_audio_cache", {})
    monkeypatch.setattr(ui, "ThreadPoolExecutor", functools.partial(ThreadPoolExecutor, max_workers=1))  # seeded noise
    cfm.calls.clear()

    # reference and its transcript: 1.1.22's preprocess_ref_audio_text is IndicF5's under 12 s but
    # for the trailing edge, trimmed in 10 ms steps where IndicF5 takes 1 ms steps and counts the
    # kept length in float seconds (on a whole-millisecond edge that keeps 1 ms less)
    prepared_path, their_ref_text = ui.preprocess_ref_audio_text(str(path), ref_text, show_info=lambda *_: None)
    theirs, rate = sf.read(prepared_path, dtype="float32", always_2d=True)  # torchaudio.load's samples
    theirs = theirs.T
    clip, clip_rate = read_audio(path)
    clip = trim_silence_edges(clip_reference(clip, clip_rate), clip_rate)
    assert normalize_ref_text(ref_text) == their_ref_text and rate == clip_rate
    one_ms, pad = -(-rate // 1000), silence_pad(rate)
    assert 0 <= theirs.shape[1] - clip.shape[1] <= one_ms and not clip[:, -pad:].any() and not theirs[:, -pad:].any()
    assert np.array_equal(clip[:, :-pad], theirs[:, : clip.shape[1] - pad])
    ref = prepare_reference(path, 0.1)
    assert ref.seconds == clip.shape[1] / rate
    audio = torch.from_numpy(clip)  # ours from here on, as infer_batch_process takes it

    # chunks: IndicF5's budget (25 s, no speed factor) through upstream's chunk_text; a chunk of
    # IndicF5's over the budget (a long sentence of dandas) is split at its dandas
    sampling = SamplingConfig(nfe=nfe, speed=speed, seed=SEED, schedule=schedule)
    utterance = ours.prepare(text, path, ref_text, sampling)
    budget = chunk_budget(their_ref_text, audio.shape[-1] / rate)
    indicf5_chunks = ui.chunk_text(text, budget)
    assert " ".join(utterance.chunks) == " ".join(indicf5_chunks)
    assert all(c in utterance.chunks for c in indicf5_chunks if len(c.encode()) <= budget)
    assert all(len(c.encode()) >= 10 for c in utterance.chunks)  # 1.1.22 speaks shorter ones at speed 0.3

    wave, sample_rate, mel = next(
        ui.infer_batch_process(
            (audio, rate),
            their_ref_text,
            utterance.chunks,
            cfm,
            ours.vocoder,
            nfe_step=nfe,
            speed=speed,
            progress=None,
            device="cpu",
        )
    )
    speech = ours.synthesize(text, path, ref_text, sampling)

    assert len(cfm.calls) == len(utterance.rows)
    for row, call in zip(utterance.rows, cfm.calls):
        # 24 kHz reference at the target RMS, its mel, the tokens of reference text + chunk, the duration
        assert call["cond"].shape == ref.wave.shape and rel_l2(ref.wave, call["cond"]) <= 1e-5
        assert row.ids.tolist() == [vocab_map.get(c, 0) for c in call["text"][0]]
        assert row.frames == call["duration"]
        assert rel_l2(row.cond, cfm.cfm.mel_spec(call["cond"])[0].T) <= 1e-5
    # the generated mel of every chunk, each vocoded, scaled back and cross-faded
    assert speech.mel.shape == mel.shape and rel_l2(torch.from_numpy(speech.mel), torch.from_numpy(mel)) <= 1e-4
    assert sample_rate == speech.sample_rate and wave.shape == speech.wave.shape
    assert rel_l2(torch.from_numpy(speech.wave), torch.from_numpy(wave)) <= 1e-4


def test_a_long_text_without_punctuation_is_all_spoken(pipelines, tmp_path):
    """2000 characters with no punctuation (the server's most): several chunks, none cut by the
    model's frame limit; together they last what the estimate says for the whole text."""
    ours, *_ = pipelines
    path = write_reference(tmp_path / "ref.wav", rate=24_000, seconds=3.0)
    ref_text = "नमस्ते यह एक परीक्षण है"
    words = ("शब्द", "वाक्यांश", "ਪੰਜਾਬੀ", "தமிழ்", "ভাষা")
    text = " ".join(words[i % 5] for i in range(400))[:2000]
    sampling = SamplingConfig(nfe=1, seed=SEED, speed=0.4)  # slow: IndicF5's ~25 s chunks would pass 4096 frames
    utterance = ours.prepare(text, path, ref_text, sampling)
    rows, spoken_ref_text = utterance.rows, normalize_ref_text(ref_text) + " "
    assert " ".join(utterance.chunks) == text  # only the spaces where chunks meet are not spoken
    fits = frames_budget(rows[0].ref_frames, spoken_ref_text, sampling.speed, sampling.max_frames)
    assert fits < chunk_budget(normalize_ref_text(ref_text), prepare_reference(path, 0.1).seconds)
    longest_word = max(len(w.encode()) + 1 for w in words)
    assert len(text.encode()) / fits <= len(rows) <= len(text.encode()) / (fits - longest_word) + 1
    assert all(r.frames <= sampling.max_frames for r in rows)
    ref_frames = rows[0].ref_frames
    whole = estimate_frames(ref_frames, spoken_ref_text, "".join(utterance.chunks), sampling.speed) - ref_frames
    generated = sum(r.frames - r.ref_frames for r in rows)
    assert whole - len(rows) <= generated <= whole  # each chunk's estimate rounds down
    # spoken, on a smaller frame limit (cheaper): every chunk's frames, less the cross-fades
    sampling = SamplingConfig(nfe=1, seed=SEED, max_frames=700)
    utterance = ours.prepare(text[:300], path, ref_text, sampling)
    speech = ours.synthesize(text[:300], path, ref_text, sampling)
    assert len(utterance.rows) > 1 and all(r.frames <= 700 for r in utterance.rows)
    fade = int(sampling.cross_fade_s * speech.sample_rate)
    generated = sum(r.frames - r.ref_frames for r in utterance.rows)
    assert len(speech.wave) == generated * 256 - (len(utterance.rows) - 1) * fade


def test_text_the_frame_limit_would_cut_is_warned_about(pipelines, tmp_path):
    ours, *_ = pipelines
    path = write_reference(tmp_path / "ref.wav", rate=24_000, seconds=3.0)
    ref_frames = int(prepare_reference(path, 0.1).wave.shape[-1]) // 256
    cut = r"(\d+) of \1 text chunks need more frames than the model's \d+ \(up to \d+\): their ends are cut"
    with pytest.warns(UserWarning, match=cut):
        ours.prepare("शब्द वाक्यांश", path, "नमस्ते यह एक परीक्षण है", SamplingConfig(max_frames=ref_frames + 2))
