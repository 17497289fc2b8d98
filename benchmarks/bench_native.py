"""The native few-row expert kernel against moekit's torch path, side by side in one process.

For the layer benchmark's two shapes and T tokens, the MoE layer's forward (no grad) runs with the
kernel on and off in turns, each call after the caches were flushed (a 128 MiB buffer read), as in
the layer benchmark where other implementations run in between; and greedy generation of the
end-to-end model (bench_e2e.ARCH) in turns with the kernel on and off. It reports medians and the
median of the paired ratios (torch / native: above 1, the kernel is faster). The kernel's row
threshold (`native.MAX_MEAN_ROWS`) is lifted for the run, so that both paths are timed at every T;
the last column says which one the layer takes by default. This is how the threshold was chosen.

Run:  python benchmarks/bench_native.py [--quick] [--tokens 1,8,64,128,256]
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


def paired_times(fns: dict[bool, Any], rounds: int, flush: torch.Tensor | None) -> dict[str, float]:
    """Median seconds with the kernel on (True) and off (False), in turns, and the median of the
    per-round ratios off / on."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for on, fn in fns.items():
            native.ENABLED = on
            if flush is not None:
                flush.sum()
            start = time.perf_counter()
            fn()
            times[on].append(time.perf_counter() - start)
    return {
        "native_ms": statistics.median(times[True]) * 1e3,
        "torch_ms": statistics.median(times[False]) * 1e3,
        "torch_over_native": statistics.median(b / a for a, b in zip(times[True], times[False])),
    }


def run(quick: bool = False, tokens: tuple[int, ...] = (1, 8, 64, 128, 256)) -> dict[str, Any]:
    was, threshold = native.ENABLED, native.MAX_MEAN_ROWS
    result: dict[str, Any] = {"kernel": native.status(), "layer": [], "generation": None}
    if native.library() is None:
        return result
    rounds = 2 if quick else 15
    flush = None if quick else torch.ones(FLUSH_BYTES // 4)
    try:
        native.MAX_MEAN_ROWS = 1 << 30  # both paths at every T (the default is restored below)
        for shape in QUICK_SHAPES if quick else SHAPES:
            layer = build_moekit(shape).eval()
            for t in tokens:
                x = torch.randn(t, shape.dim, generator=torch.Generator().manual_seed(t))
                with torch.no_grad():
                    call = lambda layer=layer, x=x: layer(x)  # noqa: E731
                    call()
                    row = paired_times({True: call, False: call}, rounds, flush)
                mean_rows = t * shape.top_k / min(shape.experts, t * shape.top_k)
                default = "native" if mean_rows <= threshold else "torch"
                result["layer"].append(
                    dict(shape=shape.name, tokens=t, mean_rows=mean_rows, default=default, **row)
                )
        arch = dict(bench_e2e.ARCH)
        if quick:
            arch.update(layers=2, dim=64, heads=4, kv_heads=2, expert_hidden=128)
        model = bench_e2e.moekit_model(arch)
        new_tokens = 4 if quick else 64
        gen = bench_e2e.generate_fn(model, "moekit", 8 if quick else 32, new_tokens)
        gen()
        row = paired_times({True: gen, False: gen}, 2 if quick else 7, None)
        result["generation"] = dict(
            tokens_per_s_native=new_tokens / row["native_ms"] * 1e3,
            tokens_per_s_torch=new_tokens / row["torch_ms"] * 1e3,
            native_over_torch=row["torch_over_native"],
        )
    finally:
        native.ENABLED, native.MAX_MEAN_ROWS = was, threshold
    return result


def format_result(r: dict[str, Any]) -> str:
    lines = [f"Native few-row kernel: {r['kernel']}", ""]
    if not r["layer"]:
        return "\n".join(lines + ["(not available here: nothing to compare)"])
    lines += [
        "MoE layer forward (no grad, caches flushed between calls), ms, in turns:",
        "",
        "| shape | T | rows per expert | native | torch | torch / native (paired) | default |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in r["layer"]:
        lines.append(
            f"| {c['shape']} | {c['tokens']} | {c['mean_rows']:.3g} | {c['native_ms']:.3g} | "
            f"{c['torch_ms']:.3g} | {c['torch_over_native']:.2f}x | {c['default']} |"
        )
    g = r["generation"]
    lines += [
        "",
        f"Generation (end-to-end model, greedy, in turns): {g['tokens_per_s_native']:.1f} vs "
        f"{g['tokens_per_s_torch']:.1f} tokens/s, {g['native_over_torch']:.2f}x (paired).",
        "",
        f"By default the layer takes the kernel up to {native.MAX_MEAN_ROWS} rows per expert on average "
        "(rows over the experts they could reach).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, two rounds (smoke test)")
    parser.add_argument("--tokens", default="1,8,64,128,256", help="comma-separated T list")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    print(format_result(run(args.quick, tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
