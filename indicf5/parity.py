"""The parity gate: an engine against the fp32 reference DiT on seeded inputs.

For each total length it compares two outputs: one guided flow step (the velocity, both CFG rows)
and the mel after a full sampling run from the same noise. Any NaN/Inf, or a relative L2 error
above the dtype's threshold, fails the gate.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, Field

from indicf5 import progress
from indicf5.config import TORCH_DTYPES, DType, Schedule
from indicf5.sampler import FlowModel, GuidedVelocity, sample, state_dtype


class ParityConfig(BaseModel):
    lengths: list[int] = Field([96, 250], description="total frames (reference + generated) to check")
    nfe: int = Field(8, description="steps of the full sampling comparison")
    schedule: Schedule = Field("uniform", description="time grid of the full sampling comparison (SamplingConfig)")
    seed: int = 0
    # fp8: an FP8 engine (precision fp8) of either dtype; measured 6.0e-3 on an H200 (docs/performance.md)
    thresholds: dict[str, float] = Field(
        {"fp32": 1e-4, "fp16": 3e-3, "bf16": 2e-2, "fp8": 1.5e-2},
        description="largest relative L2 error allowed, per dtype (fp8: FP8 engines)",
    )


class OutputError(BaseModel):
    rel_l2: float
    max_abs: float
    finite: bool


class ParityReport(BaseModel):
    dtype: str
    threshold: float
    errors: dict[str, dict[str, OutputError]]  # length -> output ("velocity", "mel") -> error

    @property
    def worst_rel_l2(self) -> float:
        return max(e.rel_l2 for per_len in self.errors.values() for e in per_len.values())

    @property
    def passed(self) -> bool:
        return all(
            e.finite and e.rel_l2 <= self.threshold for per_len in self.errors.values() for e in per_len.values()
        )

    def failures(self) -> list[str]:
        return [
            f"{name}@{n} frames: relL2 {e.rel_l2:.2e}{'' if e.finite else ' (NaN/Inf)'}"
            for n, per_len in self.errors.items()
            for name, e in per_len.items()
            if not (e.finite and e.rel_l2 <= self.threshold)
        ]


def compare(got: torch.Tensor, want: torch.Tensor) -> OutputError:
    got, want = got.double().cpu(), want.double().cpu()
    finite = bool(torch.isfinite(got).all())
    rel = float((got - want).norm() / want.norm()) if finite else math.inf
    return OutputError(rel_l2=rel, max_abs=float((got - want).abs().max()) if finite else math.inf, finite=finite)


def seeded_inputs(n: int, vocab_size: int, n_mels: int, seed: int):
    """A reference of a third of the frames and text of a quarter, as in real requests."""
    g = torch.Generator().manual_seed(seed + n)
    cond = torch.randn(1, n // 3, n_mels, generator=g)
    text = torch.randint(0, vocab_size, (1, max(1, n // 4)), generator=g)
    x = torch.randn(1, n, n_mels, generator=g)
    return cond, text, x


@torch.inference_mode()
def check_parity(
    reference: FlowModel,
    engine: FlowModel,
    dtype: DType,
    vocab_size: int,
    device: str,
    config: ParityConfig = ParityConfig(),
    n_mels: int = 100,
) -> ParityReport:
    errors = {}
    state = state_dtype(engine, TORCH_DTYPES[dtype])
    for i, n in enumerate(config.lengths):
        progress.report(f"length {n} ({i + 1} of {len(config.lengths)})")
        cond, text, x = (t.to(device) for t in seeded_inputs(n, vocab_size, n_mels, config.seed))
        full_cond = torch.nn.functional.pad(cond, (0, 0, 0, n - cond.shape[1]))
        t = torch.tensor(0.5, device=device)
        want_v = GuidedVelocity.prepare(reference, full_cond, text, 2.0, [n])(x, t)
        got_v = GuidedVelocity.prepare(engine, full_cond.to(state), text, 2.0, [n])(x.to(state), t)
        want_mel = sample(reference, cond, text, [n], nfe=config.nfe, schedule=config.schedule, seed=config.seed)
        got_mel = sample(
            engine, cond, text, [n], nfe=config.nfe, schedule=config.schedule, seed=config.seed, dtype=state
        )
        errors[str(n)] = {"velocity": compare(got_v, want_v), "mel": compare(got_mel, want_mel)}
    fp8 = getattr(getattr(engine, "choice", None), "precision", None) == "fp8"
    return ParityReport(dtype=dtype, threshold=config.thresholds["fp8" if fp8 else dtype], errors=errors)
