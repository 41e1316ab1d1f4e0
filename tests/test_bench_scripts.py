"""The benchmark scripts stay runnable: each imports what it names from the package and parses its
arguments (their measurements need a GPU; test_serve.py runs bench/load.py whole on the CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("script", ["engine_bench.py", "kernel_bench.py", "load.py"])
def test_a_bench_script_imports_and_explains_its_arguments(script):
    r = subprocess.run(
        [sys.executable, f"bench/{script}", "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage:")
