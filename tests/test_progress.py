"""Long stages say where they are: the parity gate and the benchmark report each length and repeat."""

from __future__ import annotations

from indicf5 import progress
from indicf5.benchmark import BenchmarkConfig, benchmark_engine
from indicf5.checkpoint import build_model
from indicf5.parity import ParityConfig, check_parity
from indicf5.vocoder import load_vocoder


def test_parity_and_benchmark_report_the_length_and_repeat_they_are_at(checkpoint):
    model = build_model(checkpoint)
    vocab = checkpoint.config.text_num_embeds
    seen: list[str] = []
    with progress.listening(seen.append):
        check_parity(model, model, "fp32", vocab, "cpu", ParityConfig(lengths=[64, 80], nfe=2))
        benchmark_engine(
            model,
            load_vocoder(checkpoint.vocoder),
            "fp32",
            vocab,
            "cpu",
            BenchmarkConfig(lengths=[64, 80], nfe=2, warmup=1, repeats=2),
        )
    assert seen[:2] == ["length 64 (1 of 2)", "length 80 (2 of 2)"]
    assert "length 80 (2 of 2): end to end, repeat 2 of 2" in seen and "length 64 (1 of 2): step, warm-up" in seen
    progress.report("nobody listens")  # without a listener, a report is a no-op
    assert seen[-1] != "nobody listens"
