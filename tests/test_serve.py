"""The HTTP server, as a client sees it: a real `indicf5 serve` (uvicorn) on loopback over a
synthetic engine, plus the inference queue's rules on their own."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from indicf5.backends import engine_from_checkpoint
from indicf5.config import SamplingConfig
from indicf5.serve.batching import InferenceQueue, QueueFull
from indicf5.serve.metrics import Metrics
from indicf5.serve.process import ServerProcess
from indicf5.synth import Row

TEXT = "नमस्ते दुनिया"


class Server(ServerProcess):
    def __init__(self, engine: Path, home: Path, *args: str, env: dict[str, str] | None = None):
        home.mkdir(parents=True, exist_ok=True)
        super().__init__(
            engine, home / "server.log", *args, env={"INDICF5_HOME": str(home), **(env or {})}, ready_timeout_s=180
        )

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


def samples(wav: bytes) -> np.ndarray:
    data, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == 24_000
    return data


@pytest.fixture(scope="module")
def engine(snapshot, tmp_path_factory) -> Path:
    return engine_from_checkpoint(snapshot, tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def server(engine, snapshot, tmp_path_factory):
    server = Server(engine, tmp_path_factory.mktemp("home"), "--max-batch", "8")
    ref_text = (snapshot / "reference.txt").read_text().strip()
    with (snapshot / "reference.wav").open("rb") as f:
        r = httpx.post(
            f"{server.url}/v1/voices",
            data={"name": "test", "ref_text": ref_text},
            files={"audio": ("reference.wav", f)},
        )
    assert r.status_code == 201, r.text
    yield server
    server.stop()


def speech(server: Server, text: str = TEXT, seed: int | None = 5, **extra) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/audio/speech", json={"input": text, "voice": "test", "seed": seed, **extra}, timeout=120
    )


def test_audio_equals_the_cli_synth_output(server, engine, snapshot, tmp_path):
    out = tmp_path / "cli.wav"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "indicf5.cli",
            "synth",
            "--engine",
            str(engine),
            "--text",
            TEXT,
            "--ref-audio",
            str(snapshot / "reference.wav"),
            "--seed",
            "5",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    by_voice = speech(server)
    assert by_voice.status_code == 200 and by_voice.headers["content-type"] == "audio/wav"
    assert by_voice.content == out.read_bytes()

    ref_text = (snapshot / "reference.txt").read_text().strip()
    with (snapshot / "reference.wav").open("rb") as f:
        by_upload = httpx.post(
            f"{server.url}/v1/synthesize",
            data={"text": TEXT, "ref_text": ref_text, "seed": "5"},
            files={"ref_audio": ("reference.wav", f, "audio/wav")},
            timeout=120,
        )
    assert by_upload.status_code == 200 and by_upload.content == out.read_bytes()


def test_formats_carry_the_same_audio(server):
    wav = samples(speech(server).content)
    flac = speech(server, response_format="flac")
    assert flac.headers["content-type"] == "audio/flac"
    assert np.array_equal(samples(flac.content), wav)
    pcm = speech(server, response_format="pcm")
    assert pcm.headers["content-type"] == "audio/pcm"
    assert np.array_equal(np.frombuffer(pcm.content, dtype="<i2"), wav)
    faster = speech(server, speed=2.0)
    assert len(samples(faster.content)) < len(wav)


def test_a_request_picks_its_schedule(server):
    """epss at the server's 32 steps is f5-tts 1.1's grid for 32, the uniform one; an unknown name is refused."""
    assert speech(server, schedule="epss").content == speech(server, schedule="uniform").content
    bad = speech(server, schedule="fastest")
    assert bad.status_code == 422 and "schedule" in bad.text


def test_concurrent_requests_are_batched_and_all_succeed(server):
    texts = [TEXT, "यह एक परीक्षण है"]
    alone = {t: samples(speech(server, t).content).astype(np.float64) for t in texts}
    batches_before, rows_before = server.metric("indicf5_batch_rows_count"), server.metric("indicf5_batch_rows_sum")
    with httpx.Client(limits=httpx.Limits(max_connections=8), timeout=300) as client, ThreadPoolExecutor(8) as pool:

        def post(i):
            body = {"input": texts[i % 2], "voice": "test", "seed": 5}
            return client.post(f"{server.url}/v1/audio/speech", json=body)

        responses = list(pool.map(post, range(64)))
    assert [r.status_code for r in responses] == [200] * 64
    for i, r in enumerate(responses):  # a row's audio does not depend on its batch-mates
        got, want = samples(r.content).astype(np.float64), alone[texts[i % 2]]
        assert got.shape == want.shape and np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want)
    batches = server.metric("indicf5_batch_rows_count") - batches_before
    rows = server.metric("indicf5_batch_rows_sum") - rows_before
    assert rows == 64 and batches < 64, f"{batches} batches for 64 rows: nothing was batched"


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "too_long",
        "unknown_voice",
        "format",
        "content_type",
        "garbage_upload",
        "empty_upload",
        "oversized_upload",
        "no_ref_text",
        "bad_voice_name",
        "voice_exists",
        "unknown_voice_delete",
        "speed",
    ],
)
def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(server, snapshot, case):
    url = server.url
    wav = (snapshot / "reference.wav").read_bytes()
    form = {"text": TEXT, "ref_text": "नमस्ते"}
    request, status = {
        "empty": (lambda: speech(server, "   "), 400),
        "too_long": (lambda: speech(server, "क" * 2001), 413),
        "unknown_voice": (lambda: httpx.post(f"{url}/v1/audio/speech", json={"input": TEXT, "voice": "nobody"}), 404),
        "format": (lambda: speech(server, response_format="mp3"), 422),
        "content_type": (lambda: httpx.post(f"{url}/v1/audio/speech", data={"input": TEXT, "voice": "test"}), 415),
        "garbage_upload": (
            lambda: httpx.post(f"{url}/v1/synthesize", data=form, files={"ref_audio": ("r.wav", os.urandom(4000))}),
            400,
        ),
        "empty_upload": (
            lambda: httpx.post(f"{url}/v1/synthesize", data=form, files={"ref_audio": ("r.wav", b"")}),
            400,
        ),
        "oversized_upload": (
            lambda: httpx.post(
                f"{url}/v1/synthesize", data=form, files={"ref_audio": ("r.wav", wav + bytes(11 * 2**20))}
            ),
            413,
        ),
        "no_ref_text": (
            lambda: httpx.post(f"{url}/v1/synthesize", data={"text": TEXT}, files={"ref_audio": ("r.wav", wav)}),
            422,
        ),
        "bad_voice_name": (
            lambda: httpx.post(
                f"{url}/v1/voices", data={"name": "../x", "ref_text": "नमस्ते"}, files={"audio": ("r.wav", wav)}
            ),
            400,
        ),
        "voice_exists": (
            lambda: httpx.post(
                f"{url}/v1/voices", data={"name": "test", "ref_text": "नमस्ते"}, files={"audio": ("r.wav", wav)}
            ),
            409,
        ),
        "unknown_voice_delete": (lambda: httpx.delete(f"{url}/v1/voices/nobody"), 404),
        "speed": (lambda: speech(server, speed=10), 422),
    }[case]
    r = request()
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert speech(server).status_code == 200


def test_voices_persist_and_can_be_deleted(server, snapshot):
    wav = (snapshot / "reference.wav").read_bytes()
    r = httpx.post(
        f"{server.url}/v1/voices", data={"name": "second", "ref_text": "नमस्ते"}, files={"audio": ("b.wav", wav)}
    )
    assert r.status_code == 201 and r.json()["seconds"] > 0
    assert {v["name"] for v in httpx.get(f"{server.url}/v1/voices").json()} == {"test", "second"}
    assert httpx.delete(f"{server.url}/v1/voices/second").status_code == 204
    assert [v["name"] for v in httpx.get(f"{server.url}/v1/voices").json()] == ["test"]


def test_operations_endpoints(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["ready"] and ready["backend"] == "eager" and ready["devices"] == ["cpu"]
    assert "/v1/audio/speech" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "swagger" in httpx.get(f"{server.url}/docs").text.lower()
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("indicf5_request_seconds_bucket", "indicf5_queue_depth", "indicf5_request_errors_total"):
        assert name in metrics


def test_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(engine, snapshot, tmp_path):
    # 1024 steps a request (~7 s here) so the running one outlasts the waiting client's 1.5 s by far
    server = Server(engine, tmp_path / "home", "--max-queue", "1", "--max-batch", "1", env={"TTS_NFE": "1024"})
    try:
        ref_text = (snapshot / "reference.txt").read_text().strip()
        with (snapshot / "reference.wav").open("rb") as f:
            httpx.post(
                f"{server.url}/v1/voices", data={"name": "test", "ref_text": ref_text}, files={"audio": ("r.wav", f)}
            )
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: speech(server), range(12)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        assert set(codes) == {200, 429}
        assert int(next(r for r in responses if r.status_code == 429).headers["Retry-After"]) >= 1

        with ThreadPoolExecutor(1) as pool:  # one request runs, one waits in the queue's only slot ...
            running = pool.submit(speech, server)
            time.sleep(0.5)
            with pytest.raises(httpx.ReadTimeout):  # ... and leaves before its turn
                httpx.post(f"{server.url}/v1/audio/speech", json={"input": TEXT, "voice": "test"}, timeout=1.0)
            assert not running.done(), (
                "the running request finished before the waiting client left: the test needs a longer request"
            )
            deadline = time.monotonic() + 5
            while server.metric("indicf5_requests_cancelled_total") < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.metric("indicf5_requests_cancelled_total") >= 1
            assert server.metric("indicf5_queue_depth") == 0
            assert running.result().status_code == 200
    finally:
        server.stop()


# --- the queue's rules, without HTTP


def row(frames: int) -> Row:
    return Row(torch.zeros(4, 100), torch.zeros(3, dtype=torch.long), frames, 4, None)


def test_queue_batches_compatible_jobs_and_refuses_when_full():
    queue = InferenceQueue(Metrics(), max_queue=4, max_batch_rows=3, max_wait_s=0)
    a = queue.submit([row(100)], SamplingConfig())
    b = queue.submit([row(1000)], SamplingConfig())  # far longer: not a batch-mate of a
    c = queue.submit([row(120)], SamplingConfig(nfe=16))  # other settings
    d = queue.submit([row(110), row(105)], SamplingConfig())
    with pytest.raises(QueueFull):
        queue.submit([row(100)], SamplingConfig())
    assert [j.future for j in queue.take()] == [a, d]
    assert [j.future for j in queue.take()] == [b]
    assert [j.future for j in queue.take()] == [c]
    assert len(queue) == 0


def test_a_cancelled_job_leaves_the_queue_and_is_never_taken():
    metrics = Metrics()
    queue = InferenceQueue(metrics, max_queue=2, max_wait_s=0)
    a = queue.submit([row(100)], SamplingConfig())
    b = queue.submit([row(100)], SamplingConfig())
    assert b.cancel() and len(queue) == 1
    queue.submit([row(100)], SamplingConfig(nfe=8))  # the freed slot is usable
    assert [j.future for j in queue.take()] == [a]
    assert metrics.cancelled._value.get() == 1


# --- which engine a server loads


def test_engines_resolve_by_run_id_alias_and_backend_switch(home, tmp_path):
    """Which engine directory a server loads for a run id, an alias and a backend switch, when the
    engines are on this machine (fetching them from MLflow otherwise: tests/test_operations.py)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from indicf5.errors import InputError
    from indicf5.settings import Settings
    from indicf5.tracking import REGISTERED_MODEL, TAG, resolve_engine, use_tracking

    settings = Settings()
    experiment = use_tracking(settings)
    client = MlflowClient()
    client.create_registered_model(REGISTERED_MODEL)
    dirs = {b: tmp_path / b for b in ("eager", "compiled")}
    runs = {}
    with mlflow.start_run(experiment_id=experiment, tags={f"{TAG}kind": "build"}) as parent:
        for backend, path in dirs.items():
            path.mkdir()
            tags = {
                f"{TAG}kind": "engine",
                f"{TAG}backend": backend,
                f"{TAG}dtype": "fp16",
                f"{TAG}sha": "abc",
                f"{TAG}engine_path": str(path),
            }
            with mlflow.start_run(experiment_id=experiment, nested=True, tags=tags) as run:
                run_id = run.info.run_id
                version = client.create_model_version(REGISTERED_MODEL, f"runs:/{run_id}/engine", run_id)
                runs[backend] = (run_id, version.version)
    client.set_registered_model_alias(REGISTERED_MODEL, "champion", runs["compiled"][1])

    assert resolve_engine(settings, "champion") == (dirs["compiled"], None)
    assert resolve_engine(settings, runs["eager"][0]) == (dirs["eager"], None)
    assert resolve_engine(settings, "champion", "eager") == (dirs["eager"], None)  # the same build's eager engine
    client.delete_run(runs["eager"][0])  # a build without an eager engine: the compiled one's files run eager
    assert resolve_engine(settings, "champion", "eager") == (dirs["compiled"], "eager")
    with pytest.raises(InputError, match="neither an engine directory"):
        resolve_engine(settings, "nightly")
    with pytest.raises(InputError, match="not an engine run"):
        resolve_engine(settings, parent.info.run_id)


def test_the_pytorch_path_runs_a_compiled_engine_but_not_the_reverse(engine, snapshot, tmp_path):
    from indicf5.backends import load_engine
    from indicf5.errors import InputError
    from indicf5.model import DiT

    compiled = engine_from_checkpoint(snapshot, tmp_path, "compiled", flags={"buckets": [256, 512]})
    model, spec, _, _ = load_engine(compiled, "cpu", "eager")
    assert isinstance(model, DiT) and spec.backend == "eager"
    with pytest.raises(InputError, match="lacks compile_cache.bin"):
        load_engine(engine, "cpu", "compiled")


def test_serve_refuses_an_unknown_engine_with_exit_2(home):
    r = subprocess.run(
        [sys.executable, "-m", "indicf5.cli", "serve", "--engine", "champion"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    reason = r.stderr.strip().splitlines()[-1]  # (MLflow may log creating its database first)
    assert r.returncode == 2 and reason.startswith("indicf5 serve: 'champion' is neither") and "alias" in reason


def test_load_bench_runs_and_reports_every_request(tmp_path):
    out = tmp_path / "load.json"
    subprocess.run(
        [
            sys.executable,
            "bench/load.py",
            "--synthetic",
            "--requests",
            "6",
            "--concurrency",
            "3",
            "--max-batch",
            "4",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
    )
    result = json.loads(out.read_text())["max_batch=4"]
    assert result["ok"] == 6 and result["p50_ms"] > 0 and result["rows_per_batch"] >= 1
    stages = result["stage_ms"]  # where a request's time went in the server
    assert set(stages) == {"prepare", "queue", "engine", "vocoder_wait", "vocoder", "encode"}
    assert all(ms >= 0 for ms in stages.values()) and stages["engine"] > 0 and stages["vocoder"] > 0
    assert sum(stages.values()) < result["server_ms"] < result["mean_ms"]
