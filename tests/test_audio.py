from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
from vocos.feature_extractors import MelSpectrogramFeatures

from indicf5.audio import (
    MelSpectrogram,
    clip_reference,
    cross_fade,
    prepare_reference,
    read_audio,
    silence_pad,
    trim_silence_edges,
)
from indicf5.errors import InputError
from indicf5.synthetic import reference_clip
from indicf5.vocoder import decode, load_vocoder

RATE = 24_000


def speech_like(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    return reference_clip(seconds, rate, seed)


def test_mel_matches_vocos_feature_extractor():
    wave = torch.from_numpy(speech_like(1.5))[None]
    ours = MelSpectrogram()(wave)
    theirs = MelSpectrogramFeatures(sample_rate=RATE, n_fft=1024, hop_length=256, n_mels=100, padding="center")(wave)
    # vocos floors the magnitude at 1e-7, F5-TTS (whose features IndicF5 learned) at 1e-5
    assert ours.shape == theirs.shape == (1, 100, wave.shape[1] // 256 + 1)
    torch.testing.assert_close(ours, theirs.clamp(min=math.log(1e-5)), rtol=1e-5, atol=1e-5)


def test_bundled_vocoder_decodes_256_samples_a_frame(checkpoint):
    vocoder = load_vocoder(checkpoint.vocoder)
    mel = MelSpectrogram()(torch.from_numpy(speech_like(1.0))[None])
    wave = decode(vocoder, mel)
    assert wave.shape == (1, mel.shape[-1] * 256)
    assert torch.isfinite(wave).all() and wave.abs().max() > 0


def test_local_vocos_directory_loads(tmp_path, checkpoint):
    import yaml

    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "feature_extractor": {
                    "class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
                    "init_args": {
                        "sample_rate": RATE,
                        "n_fft": 1024,
                        "hop_length": 256,
                        "n_mels": 100,
                        "padding": "center",
                    },
                },
                "backbone": {
                    "class_path": "vocos.models.VocosBackbone",
                    "init_args": {"input_channels": 100, "dim": 64, "intermediate_dim": 192, "num_layers": 2},
                },
                "head": {
                    "class_path": "vocos.heads.ISTFTHead",
                    "init_args": {"dim": 64, "n_fft": 1024, "hop_length": 256, "padding": "same"},
                },
            }
        )
    )
    torch.save(checkpoint.vocoder, tmp_path / "pytorch_model.bin")
    mel = torch.randn(1, 100, 20)
    torch.testing.assert_close(
        decode(load_vocoder(local_dir=tmp_path), mel), decode(load_vocoder(checkpoint.vocoder), mel)
    )
    with pytest.raises(InputError, match="no vocoder"):
        load_vocoder()
    with pytest.raises(InputError, match="lacks config.yaml"):
        load_vocoder(local_dir=tmp_path / "empty")


def test_reference_is_downmixed_resampled_and_raised_to_target_rms(tmp_path):
    quiet = 0.2 * speech_like(2.0, rate=16_000)
    stereo = np.stack([quiet, 0.5 * quiet], axis=1)
    path = tmp_path / "ref.wav"
    sf.write(path, stereo, 16_000, subtype="FLOAT")
    ref = prepare_reference(path, target_rms=0.1)
    assert ref.wave.shape[0] == 1
    assert abs(ref.wave.shape[1] / RATE - ref.seconds) < 0.01
    assert ref.source_rms < 0.1
    assert abs(float(ref.wave.square().mean().sqrt()) - 0.1) < 0.005  # resampling barely moves the RMS


def test_loud_reference_is_left_as_is(tmp_path):
    path = tmp_path / "ref.wav"
    sf.write(path, 0.9 * speech_like(1.0) / np.abs(speech_like(1.0)).max(), RATE, subtype="FLOAT")
    ref = prepare_reference(path, target_rms=0.1)
    assert ref.source_rms > 0.1
    assert abs(float(ref.wave.square().mean().sqrt()) - ref.source_rms) < 1e-4


def test_long_reference_is_clipped_at_a_silence():
    parts = []
    for i in range(5):  # five 4 s phrases with 1.5 s pauses: 27.5 s in all
        parts += [speech_like(4.0, seed=i), np.zeros(int(1.5 * RATE), dtype=np.float32)]
    audio = np.concatenate(parts)[None]
    clipped = clip_reference(audio, RATE)
    seconds = clipped.shape[1] / RATE
    assert 6.0 < seconds <= 15.0
    # the cut falls in a pause: the clip ends in (near) silence
    assert np.abs(clipped[0, -RATE // 10 :]).max() < 1e-3


def test_reference_without_silence_is_cut_at_15_seconds():
    audio = speech_like(20.0)[None] + 0.05  # DC offset: never silent
    assert clip_reference(audio, RATE).shape[1] == 15 * RATE


def test_silent_edges_are_trimmed_and_50ms_appended():
    pad = np.zeros(RATE // 2, dtype=np.float32)
    voiced = 0.5 * np.ones(RATE, dtype=np.float32)
    trimmed = trim_silence_edges(np.concatenate([pad, voiced, pad])[None], RATE)
    assert silence_pad(RATE) == 1198  # pydub's 50 ms, made at 11025 Hz
    assert trimmed.shape[1] == RATE + 1198
    assert np.all(trimmed[0, -1198:] == 0) and np.all(trimmed[0, :-1198] == 0.5)


def test_unreadable_and_silent_audio_are_refused(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("this is not audio")
    with pytest.raises(InputError, match="cannot read audio"):
        read_audio(bad)
    with pytest.raises(InputError, match="not found"):
        read_audio(tmp_path / "missing.wav")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(RATE, dtype=np.float32), RATE)
    with pytest.raises(InputError, match="silent"):
        prepare_reference(silent, target_rms=0.1)


def test_cross_fade_overlaps_chunks():
    a, b = np.ones(1000, dtype=np.float32), np.zeros(1000, dtype=np.float32)
    out = cross_fade([a, b], rate=1000, seconds=0.1)
    assert len(out) == 1900
    assert out[899] == pytest.approx(1.0) and out[1000] == pytest.approx(0.0) and 0 < out[950] < 1
