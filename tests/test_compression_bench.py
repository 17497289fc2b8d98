"""The script behind the task-routing, merging/pruning and quantization tables of docs/techniques.md
runs end to end in its smoke mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_compression_benchmark_smoke(tmp_path):
    script = REPO / "benchmarks" / "compression.py"
    res = subprocess.run(
        [sys.executable, str(script), "--smoke", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "| task routing |" in out and "bit-identical=True" in out
    assert "| pruning |" in out and "| merging |" in out and "| quantization |" in out
    assert "ternary, GPTQ" in out and (tmp_path / "results.json").is_file()
