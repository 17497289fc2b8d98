"""The native expert kernels against moekit's torch path, side by side in one process.

For the layer benchmark's two shapes and T tokens, the MoE layer's forward (no grad) runs in turns
with the few-row kernel, the many-row kernel and the torch path, each call after the caches were
flushed (a 128 MiB buffer read), as in the layer benchmark where other implementations run in
between; and greedy generation of the end-to-end model (bench_e2e.ARCH) in turns with the kernels on
and off. It reports medians and the medians of the paired ratios (torch / kernel: above 1, the
kernel is faster). Each regime is forced at every T for the run (`native.MAX_MEAN_ROWS`); the last
column says which path the layer takes by default. This is how the threshold was chosen.

Run:  python benchmarks/bench_native.py [--quick] [--tokens 1,8,64,128,256,512,4096]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402
from bench_layer import QUICK_SHAPES, SHAPES, build_moekit  # noqa: E402

from moekit.moe import native  # noqa: E402

FLUSH_BYTES = 128 << 20
# path -> (native.ENABLED, native.MAX_MEAN_ROWS) that force it
PATHS = {"few": (True, 1 << 30), "many": (True, 0), "torch": (False, native.MAX_MEAN_ROWS)}


def paired_times(fns: dict[str, Any], rounds: int, flush: torch.Tensor | None) -> dict[str, float]:
    """Median ms of each path (a key of PATHS), in turns, and the medians of the per-round ratios
    torch / path."""
    times: dict[str, list[float]] = {path: [] for path in fns}
    for _ in range(rounds):
        for path, fn in fns.items():
            native.ENABLED, native.MAX_MEAN_ROWS = PATHS[path]
            if flush is not None:
                flush.sum()
            start = time.perf_counter()
            fn()
            times[path].append(time.perf_counter() - start)
    row = {f"{path}_ms": statistics.median(t) * 1e3 for path, t in times.items()}
    for path in fns:
        if path != "torch":
            row[f"torch_over_{path}"] = statistics.median(b / a for a, b in zip(times[path], times["torch"]))
    return row


def default_path(mean_rows: float, threshold: int) -> str:
    if mean_rows <= threshold:
        return "few"
    return "many" if native.MANY_ROWS and native.blas_sgemm() is not None else "torch"


def run(quick: bool = False, tokens: tuple[int, ...] = (1, 8, 64, 128, 256, 512, 4096)) -> dict[str, Any]:
    was, threshold = native.ENABLED, native.MAX_MEAN_ROWS
    result: dict[str, Any] = {"kernel": native.status(), "layer": [], "generation": None}
    if native.library() is None:
        return result
    paths = (
        ["few", "many", "torch"] if native.MANY_ROWS and native.blas_sgemm() is not None else ["few", "torch"]
    )
    rounds = 2 if quick else 15
    flush = None if quick else torch.ones(FLUSH_BYTES // 4)
    try:
        for shape in QUICK_SHAPES if quick else SHAPES:
            layer = build_moekit(shape).eval()
            for t in tokens:
                x = torch.randn(t, shape.dim, generator=torch.Generator().manual_seed(t))
                with torch.no_grad():
                    call = lambda layer=layer, x=x: layer(x)  # noqa: E731
                    call()
                    row = paired_times(dict.fromkeys(paths, call), rounds if t < 4096 else 5, flush)
                mean_rows = t * shape.top_k / min(shape.experts, t * shape.top_k)
                default = default_path(mean_rows, threshold)
                result["layer"].append(
                    dict(shape=shape.name, tokens=t, mean_rows=mean_rows, default=default, **row)
                )
        arch = dict(bench_e2e.ARCH)
        if quick:
            arch.update(layers=2, dim=64, heads=4, kv_heads=2, expert_hidden=128)
        model = bench_e2e.moekit_model(arch)
        new_tokens = 4 if quick else 64
        gen = bench_e2e.generate_fn(model, "moekit", 8 if quick else 32, new_tokens)
        PATHS["default"] = (True, threshold)
        gen()
        row = paired_times({"default": gen, "torch": gen}, 2 if quick else 7, None)
        result["generation"] = dict(
            tokens_per_s_native=new_tokens / row["default_ms"] * 1e3,
            tokens_per_s_torch=new_tokens / row["torch_ms"] * 1e3,
            native_over_torch=row["torch_over_default"],
        )
    finally:
        PATHS.pop("default", None)
        native.ENABLED, native.MAX_MEAN_ROWS = was, threshold
    return result


def format_result(r: dict[str, Any]) -> str:
    lines = [f"Native expert kernels: {r['kernel']}", ""]
    if not r["layer"]:
        return "\n".join(lines + ["(not available here: nothing to compare)"])
    kernels = [p for p in ("few", "many") if f"{p}_ms" in r["layer"][0]]
    lines += [
        "MoE layer forward (no grad, caches flushed between calls), ms, in turns:",
        "",
        "| shape | T | rows per expert | "
        + " | ".join(f"{p}-row kernel" for p in kernels)
        + " | torch | "
        + " | ".join(f"torch / {p} (paired)" for p in kernels)
        + " | default |",
        "|---|---|---|" + "---|" * (2 * len(kernels) + 2),
    ]
    for c in r["layer"]:
        lines.append(
            f"| {c['shape']} | {c['tokens']} | {c['mean_rows']:.3g} | "
            + "".join(f"{c[p + '_ms']:.3g} | " for p in kernels)
            + f"{c['torch_ms']:.3g} | "
            + "".join(f"{c['torch_over_' + p]:.2f}x | " for p in kernels)
            + f"{c['default']} |"
        )
    g = r["generation"]
    lines += [
        "",
        f"Generation (end-to-end model, greedy, in turns): {g['tokens_per_s_native']:.1f} vs "
        f"{g['tokens_per_s_torch']:.1f} tokens/s, {g['native_over_torch']:.2f}x (paired).",
        "",
        f"By default the layer takes the few-row kernel up to {native.MAX_MEAN_ROWS} rows per expert on "
        "average (rows over the experts they could reach), the many-row kernel past that.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, two rounds (smoke test)")
    parser.add_argument("--tokens", default="1,8,64,128,256,512,4096", help="comma-separated T list")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    print(format_result(run(args.quick, tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
