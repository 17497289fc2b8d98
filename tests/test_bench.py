"""`moekit bench --quick`: the layer benchmark's whole pipeline runs and writes well-formed JSON."""

from __future__ import annotations

import json
import time

import pytest
import torch

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
        # the sgemm measured in turns with the cell's implementations, and the fraction against it
        assert c["sgemm_in_phase_gflops"] > 0
        assert c["frac_sgemm_in_phase"] == pytest.approx(c["gflops"] / c["sgemm_in_phase_gflops"])
        if c["mode"] == "fwd" and c["impl"] == "moekit":
            assert c["x_floor"] > 0 and c["distinct_experts"] >= 1
            assert c["read_in_phase_gbs"] > 0
            dims = next(sh for sh in layer["shapes"] if sh["name"] == c["shape"])
            floor_ms = c["distinct_experts"] * 3 * dims["dim"] * dims["hidden"] * 4  # float32 gate, up, down
            floor_ms /= c["read_in_phase_gbs"] * 1e6
            assert c["x_floor_in_phase"] == pytest.approx(c["ms"] / floor_ms)
            target = next(
                t for t in layer["targets"] if t["name"].startswith(f"{c['shape']} T={c['tokens']} fwd")
            )
            assert target["value"] == round(c["x_floor_in_phase"], 3)  # the target takes the in-phase floor
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


def test_gpu_bench_runs_its_code_on_the_cpu_and_checks_outputs(tmp_path):
    """bench_gpu.py's whole pipeline on the CPU (float32, shrunk shapes); without CUDA the default
    device reports that nothing was measured instead of inventing numbers."""
    import sys

    sys.path.insert(0, str(bench_dir()))
    import bench_gpu

    out = tmp_path / "gpu.json"
    argv = [
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--quick",
        "--strategies",
        "auto,loop",
        "--json",
        str(out),
    ]
    assert bench_gpu.main(argv) == 0
    cells = json.loads(out.read_text())["cells"]
    impls = {"moekit[auto]", "moekit[loop]", "hf_eager", "hf_grouped_mm"}
    for shape in ("mixtral", "fine_grained"):
        for tokens in (1, 8):
            for mode in ("fwd", "fwd_bwd"):
                got = {
                    c["impl"] for c in cells if (c["shape"], c["tokens"], c["mode"]) == (shape, tokens, mode)
                }
                assert got == impls
    # float32 on the CPU: every implementation (routers included) matches the float32 layer
    assert all(c["tokens_off"] <= bench_gpu.MAX_TOKENS_OFF and c["ms"] > 0 for c in cells), cells
    # the GPU configuration: experts in bf16, the router's weight kept in float32
    modules = bench_gpu.build(bench_gpu.QUICK_SHAPES[0], torch.device("cpu"), torch.bfloat16)
    moe = modules["moekit"]
    assert moe.router.gate.weight.dtype == torch.float32
    assert moe.experts.w_in_EDF.dtype == torch.bfloat16
    assert modules["hf_grouped_mm"].experts.gate_up_proj.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        assert bench_gpu.run_gpu("cuda") == {"status": "no CUDA device: nothing measured"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_bench_gpu_suite_without_cuda_writes_nothing(tmp_path, capsys):
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    assert main(["bench", "--suite", "gpu", "--out", str(out), "--md", str(md)]) == 0
    assert "no CUDA device: nothing measured" in capsys.readouterr().out
    assert not out.exists() and not md.exists()


@pytest.mark.slow
def test_bench_e2e_quick_measures_both_libraries_on_the_same_architecture():
    """The end-to-end suite's smoke mode: same parameter count on both sides, every number measured."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e_smoke", path)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)

    arch = dict(e2e.ARCH, layers=2, dim=64, heads=4, kv_heads=2, expert_hidden=128)
    ours, theirs = e2e.moekit_model(arch), e2e.hf_model(arch, "eager")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())

    r = e2e.run_e2e(quick=True)
    for name in ("moekit", "hf_eager", "hf_grouped_mm"):
        assert r[f"{name}_train_tokens_per_s"] > 0 and r[f"{name}_generate_tokens_per_s"] > 0
    best = max(r["hf_eager_train_tokens_per_s"], r["hf_grouped_mm_train_tokens_per_s"])
    assert r["train_speedup"] == pytest.approx(r["moekit_train_tokens_per_s"] / best)
    assert r["targets"]["train_speedup >= 1.3"] == (r["train_speedup"] >= 1.3)
    assert r["train_speedup_paired"] > 0 and r["generate_speedup_paired"] > 0
    assert "| training |" in e2e.format_e2e(r) and "Paired" in e2e.format_e2e(r)
    # the paired ratio is the median of per-round ratios against the faster of the two others
    times = {"moekit": [1.0, 2.0, 1.0], "hf_eager": [3.0, 2.0, 1.5], "hf_grouped_mm": [2.0, 5.0, 1.2]}
    assert e2e.paired_speedup(times) == pytest.approx(1.2)  # rounds: 2.0, 1.0, 1.2


def _calls_by_switch(monkeypatch, native, name: str) -> dict[bool, int]:
    """Counts the calls of native.`name`, by the value of native.ENABLED at the time."""
    calls = {True: 0, False: 0}
    real = getattr(native, name)

    def counted(*args, **kwargs):
        calls[native.ENABLED] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(native, name, counted)
    return calls


def _bench_native_module():
    """benchmarks/bench_native.py as a module; skips where the native kernels are not built."""
    import importlib.util
    from pathlib import Path

    from moekit.moe import native

    if native.library() is None:
        pytest.skip("no native kernel on this machine (no C compiler, or not x86-64 with AVX2)")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_native.py"
    spec = importlib.util.spec_from_file_location("bench_native", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_native_quick_compares_kernels_and_torch_path(monkeypatch):
    """The native-kernel benchmark's smoke mode: the kernels' regimes and the torch path timed, the
    kernels really ran in their turns, and the module switches are restored afterwards."""
    from moekit.moe import native

    mod = _bench_native_module()

    threshold = native.MAX_MEAN_ROWS
    calls = _calls_by_switch(monkeypatch, native, "routed")
    r = mod.run(quick=True, tokens=(1, 8))
    assert calls[True] > 0 and calls[False] == 0  # the kernel ran in its turns only
    assert native.ENABLED
    assert threshold == native.MAX_MEAN_ROWS  # restored after the run
    assert [(c["shape"], c["tokens"]) for c in r["layer"]] == [
        (s, t) for s in ("mixtral", "fine_grained") for t in (1, 8)
    ]
    kernels = ["few", "many"] if native.blas_sgemm() is not None else ["few"]
    for c in r["layer"]:
        assert c["torch_ms"] > 0
        for path in kernels:
            assert c[f"{path}_ms"] > 0 and c[f"torch_over_{path}"] > 0
    assert r["generation"]["tokens_per_s_native"] > 0 and r["generation"]["tokens_per_s_torch"] > 0
    assert "| mixtral | 8 |" in mod.format_result(r)

    # the training part: layer forward+backward and the ops, kernels on and off in turns
    calls = _calls_by_switch(monkeypatch, native, "sorted_rows_backward")
    t = mod.run_training(quick=True, tokens=(8,))
    assert calls[True] > 0 and calls[False] == 0 and native.ENABLED
    assert [(c["shape"], c["tokens"]) for c in t["layer"]] == [("mixtral", 8), ("fine_grained", 8)]
    assert len(t["ops"]) == 3 and all(c["native_ms"] > 0 and c["torch_ms"] > 0 for c in t["ops"])
    assert set(t["adamw"]) == {"loop", "foreach", "fused"}
    assert "| mixtral | 8 |" in mod.format_training(t)


@pytest.mark.slow
def test_bench_native_baseline_builds_the_other_sources_and_restores_the_library(monkeypatch):
    """`bench_native.py --baseline REF`: the kernels of REF (here a folder with the working tree's
    sources) are built into their own library, timed in turns with the current one, and the current
    library is in use again afterwards."""
    from moekit.moe import native

    mod = _bench_native_module()

    import ctypes

    current = native.library()
    loaded, libraries = [], []
    real_load = native._load
    monkeypatch.setattr(
        native, "_load", lambda p=None: loaded.append(p) or libraries.append(real_load(p)) or libraries[-1]
    )

    def layer_calls(lib) -> int:  # the library's own count of its one-call layer's runs
        return ctypes.c_int64.in_dll(lib, "moekit_topk_layer_calls").value

    before = layer_calls(current)
    r = mod.run_baseline(str(native.CSRC), quick=True, tokens=(1, 8))
    assert len(loaded) == 1 and loaded[0].parent.parent != native.CSRC  # built apart, from the copies
    # both libraries' layer ran in every timed round (a warm-up and 2 rounds, both shapes, T = 1, 8)
    assert layer_calls(libraries[0]) >= 12 and layer_calls(current) - before >= 12
    assert native.library() is current
    assert [(c["shape"], c["tokens"]) for c in r["layer"]] == [
        (s, t) for s in ("mixtral", "fine_grained") for t in (1, 8)
    ]
    for c in r["layer"]:
        assert c["baseline_ms"] > 0 and c["current_ms"] > 0 and c["baseline_over_current"] > 0
    with pytest.raises(ValueError, match="no-such-revision"):
        mod.baseline_sources("no-such-revision")


def test_bench_native_gemm_part_compares_both_gemms_in_turns(monkeypatch):
    """`bench_native.py --part gemm` (smoke mode): each product timed by the BLAS and by moekit's GEMM,
    warm and cold; the workloads run with the two in turns; the switch is restored afterwards."""
    from moekit.moe import native

    mod = _bench_native_module()
    if native.blas_sgemm() is None:
        pytest.skip("no BLAS sgemm in torch to compare with")
    switched = []
    real = native.use_blas_gemm
    monkeypatch.setattr(native, "use_blas_gemm", lambda blas: switched.append(blas) or real(blas))
    was = native.BLAS_GEMM
    r = mod.run_gemm(quick=True)
    assert was == native.BLAS_GEMM and switched[-1] == was  # restored
    assert [(c["m"], c["n"], c["k"]) for c in r["products"]] == [s[2:] for s in mod.QUICK_GEMM_SHAPES]
    for c in r["products"]:
        for key in ("warm_blas", "warm_moekit", "cold_blas", "cold_moekit"):
            assert c[f"{key}_gflops"] > 0
    names = [w["name"] for w in r["workloads"]]
    assert len(names) == 4 + 2 + 1 and "training step" in names[-1]
    assert switched[: 2 * len(names)] == [True, False] * len(names)  # in turns, one warm-up round first
    assert all(w["blas_ms"] > 0 and w["moekit_ms"] > 0 for w in r["workloads"])
    assert set(r["scaling"]) == {"experts", "blas", "moekit"}
    text = mod.format_gemm(r)
    assert "| BLAS | moekit GEMM |" in text and "Forward at 16 / 8 experts" in text
