"""`indicf5 make-synthetic` and `indicf5 synth` as a user runs them: real processes, real files."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from indicf5.text import estimate_frames, normalize_ref_text


def indicf5(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "indicf5.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def cli_snapshot(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "snap"
    done = indicf5("make-synthetic", str(out), "--seed", "3")
    assert done.returncode == 0, done.stderr
    return out


def synth(snapshot, out, text, *extra):
    return indicf5(
        "synth",
        "--checkpoint",
        str(snapshot),
        "--text",
        text,
        "--ref-audio",
        str(snapshot / "reference.wav"),
        "--out",
        str(out),
        "--seed",
        "1",
        "--nfe",
        "4",
        *extra,
    )


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


@pytest.mark.parametrize(
    "case",
    [
        "missing checkpoint",
        "corrupt weights",
        "empty text",
        "unknown script",
        "unreadable audio",
        "other architecture",
        "nan weights",
    ],
)
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
    elif case == "nan weights":
        from safetensors.torch import load_file, save_file

        state = load_file(str(snapshot / "model.safetensors"))
        prefix = "ema_model._orig_mod.transformer."
        state[prefix + "transformer_blocks.1.attn.to_q.weight"][0, 0] = float("nan")
        state[prefix + "proj_out.bias"][3] = float("inf")
        save_file(state, str(snapshot / "model.safetensors"))
        expect = "NaN or Inf in 2 tensor(s): proj_out.bias, transformer_blocks.1.attn.to_q.weight"
    ref = cli_snapshot / "reference.wav" if case != "unreadable audio" else snapshot / "reference.wav"
    out = tmp_path / "out.wav"
    done = indicf5(
        "synth",
        "--checkpoint",
        str(snapshot),
        "--text",
        text,
        "--ref-audio",
        str(ref),
        "--ref-text",
        "नमस्ते",
        "--out",
        str(out),
        "--nfe",
        "2",
    )
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
    script = (
        "import indicf5.cli; indicf5.cli.use_prefect_defaults(); "
        "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; print(s.value())"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == expected


CARELESS = {
    "synth --nfe 0": (["--nfe", "0"], "--nfe 0: Input should be greater than or equal to 1"),
    "synth --nfe -3": (["--nfe", "-3"], "--nfe -3: Input should be greater than or equal to 1"),
    "synth --speed 0": (["--speed", "0"], "--speed 0.0: Input should be greater than 0"),
    "synth --cfg -1": (["--cfg", "-1"], "--cfg -1.0: Input should be greater than or equal to 0"),
    "synth --device bogus": (["--device", "bogus"], "--device: unknown device 'bogus'"),
    "synth --out a directory": (["--out", "{tmp}"], "{tmp} is a directory: give a file name"),
    "synth --out under a file": (
        ["--out", "{tmp}/file.txt/out.wav"],
        "cannot write {tmp}/file.txt/out.wav: {tmp}/file.txt is not a directory",
    ),
    "make-synthetic --heads 3": (["--heads", "3"], "heads*dim_head must equal dim, got 3*21 != 64"),
    "serve --max-batch 0": (["--max-batch", "0"], "--max-batch 0: Input should be greater than or equal to 1"),
    "build --backend bogus": (["--backend", "bogus"], "unknown backend 'bogus': choose from eager"),
    "build --nfe 0": (["--nfe", "0"], "--nfe 0: Input should be greater than or equal to 1"),
}


@pytest.mark.parametrize("case", CARELESS)
def test_careless_arguments_exit_2_with_one_line_before_any_work(cli_snapshot, tmp_path, case):
    extra, expect = CARELESS[case]
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    (tmp_path / "file.txt").write_text("a file, not a directory")
    command = case.split()[0]
    args = {
        "synth": [
            "--checkpoint",
            str(cli_snapshot),
            "--text",
            "नमस्ते",
            "--ref-audio",
            str(cli_snapshot / "reference.wav"),
            "--out",
            str(tmp_path / "out.wav"),
        ],
        "make-synthetic": [str(tmp_path / "snap")],
        "serve": ["--engine", str(tmp_path)],
        "build": ["--synthetic"],
    }[command]
    start = time.monotonic()
    done = indicf5(command, *args, *extra)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"indicf5 {command}: " + done.stderr.strip().split(": ", 1)[1]]
    assert expect.replace("{tmp}", str(tmp_path)) in done.stderr and "Traceback" not in done.stderr
    assert "step" not in done.stderr and time.monotonic() - start < 60  # refused before synthesis or Prefect
    assert not (tmp_path / "out.wav").exists() and not (tmp_path / "snap").exists()


def test_out_writes_through_a_symlink_and_a_fifo(cli_snapshot, tmp_path):
    target = tmp_path / "target.wav"
    target.write_bytes(b"old")
    link = tmp_path / "link.wav"
    link.symlink_to(target)
    assert synth(cli_snapshot, link, "नमस्ते").returncode == 0
    assert link.is_symlink() and sf.info(target).samplerate == 24_000

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    done = synth(cli_snapshot, fifo, "नमस्ते")
    reader.join(timeout=30)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode), "the FIFO was replaced by a regular file"
    assert got and got[0][:4] == b"RIFF" and got[0] == target.read_bytes()


def test_a_long_reference_is_clipped_with_a_warning(cli_snapshot, tmp_path):
    clip, rate = sf.read(cli_snapshot / "reference.wav")
    long_ref = tmp_path / "long.wav"
    sf.write(long_ref, np.tile(clip, 10), rate)
    done = indicf5(
        "synth",
        "--checkpoint",
        str(cli_snapshot),
        "--text",
        "नमस्ते",
        "--ref-audio",
        str(long_ref),
        "--ref-text",
        "नमस्ते",
        "--out",
        str(tmp_path / "out.wav"),
        "--nfe",
        "2",
    )
    assert done.returncode == 0, done.stderr
    warning = next(line for line in done.stderr.splitlines() if line.startswith("warning: reference audio"))
    kept = float(warning.split("; ")[1].split(" s")[0])
    assert f"lasts {10 * len(clip) / rate:.2f} s" in warning and 6 <= kept <= 15
