"""The script behind the serving table of docs/techniques.md, in its smoke mode: it serves a tiny
model over real loopback HTTP (float32 and an int8 copy), and what it reports is checked against an
independent `model.generate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from moekit.data import Tokenizer  # noqa: E402
from moekit.train import checkpoint as ckpt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_serve_benchmark_smoke(tmp_path):
    script = REPO / "benchmarks" / "serve_bench.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(script), "--smoke", "--work", str(tmp_path), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "serve_bench.json").read_text())
    variants = result["variants"]
    assert list(variants) == ["float32", "int8"]
    assert variants["float32"]["format"] == "moekit" and variants["int8"]["format"] == "quantized"
    assert variants["int8"]["file_mib"] < variants["float32"]["file_mib"]

    # the greedy text every path agreed on is model.generate's, computed here independently
    model, _ = ckpt.load_model(tmp_path / "tiny")
    tok = Tokenizer.from_file(tmp_path / "tiny" / ckpt.TOKENIZER_FILE)
    prompt_ids = tok.encode(result["settings"]["prompt"])
    out = model.generate(torch.tensor([prompt_ids]), 8, temperature=0.0, eos_id=tok.eos_id)
    new_ids = out[0, len(prompt_ids) :].tolist()
    f32 = variants["float32"]
    assert f32["completion_tokens"] == len(new_ids) >= 1
    assert f32["completion_text"] == tok.decode([i for i in new_ids if i != tok.eos_id])

    for r in variants.values():
        times = r["times_s"]
        assert all(len(v) == result["settings"]["rounds"] for v in times.values())
        assert all(0 < first <= total for first, total in zip(times["stream_ttft"], times["stream"]))
        assert r["http_over_engine"] == pytest.approx(r["median_s"]["http"] / r["median_s"]["engine"])
        assert r["server_exit_status"] == 0  # SIGTERM stopped the server cleanly
        memory = r["server_memory_mib"]  # a Python process with torch loaded: well over 50 MiB
        assert memory["VmHWM"] >= memory["VmRSS"] > 50

    rows = [line for line in res.stdout.splitlines() if line.startswith("| serving |")]
    assert len(rows) == 6 and rows == result["rows"]
    assert all(row.count(" | ") == 5 for row in rows)  # six columns
    assert "moekit quantize --ckpt tiny --method int8" in rows[4]
    # the quantized copy and the server logs were temporary; the input checkpoint is all that is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve_bench.json", "tiny"]
