"""Figures logged with a build: the latency-vs-length plot and a mel spectrogram."""

from __future__ import annotations

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


def comparison_chart(latency: dict[str, dict[int, float]], path: Path, title: str) -> None:
    """Grouped bars: for each length (total frames), each engine's p50 end-to-end latency."""
    lengths = sorted({n for per_length in latency.values() for n in per_length})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(lengths) * max(1, len(latency)) / 2), 4))
    width = 0.8 / max(1, len(latency))
    for i, (label, per_length) in enumerate(latency.items()):
        xs = [j + i * width for j, n in enumerate(lengths) if n in per_length]
        ax.bar(xs, [per_length[n] for n in lengths if n in per_length], width, label=label)
    ax.set_xticks([j + width * (len(latency) - 1) / 2 for j in range(len(lengths))], [str(n) for n in lengths])
    ax.set_xlabel("total frames (reference + generated)")
    ax.set_ylabel("end-to-end p50 (ms)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
