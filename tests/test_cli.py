"""`indicf5 make-synthetic` and `indicf5 synth` as a user runs them: real processes, real files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import soundfile as sf

from indicf5.text import estimate_frames, normalize_ref_text


def indicf5(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "indicf5.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def cli_snapshot(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "snap"
    done = indicf5("make-synthetic", str(out), "--seed", "3")
    assert done.returncode == 0, done.stderr
    return out


def synth(snapshot, out, text, *extra):
    return indicf5("synth", "--checkpoint", str(snapshot), "--text", text, "--ref-audio", str(snapshot / "reference.wav"),
                   "--out", str(out), "--seed", "1", "--nfe", "4", *extra)


def test_make_synthetic_then_synth_writes_a_wav_of_the_estimated_length(cli_snapshot, tmp_path):
    out = tmp_path / "out.wav"
    text = "नमस्ते दुनिया, आप कैसे हैं?"
    done = synth(cli_snapshot, out, text)
    assert done.returncode == 0, done.stderr
    info = sf.info(out)
    assert info.samplerate == 24_000 and info.channels == 1
    # the estimate, from the prepared reference (trimmed + 50 ms) and the normalised reference text
    ref_samples = int(sf.info(cli_snapshot / "reference.wav").frames)
    ref_text = normalize_ref_text((cli_snapshot / "reference.txt").read_text().strip()) + " "
    wave, _ = sf.read(out)
    frames_generated = len(wave) // 256
    # trimming changes the reference by at most a few frames; the estimate scales with it
    expected = estimate_frames(ref_samples // 256, ref_text, text, 1.0) - ref_samples // 256
    assert abs(frames_generated - expected) <= 8
    assert len(wave) % 256 == 0


def test_same_seed_same_audio_and_speed_shortens(cli_snapshot, tmp_path):
    text = "यह एक लंबा वाक्य है जो धीरे और तेज़ बोला जाएगा।"
    a, b, fast = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "fast.wav"
    for out, extra in ((a, ()), (b, ()), (fast, ("--speed", "2.0"))):
        assert synth(cli_snapshot, out, text, *extra).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    assert sf.info(fast).frames < 0.7 * sf.info(a).frames


def test_long_text_is_chunked_and_shows_progress(cli_snapshot, tmp_path):
    text = " ".join(["यह पहला वाक्य है, और यह उसका दूसरा भाग है।"] * 12)
    done = synth(cli_snapshot, tmp_path / "long.wav", text)
    assert done.returncode == 0, done.stderr
    chunks = int(done.stdout.split("s at 24000 Hz, ")[1].split(" chunk")[0])
    assert chunks > 1
    assert "synthesis" in done.stderr and "step" in done.stderr  # tqdm's bar


@pytest.mark.parametrize("case", ["missing checkpoint", "corrupt weights", "empty text", "unknown script",
                                  "unreadable audio", "other architecture"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(cli_snapshot, tmp_path, case):
    snapshot = tmp_path / "snap"
    shutil.copytree(cli_snapshot, snapshot)
    text, expect = "नमस्ते", None
    if case == "missing checkpoint":
        shutil.rmtree(snapshot)
        expect = "checkpoint not found"
    elif case == "corrupt weights":
        (snapshot / "model.safetensors").write_bytes(b"\0" * 100)
        expect = "corrupt or truncated"
    elif case == "empty text":
        text, expect = "  ", "text is empty"
    elif case == "unknown script":
        text, expect = "Привет мир", "none of the text's characters"
    elif case == "unreadable audio":
        (snapshot / "reference.wav").write_text("not audio")
        expect = "cannot read audio"
    elif case == "other architecture":
        from safetensors.torch import save_file
        import torch

        save_file({"model.layers.0.weight": torch.zeros(4, 4)}, str(snapshot / "model.safetensors"))
        expect = "not an F5-TTS DiT checkpoint"
    ref = cli_snapshot / "reference.wav" if case != "unreadable audio" else snapshot / "reference.wav"
    out = tmp_path / "out.wav"
    done = indicf5("synth", "--checkpoint", str(snapshot), "--text", text, "--ref-audio", str(ref),
                   "--ref-text", "नमस्ते", "--out", str(out), "--nfe", "2")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert expect in last and "Traceback" not in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_stray_characters_are_warned_about(cli_snapshot, tmp_path):
    done = synth(cli_snapshot, tmp_path / "o.wav", "नमस्ते Ж दुनिया")
    assert done.returncode == 0
    assert "warning:" in done.stderr and "Ж" in done.stderr


def test_make_synthetic_refuses_to_overwrite(cli_snapshot):
    done = indicf5("make-synthetic", str(cli_snapshot))
    assert done.returncode == 2 and "--force" in done.stderr


@pytest.mark.parametrize("users, expected", [(None, 120), ("7", 7)])
def test_prefect_waits_long_enough_for_its_ephemeral_api_unless_the_user_says(users, expected):
    # A fresh ephemeral API migrates its database first: 19-25 s on 2 cores, past Prefect's own 20 s default.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    if users is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = users
    script = ("import indicf5.cli; indicf5.cli.use_prefect_defaults(); "
              "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; print(s.value())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == expected
