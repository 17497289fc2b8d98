"""`moekit bench --quick`: the layer benchmark's whole pipeline runs and writes well-formed JSON."""

from __future__ import annotations

import json
import time

import pytest

from moekit.cli import main

pytest.importorskip("transformers")

CELL_KEYS = {"shape", "tokens", "impl", "mode", "ms", "gflops", "frac_sgemm"}
IMPLS = {"moekit", "hf_eager", "hf_grouped_mm", "gshard_einsum"}


@pytest.mark.slow
def test_bench_quick_writes_json(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    start = time.perf_counter()
    assert main(["bench", "--quick", "--out", str(out), "--md", str(md)]) == 0
    assert time.perf_counter() - start < 60
    result = json.loads(out.read_text())
    layer = result["layer"]
    assert layer["quick"] is True
    assert {"cpu", "logical_cores", "torch_threads"} <= set(layer["machine"])
    assert {"torch", "transformers", "moekit", "python"} <= set(layer["versions"])
    assert layer["ceilings"]["sgemm"]["gflops"] > 0 and layer["ceilings"]["read_bandwidth"]["gbs"] > 0

    cells = layer["cells"]
    shapes = {s["name"] for s in layer["shapes"]}
    assert shapes == {"mixtral", "fine_grained"}
    for shape in shapes:
        for tokens in (1, 8):
            for mode in ("fwd", "fwd_bwd"):
                got = {
                    c["impl"] for c in cells if (c["shape"], c["tokens"], c["mode"]) == (shape, tokens, mode)
                }
                assert got == IMPLS, (shape, tokens, mode)
    for c in cells:
        assert set(c) >= CELL_KEYS, c
        assert c["ms"] > 0
        if c["mode"] == "fwd_bwd":
            assert c["peak_mb"] > 0
        if c["mode"] == "fwd" and c["impl"] == "moekit":
            assert c["x_floor"] > 0 and c["distinct_experts"] >= 1
        if "max_abs_diff_vs_moekit" in c:  # transformers' blocks got moekit's weights: same outputs
            assert c["max_abs_diff_vs_moekit"] < 1e-4, c

    assert [s["experts"] for s in layer["scaling"]] == [8, 32]
    names = [t["name"] for t in layer["targets"]]
    assert any("every layer cell" in n for n in names)
    assert all(isinstance(t["met"], bool) for t in layer["targets"])
    assert "Targets" in md.read_text() and "moekit" in md.read_text()


def test_bench_e2e_is_reported_not_faked(monkeypatch):
    """A missing suite module is reported as not yet built."""
    from moekit import bench

    monkeypatch.setattr(bench, "load_suite", lambda name: None)
    assert bench.run("e2e") == {"e2e": {"status": "not yet built"}}
    with pytest.raises(ValueError, match="unknown suite"):
        bench.run("nope")


def test_bench_keeps_hand_written_notes_and_replaces_the_tables(tmp_path, monkeypatch):
    """A rerun rewrites the generated tables but keeps the results file's "## Notes" section."""
    from moekit import bench

    md, out = tmp_path / "benchmarks.md", tmp_path / "benchmarks.json"
    md.write_text("# Benchmarks\n\nold table | 1 ms\n\n## Notes\n\nWhy cell X is slow.\n- detail\n")
    monkeypatch.setattr(bench, "run", lambda *a: {"e2e": {"status": "not yet built"}})
    assert main(["bench", "--suite", "e2e", "--out", str(out), "--md", str(md)]) == 0
    text = md.read_text()
    assert "old table" not in text and "not yet built" in text
    assert text.endswith("## Notes\n\nWhy cell X is slow.\n- detail\n")
    assert text.index("not yet built") < text.index("## Notes")
    assert json.loads(out.read_text()) == {"e2e": {"status": "not yet built"}}
    assert bench.kept_notes(tmp_path / "missing.md") == ""


def test_cpu_used_by_others_excludes_this_process(monkeypatch):
    """This process's own CPU time is not counted as other people's load."""
    import sys

    sys.path.insert(0, str(bench_dir()))
    import bench_layer

    start, wall = bench_layer.cpu_seconds(), time.perf_counter()
    if start is None:
        pytest.skip("no /proc/stat")
    while time.perf_counter() - wall < 0.5:  # keep one core busy in this process
        sum(range(1000))
    end = bench_layer.cpu_seconds()
    assert end[1] - start[1] >= 0.3  # counted as this process's CPU time ...
    assert end[0] - start[0] >= 0.3  # ... and as the machine's
    # others = (machine busy - own) / wall: 3 s busy, 1 s ours over 2 s = one core of others
    monkeypatch.setattr(bench_layer, "cpu_seconds", lambda: (103.0, 11.0))
    assert bench_layer.cpu_used_by_others((100.0, 10.0), 2.0) == 1.0
    assert bench_layer.cpu_used_by_others(None, 2.0) is None


def bench_dir():
    from moekit.bench import benchmarks_dir

    return benchmarks_dir()
