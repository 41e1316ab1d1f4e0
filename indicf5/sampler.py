"""Conditional flow matching sampler: Euler steps on a sway-warped time grid with CFG.

    x_0 ~ N(0, I)                         one seed per utterance, as upstream draws it
    x_{i+1} = x_i + (t_{i+1} - t_i) * v(x_i, t_i)
    v = v_cond + cfg * (v_cond - v_uncond)     both rows in one batch of 2b
    t = s + sway * (cos(pi/2 s) - 1 + s),  s = linspace(0, 1, nfe + 1)   (schedule "uniform")
                                           s = EPSS_GRIDS[nfe] / 32           (schedule "epss")

The reference frames are copied back over the result. The time grid stays in fp32 whatever the
model's dtype (a bf16 grid collapses adjacent steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from indicf5.config import Schedule

# velocity(x (b, n, mel), t scalar fp32 tensor) -> (b, n, mel)
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FlowModel(Protocol):
    """What the sampler needs of a transformer: the reference DiT, or an engine built from it.
    An engine may also offer ``integrate(velocity, x0, t, on_step)``, its own run of `euler`, and
    ``state_dtype``, the dtype it wants the ODE state in (see `state_dtype`)."""

    def embed_text(self, text: torch.Tensor, seq_len: int, mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def __call__(self, x, cond, text_emb, time, mask=None) -> torch.Tensor: ...


def state_dtype(model: FlowModel, dtype: torch.dtype) -> torch.dtype:
    """The dtype to keep the ODE state in: the engine's choice (its `state_dtype`), else the
    dtype it computes in."""
    return getattr(model, "state_dtype", dtype)


# Empirically Pruned Step Sampling (f5-tts 1.1, model/utils.py): for these step counts, the steps
# of a 32-step uniform grid to keep, in 1/32; dense early, where the flow bends most.
EPSS_GRIDS: dict[int, tuple[int, ...]] = {
    5: (0, 2, 4, 8, 16, 32),
    6: (0, 2, 4, 6, 8, 16, 32),
    7: (0, 2, 4, 6, 8, 16, 24, 32),
    10: (0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32),
    12: (0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32),
    16: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32),
}


def time_grid(nfe: int, sway_coef: float | None, device=None, schedule: Schedule = "uniform") -> torch.Tensor:
    """(nfe + 1,) fp32 times from 0 to 1. `epss` at a step count it has no grid for is the uniform
    grid, as in f5-tts 1.1 (whose default it is at any count)."""
    if schedule == "epss" and nfe in EPSS_GRIDS:
        t = torch.tensor(EPSS_GRIDS[nfe], device=device, dtype=torch.float32) / 32
    else:
        t = torch.linspace(0.0, 1.0, nfe + 1, device=device, dtype=torch.float32)
    if sway_coef is not None:
        t = t + sway_coef * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def euler(
    velocity: VelocityFn, x: torch.Tensor, t: torch.Tensor, on_step: Callable[[], None] | None = None
) -> torch.Tensor:
    for t0, t1 in zip(t[:-1], t[1:]):
        x = x + (t1 - t0).to(x.dtype) * velocity(x, t0)
        if on_step:
            on_step()
    return x


Seeds = int | None | list[int | None]  # one for every row, or one per row


def initial_noise(durations: list[int], n_mels: int, seed: Seeds, device, dtype) -> torch.Tensor:
    """(b, max(durations), mel) noise, zero-padded; each row re-seeded so it does not depend on the
    batch. Drawn in fp32 whatever the dtype, so fp16/bf16 engines start from the reference's noise."""
    rows = []
    seeds = seed if isinstance(seed, list) else [seed] * len(durations)
    for n, seed in zip(durations, seeds):
        if seed is not None:
            torch.manual_seed(seed)
        rows.append(torch.randn(n, n_mels, device=device, dtype=torch.float32).to(dtype))
    return pad_sequence(rows, batch_first=True)


def lengths_to_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


def fit_durations(durations: list[int], ref_lens: list[int], text_lens: list[int], max_frames: int) -> list[int]:
    """Each row's total frames: at least one past its reference and its text, so something is
    generated, and at most max_frames."""
    return [min(max(d, max(r, tl) + 1), max_frames) for d, r, tl in zip(durations, ref_lens, text_lens)]


def embed_text_rows(model: FlowModel, text: torch.Tensor, durations: list[int], n: int) -> torch.Tensor:
    """(b, n, text_dim) text features, each row embedded at its own length and zero-padded to n,
    so a row's result does not depend on the rows batched with it (the text convolutions and
    their global response norm see the row's frames only)."""
    mask = None if len(set(durations)) == 1 else lengths_to_mask(torch.tensor(durations, device=text.device), n)
    return model.embed_text(text, n, mask)


@dataclass
class GuidedVelocity:
    """v(x, t) with classifier-free guidance, the conditional and unconditional rows in one batch."""

    model: FlowModel
    cond: torch.Tensor  # (b, n, mel) reference mel, zero past each reference
    text: torch.Tensor  # (2b, nt) ids, -1 padded: conditional rows, then unconditional rows (all -1)
    durations: list[int]  # frames of each text row
    cfg_strength: float
    mask: torch.Tensor | None = None  # (b, n)

    @classmethod
    def prepare(cls, model: FlowModel, cond, text, cfg_strength, durations: list[int]) -> "GuidedVelocity":
        n = cond.shape[1]
        mask = lengths_to_mask(torch.tensor(durations, device=cond.device), n) if len(durations) > 1 else None
        if cfg_strength >= 1e-5:  # guidance on: unconditional rows follow, their text all dropped (-1)
            text, durations = torch.cat((text, torch.full_like(text, -1))), durations * 2
        return cls(model, cond, text, durations, cfg_strength, mask)

    @cached_property
    def text_emb(self) -> torch.Tensor:
        """(2b, n, text_dim) features of `text`, computed on first use: an engine that runs the whole
        loop itself may embed the ids its own way instead (the compiled engine, inside its graph)."""
        return embed_text_rows(self.model, self.text, self.durations, self.cond.shape[1])

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg_strength < 1e-5:
            return self.model(x, self.cond, self.text_emb, t.to(x.dtype).expand(x.shape[0]), self.mask)
        b = x.shape[0]
        out = self.model(
            torch.cat((x, x)),
            torch.cat((self.cond, torch.zeros_like(self.cond))),  # dropped audio condition
            self.text_emb,
            t.to(x.dtype).expand(2 * b),
            None if self.mask is None else torch.cat((self.mask, self.mask)),
        )
        v_cond, v_uncond = out[:b], out[b:]
        return v_cond + (v_cond - v_uncond) * self.cfg_strength


@torch.inference_mode()
def sample(
    model: FlowModel,
    cond: torch.Tensor,  # (b, n_ref, mel) reference mels, zero-padded
    text: torch.Tensor,  # (b, nt) ids, -1 padded
    durations: list[int],  # total frames (reference + generated) per row
    *,
    ref_lens: list[int] | None = None,
    nfe: int = 32,
    cfg_strength: float = 2.0,
    sway_coef: float | None = -1.0,
    schedule: Schedule = "uniform",
    seed: Seeds = None,
    max_frames: int = 4096,
    dtype: torch.dtype | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """(b, max(durations), mel) mel frames, the reference frames included, in fp32; row i is
    valid up to fit_durations(...)[i]. `dtype` is what the model computes in; the ODE state is
    kept in `state_dtype(model, dtype)`."""
    b, n_ref, n_mels = cond.shape
    dtype = state_dtype(model, dtype or cond.dtype)
    device = cond.device
    ref_lens_t = torch.tensor(ref_lens or [n_ref] * b, device=device)
    durations = fit_durations(durations, ref_lens_t.tolist(), (text != -1).sum(-1).tolist(), max_frames)
    n = max(durations)

    ref_mask = lengths_to_mask(ref_lens_t, n)[..., None]  # (b, n, 1)
    cond = torch.nn.functional.pad(cond.to(dtype), (0, 0, 0, max(0, n - n_ref)))[:, :n]
    cond = torch.where(ref_mask, cond, torch.zeros_like(cond))
    velocity = GuidedVelocity.prepare(model, cond, text, cfg_strength, durations)
    x0 = initial_noise(durations, n_mels, seed, device, dtype)
    t = time_grid(nfe, sway_coef, device, schedule)
    integrate = getattr(model, "integrate", None)  # engines may run the whole loop their own way
    x1 = integrate(velocity, x0, t, on_step) if integrate else euler(velocity, x0, t, on_step)
    return torch.where(ref_mask, cond, x1).float()
