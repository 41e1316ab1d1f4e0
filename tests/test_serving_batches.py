"""Serving for throughput, as a client and as the worker see it: batches of every size equal their
rows alone, a stream equals the whole response sample for sample, a job cancelled before its
batch starts is never rendered, a failing job fails alone, and nothing is captured or compiled
after ready. A real `indicf5 serve` of a compiled engine (CPU: its results do not depend on
batch-mates, to the bit) on loopback."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from indicf5.backends import engine_from_checkpoint
from indicf5.config import SamplingConfig
from indicf5.serve.batching import InferenceFailed, InferenceQueue, InferenceWorker
from indicf5.serve.metrics import Metrics
from indicf5.serve.process import ServerProcess
from indicf5.audio import Reference
from indicf5.synth import Rendered, Row, Synthesizer

TEXTS = ["नमस्ते दुनिया", "यह एक परीक्षण है", "आज मौसम अच्छा है", "मुझे हिंदी पसंद है", "नमस्ते"]
LONG = "नमस्ते दुनिया, यह एक लंबा वाक्य है जो कई टुकड़ों में बंटेगा। " * 12  # 3+ chunks with the synthetic reference


@pytest.fixture(scope="module")
def server(snapshot, tmp_path_factory):
    engine = engine_from_checkpoint(
        snapshot,
        tmp_path_factory.mktemp("engine"),
        "compiled",
        flags={"buckets": [128, 256, 512, 1024, 2560], "batch_sizes": [1, 2, 4, 8]},
    )
    home = tmp_path_factory.mktemp("home")
    server = ServerProcess(
        engine,
        home / "server.log",
        "--max-batch",
        "8",
        "--voices-dir",
        str(home / "voices"),
        env={"INDICF5_HOME": str(home), "TTS_BATCH_WAIT_MS": "200"},
        ready_timeout_s=600,
    )
    ref_text = (snapshot / "reference.txt").read_text().strip()
    with (snapshot / "reference.wav").open("rb") as f:
        r = httpx.post(
            f"{server.url}/v1/voices", data={"name": "v", "ref_text": ref_text}, files={"audio": ("reference.wav", f)}
        )
    assert r.status_code == 201, r.text
    server.engine = engine
    yield server
    server.stop()


def speech(server, text: str, seed: int, **extra) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/audio/speech", json={"input": text, "voice": "v", "seed": seed, **extra}, timeout=300
    )


def metric(server, name: str) -> float:
    line = next(line for line in httpx.get(f"{server.url}/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_requests_batched_together_equal_each_request_alone(server):
    alone = [speech(server, text, seed).content for seed, text in enumerate(TEXTS)]
    batches_before = metric(server, "indicf5_batch_rows_count")
    with ThreadPoolExecutor(len(TEXTS)) as pool:  # a batch wait of 200 ms: they share batches
        together = list(pool.map(lambda args: speech(server, args[1], args[0]).content, enumerate(TEXTS)))
    assert metric(server, "indicf5_batch_rows_count") - batches_before < len(TEXTS)  # some rows did share a batch
    assert together == alone
    assert metric(server, "indicf5_engine_captures_after_ready") == 0
    assert metric(server, "indicf5_engine_compiles_after_ready") == 0


def test_a_stream_equals_the_whole_response_sample_for_sample(server):
    whole = speech(server, LONG, 3, response_format="pcm")
    assert whole.status_code == 200
    with httpx.stream(
        "POST",
        f"{server.url}/v1/audio/speech",
        timeout=300,
        json={
            "input": LONG,
            "voice": "v",
            "seed": 3,
            "response_format": "pcm",
            "stream": True,
            "stream_format": "audio",
        },
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
        assert r.headers.get("transfer-encoding") == "chunked"
        pieces = [piece for piece in r.iter_bytes() if piece]
    assert len(pieces) > 1 and b"".join(pieces) == whole.content
    wav = speech(server, LONG, 3, stream=True)  # a WAV whose header says "until the end"
    data, rate = sf.read(io.BytesIO(wav.content), dtype="int16")
    assert rate == 24_000 and np.array_equal(data, np.frombuffer(whole.content, "<i2"))
    flac = speech(server, LONG, 3, stream=True, response_format="flac")
    assert flac.status_code == 422 and "stream pcm or wav" in flac.json()["error"]["message"]
    sse = speech(server, LONG, 3, stream=True, stream_format="sse")
    assert sse.status_code == 422


def test_the_cli_streams_what_it_writes_whole(server, snapshot, tmp_path):
    common = [
        sys.executable,
        "-m",
        "indicf5.cli",
        "synth",
        "--engine",
        str(server.engine),
        "--text",
        LONG,
        "--ref-audio",
        str(snapshot / "reference.wav"),
        "--seed",
        "3",
    ]
    subprocess.run([*common, "--out", str(tmp_path / "whole.wav")], check=True, capture_output=True, timeout=600)
    streamed = subprocess.run([*common, "--stream", "--out", "-"], check=True, capture_output=True, timeout=600).stdout
    want, _ = sf.read(tmp_path / "whole.wav", dtype="int16")
    got, rate = sf.read(io.BytesIO(streamed), dtype="int16")
    assert rate == 24_000 and np.array_equal(got, want)


# --- the worker on its own, with a synthesizer that records what it is asked to render


class RecordingSynth:
    device = "cpu"

    def __init__(self, gate: threading.Event | None = None):
        self.sampled: list[list[int | None]] = []  # the seeds of each batch's rows
        self.gate = gate

    def sample_rows(self, rows: list[Row], sampling: SamplingConfig, on_step=None) -> list[torch.Tensor]:
        self.sampled.append([r.seed for r in rows])
        if self.gate is not None:
            self.gate.wait(10)
        if any(r.seed == 666 for r in rows):
            raise RuntimeError("a row this engine cannot render")
        return [torch.full((1, 4, 3), float(r.seed)) for r in rows]

    def vocode(self, mels: list[torch.Tensor]) -> list[Rendered]:
        return [Rendered(mel.flatten().numpy(), mel[0].numpy()) for mel in mels]


def row(seed: int) -> Row:
    return Row(torch.zeros(5, 100), torch.zeros(3, dtype=torch.long), 100, 5, seed)


def test_a_job_cancelled_before_its_batch_starts_is_never_rendered():
    gate = threading.Event()
    synth = RecordingSynth(gate)
    queue = InferenceQueue(Metrics(), max_batch_rows=1, max_wait_s=0)
    worker = InferenceWorker(queue, synth)
    worker.start()
    first = queue.submit([row(1)], SamplingConfig())
    deadline = time.monotonic() + 10
    while not synth.sampled and time.monotonic() < deadline:  # the first batch is running
        time.sleep(0.01)
    second, third = queue.submit([row(2)], SamplingConfig()), queue.submit([row(3)], SamplingConfig())
    assert second.cancel()  # its client left while the GPU was busy
    gate.set()
    assert third.result(10)[0].wave[0] == 3 and first.result(10)[0].wave[0] == 1
    queue.close()
    worker.join(10)
    assert synth.sampled == [[1], [3]]


def test_a_failing_job_fails_alone_and_its_batch_mates_are_rendered():
    synth = RecordingSynth()
    queue = InferenceQueue(Metrics(), max_batch_rows=8, max_wait_s=0.5)
    good, bad = queue.submit([row(1), row(2)], SamplingConfig()), queue.submit([row(666)], SamplingConfig())
    worker = InferenceWorker(queue, synth)
    worker.start()
    assert [r.wave[0] for r in good.result(10)] == [1, 2]
    with pytest.raises(InferenceFailed, match="synthesis failed on the server for this request"):
        bad.result(10)
    queue.close()
    worker.join(10)
    assert synth.sampled == [[1, 2, 666], [1, 2], [666]]  # the batch, then each job alone


def test_a_stream_s_later_chunks_wait_for_its_first_to_start():
    queue = InferenceQueue(Metrics(), max_batch_rows=8, max_wait_s=0)
    first = queue.submit([row(1)], SamplingConfig())
    rest = queue.submit([row(2), row(3)], SamplingConfig(), after=first)
    other = queue.submit([row(4)], SamplingConfig())
    assert [j.future for j in queue.take()] == [first, other]  # not rest: it would delay the first chunk
    assert [j.future for j in queue.take()] == [rest]


def test_the_batch_rows_follow_the_engine_s_token_budget():
    queue = InferenceQueue(Metrics(), max_batch_rows=8, max_wait_s=0, rows_for=lambda frames: 2 if frames > 500 else 8)
    long = [
        queue.submit([Row(torch.zeros(5, 100), torch.zeros(3, dtype=torch.long), 600, 5, i)], SamplingConfig())
        for i in range(3)
    ]
    assert [j.future for j in queue.take()] == long[:2]


def test_a_batch_takes_the_rows_that_pay_for_its_batch_size():
    """With the engine's cost a batch padded up to 1, 2, 4, 8 or 16 rows (the cost of the padded
    size), 10 queued rows go as 8 and then 2, not as 10 padded to 16; 7 rows go together (within
    10% of 4's rate); an unknown cost takes everything."""
    padded = lambda rows: next(size for size in (1, 2, 4, 8, 16) if size >= rows)
    costs = {1: 1.0, 2: 1.1, 4: 1.2, 8: 2.3, 16: 4.2}
    queue = InferenceQueue(
        Metrics(), max_batch_rows=16, max_wait_s=0, batch_cost=lambda rows, frames: costs[padded(rows)]
    )
    jobs = [queue.submit([row(i)], SamplingConfig()) for i in range(10)]
    assert [j.future for j in queue.take()] == jobs[:8]
    assert [j.future for j in queue.take()] == jobs[8:]
    jobs = [queue.submit([row(i)], SamplingConfig()) for i in range(7)]  # 7 / 2.3 = 3.04 rows a second, 4 / 1.2 = 3.33
    assert [j.future for j in queue.take()] == jobs
    for unknown in (None, 0.0):
        queue.batch_cost = lambda rows, frames, unknown=unknown: unknown if rows > 4 else costs[padded(rows)]
        jobs = [queue.submit([row(i)], SamplingConfig()) for i in range(10)]
        assert [j.future for j in queue.take()] == jobs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_reference_prepared_while_a_batch_fills_the_gpu_does_not_wait_for_it():
    """The server prepares requests (the reference's mel, on the GPU) while a batch's loop runs on
    the default stream: the mel runs ahead of that loop, and is the same mel."""
    synth = Synthesizer(model=None, vocoder=None, vocab=None, device="cuda")
    ref = Reference(
        wave=0.1 * torch.randn(1, 3 * 24_000, generator=torch.Generator().manual_seed(0)), source_rms=0.1, seconds=3.0
    )
    idle = synth.reference_mel(ref)
    torch.cuda._sleep(2_000_000_000)  # ~1 s of a busy default stream, as a batch's loop
    busy = synth.reference_mel(ref)
    loop_still_running = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert loop_still_running, "the reference's mel waited for the default stream's work"
    assert torch.equal(busy, idle)


class SlowCudaSynth(RecordingSynth):
    """Each batch's mels are written on the GPU after ~0.5 s of a busy stream, as a batch's loop
    leaves them; its vocoder reads them on the worker's vocoder stream."""

    device = "cuda"

    def sample_rows(self, rows: list[Row], sampling: SamplingConfig, on_step=None) -> list[torch.Tensor]:
        self.sampled.append([r.seed for r in rows])
        torch.cuda._sleep(1_000_000_000)
        return [torch.full((1, 4, 3), float(r.seed), device="cuda") for r in rows]

    def vocode(self, mels: list[torch.Tensor]) -> list[Rendered]:
        return [Rendered(mel.flatten().cpu().numpy(), mel[0].cpu().numpy()) for mel in mels]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_vocoder_thread_reads_a_batch_s_mels_only_once_its_loop_is_done():
    """On CUDA the sampler hands a batch to the vocoder thread as soon as its loop is queued; the
    vocoder, on a stream of its own, must read the mels the loop finished, batch after batch."""
    queue = InferenceQueue(Metrics(), max_batch_rows=2, max_wait_s=0)
    jobs = [queue.submit([row(seed), row(seed + 1)], SamplingConfig()) for seed in (10, 20, 30)]
    worker = InferenceWorker(queue, SlowCudaSynth())
    worker.start()
    assert [[float(r.wave[0]) for r in job.result(30)] for job in jobs] == [[10, 11], [20, 21], [30, 31]]
    queue.close()
    worker.join(10)
