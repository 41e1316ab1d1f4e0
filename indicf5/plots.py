"""Figures logged with a build (the latency-vs-length plot, a mel spectrogram) and the engines' comparison."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def latency_plot(series: dict[str, tuple[list[int], list[float]]], path: Path, title: str) -> None:
    """series: label -> (total frames, p50 ms)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (frames, ms) in series.items():
        ax.plot(frames, ms, marker="o", label=label)
    ax.set_xlabel("total frames (reference + generated)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mel_plot(mel: np.ndarray, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 3))
    image = ax.imshow(mel, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("frame")
    ax.set_ylabel("mel bin")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class EngineLatency:
    """One engine's bars in the comparison chart."""

    label: str
    p50_ms: dict[int, float]  # total frames -> end-to-end latency
    p95_ms: dict[int, float]
    speedup: dict[int, float]  # over the fp32 eager reference
    parity_rel_l2: float
    champion: bool


def comparison_chart(engines: list[EngineLatency], path: Path, title: str) -> None:
    """Grouped bars: for each length (total frames), each engine's end-to-end p50 with a whisker up
    to its p95 and its speedup above; the legend gives each engine's parity error and marks the champion."""
    lengths = sorted({n for e in engines for n in e.p50_ms})
    width = 0.8 / max(1, len(engines))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(lengths) * max(1, len(engines))), 4.8))
    for i, e in enumerate(engines):
        shown = [n for n in lengths if n in e.p50_ms]
        xs = [lengths.index(n) + i * width for n in shown]
        p50 = [e.p50_ms[n] for n in shown]
        whisker = [[0.0] * len(shown), [max(0.0, e.p95_ms.get(n, e.p50_ms[n]) - e.p50_ms[n]) for n in shown]]
        label = f"{'★ ' if e.champion else ''}{e.label} (parity relL2 {e.parity_rel_l2:.1e})"
        bars = ax.bar(
            xs,
            p50,
            width,
            yerr=whisker,
            capsize=3,
            label=label,
            hatch="//" if e.champion else None,
            edgecolor="black" if e.champion else None,
        )
        ax.bar_label(bars, [f"{e.speedup[n]:.2f}x" if n in e.speedup else "" for n in shown], fontsize=8, padding=2)
    ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(lengths))], [str(n) for n in lengths])
    ax.set_xlabel("total frames (reference + generated)")
    ax.set_ylabel("end-to-end latency (ms): p50 bar, p95 whisker")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=11)
    ax.margins(y=0.3)  # room for the speedup labels and the legend
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="★ champion; labels: speedup over eager-fp32", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
