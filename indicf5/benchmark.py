"""Latency of an engine: one flow step, the whole ODE loop, the vocoder, and end to end.

Each is timed after warm-up, p50/p95 over repeats, at several total lengths (reference +
generated frames, text of a quarter of that), with CFG. Real-time factor = end-to-end time over
the seconds of audio generated. On a GPU, work is synchronised before each clock read.
"""

from __future__ import annotations

import resource
import time
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, Field

from indicf5 import progress
from indicf5.config import TORCH_DTYPES, DType, MelConfig, Schedule
from indicf5.parity import seeded_inputs
from indicf5.sampler import FlowModel, GuidedVelocity, sample, state_dtype
from indicf5.vocoder import decode


class BenchmarkConfig(BaseModel):
    lengths: list[int] = Field([250, 500], description="total frames per utterance (94 frames = 1 s)")
    nfe: int = 32
    schedule: Schedule = Field("uniform", description="time grid of the loop (SamplingConfig)")
    warmup: int = 1
    repeats: int = 3
    seed: int = 0


class Timing(BaseModel):
    p50_ms: float
    p95_ms: float
    runs: int


class LengthResult(BaseModel):
    frames: int
    audio_seconds: float
    step: Timing
    loop: Timing
    vocoder: Timing
    end_to_end: Timing
    rtf: float  # end-to-end p50 / audio seconds


class BenchmarkReport(BaseModel):
    device: str
    dtype: str
    nfe: int
    schedule: Schedule = "uniform"
    results: list[LengthResult]
    peak_memory_mb: float
    peak_memory_kind: str  # "cuda_allocated" or "process_rss"


def _timed(fn: Callable[[], object], device: str, warmup: int, repeats: int, what: str) -> Timing:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    progress.report(f"{what}, warm-up")
    for _ in range(warmup):
        fn()
    times = []
    for i in range(repeats):
        progress.report(f"{what}, repeat {i + 1} of {repeats}")
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(p50_ms=float(np.percentile(times, 50)), p95_ms=float(np.percentile(times, 95)), runs=repeats)


@torch.inference_mode()
def benchmark_engine(
    engine: FlowModel,
    vocoder: torch.nn.Module,
    dtype: DType,
    vocab_size: int,
    device: str,
    config: BenchmarkConfig = BenchmarkConfig(),
    mel: MelConfig = MelConfig(),
) -> BenchmarkReport:
    torch_dtype = state_dtype(engine, TORCH_DTYPES[dtype])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results = []
    for i, n in enumerate(config.lengths):
        at = f"length {n} ({i + 1} of {len(config.lengths)})"
        cond, text, x = (t.to(device) for t in seeded_inputs(n, vocab_size, mel.n_mels, config.seed))
        ref_frames = cond.shape[1]
        full_cond = torch.nn.functional.pad(cond, (0, 0, 0, n - ref_frames)).to(torch_dtype)
        velocity = GuidedVelocity.prepare(engine, full_cond, text, 2.0, [n])
        t = torch.tensor(0.5, device=device)

        def run_loop(n=n, cond=cond, text=text):
            return sample(
                engine, cond, text, [n], nfe=config.nfe, schedule=config.schedule, seed=config.seed, dtype=torch_dtype
            )

        generated = run_loop()[:, ref_frames:].transpose(1, 2)
        vocode = lambda: decode(vocoder, generated)
        end_to_end = lambda: decode(vocoder, run_loop()[:, ref_frames:].transpose(1, 2))
        w, r = config.warmup, config.repeats
        e2e = _timed(end_to_end, device, w, r, f"{at}: end to end")
        audio_seconds = (n - ref_frames) * mel.hop_length / mel.sample_rate
        results.append(
            LengthResult(
                frames=n,
                audio_seconds=audio_seconds,
                step=_timed(lambda: velocity(x.to(torch_dtype), t), device, w, r, f"{at}: step"),
                loop=_timed(run_loop, device, w, r, f"{at}: loop"),
                vocoder=_timed(vocode, device, w, r, f"{at}: vocoder"),
                end_to_end=e2e,
                rtf=e2e.p50_ms / 1e3 / audio_seconds,
            )
        )
    if device.startswith("cuda"):
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_rss"
    return BenchmarkReport(
        device=device,
        dtype=dtype,
        nfe=config.nfe,
        schedule=config.schedule,
        results=results,
        peak_memory_mb=peak,
        peak_memory_kind=kind,
    )
