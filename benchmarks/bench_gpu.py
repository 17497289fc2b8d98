"""GPU benchmark: moekit's MoE layer in bf16 (float32 router) against transformers' blocks, on CUDA.

The GPU path is the same layer as on the CPU: experts in bf16, the router's math in float32
(its weight is kept in float32 too), grouped matrix products over expert-sorted rows. This script
measures it on the shapes of the CPU benchmark (bench_layer.py: Mixtral-like 512/1408/8/top-2 and
fine-grained 512/256/64/top-8, SwiGLU, dropless) against transformers' `MixtralSparseMoeBlock` /
`Qwen3MoeSparseMoeBlock` with their `eager` and `grouped_mm` experts, all in bf16 with the same
weights:
  - per cell: median ms of a no-grad forward and of a forward+backward (device synchronized around
    each run), moekit's TFLOP/s of active expert FLOPs, speedup over transformers' best, and on
    CUDA the peak memory of forward+backward (torch.cuda.max_memory_allocated above the start);
  - moekit with each grouped-product strategy (`--strategies auto,loop,...`): on CUDA "auto" (and
    "grouped_mm") take the device path (sort, `torch._grouped_mm` over device-side group ends, no
    host sync), "loop" the CPU's host-planned row blocks, so the two designs are compared in one run;
  - the outputs of every implementation against the same layer in float32 (no TF32): the share of
    tokens whose output row is off by more than the dtype's tolerance. moekit's router computes in
    float32, so its share must stay under 1% (a fast wrong path cannot pass unnoticed); transformers'
    routers compute in bf16, and their share shows how often that picks other experts.
  - end to end (bench_e2e.py's models and steps on the device): training tokens/s of moekit's
    default model against transformers' MixtralForCausalLM with float32 weights under bf16 autocast,
    and greedy generation tokens/s at batch 1 (`--no-e2e` skips it).
No GPU, no numbers: without CUDA it says so and exits 0. `--device cpu --dtype float32 --quick` runs
the same code on the CPU in seconds (the test suite's smoke run).

Run:  python benchmarks/bench_gpu.py [--tokens 1,8,64,512,4096,16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import format_e2e, run_e2e  # noqa: E402
from bench_layer import QUICK_SHAPES, SHAPES, Shape, build_hf, build_moekit, forward_fn, versions  # noqa: E402

TOKENS = (1, 8, 64, 512, 4096, 16384)
QUICK_TOKENS = (1, 8)
HF_IMPLS = ("hf_eager", "hf_grouped_mm")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # row's max |diff| / max |ref|
MAX_TOKENS_OFF = 0.01  # moekit's share of tokens off the float32 layer (near-ties at the k-th expert)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def exact_float32():
    """float32 products without TF32 (the reference must be float32 all through)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated device memory while fn runs, above the level before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def build(shape: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """moekit (experts in dtype, router in float32), transformers' blocks with the same weights, and
    the float32 layer ("reference") that every output is checked against."""
    moekit = build_moekit(shape)
    modules = {impl: build_hf(shape, impl, moekit).to(device, dtype) for impl in HF_IMPLS}
    modules["reference"] = copy.deepcopy(moekit).to(device, dtype).to(device, torch.float32)
    moekit.to(device, dtype)
    moekit.router.float()  # the router's selective precision: float32 weight and math
    modules["moekit"] = moekit
    return modules


def time_modes(
    impl: str,
    module: torch.nn.Module,
    x_TD: torch.Tensor,
    grad_TD: torch.Tensor,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[str, tuple[float, float | None]]:
    """{"fwd": (ms, None), "fwd_bwd": (ms, peak MiB)} of one implementation."""
    forward = forward_fn(impl, module, x_TD)
    x_req = x_TD.clone().requires_grad_(True)
    train = forward_fn(impl, module, x_req)

    def fwd() -> None:
        with torch.no_grad():
            forward()

    def fwd_bwd() -> None:
        x_req.grad = None
        for p in module.parameters():
            p.grad = None
        train().backward(grad_TD)

    return {
        "fwd": (median_ms(fwd, device, warmup, repeats), None),
        "fwd_bwd": (median_ms(fwd_bwd, device, warmup, repeats), peak_mib(fwd_bwd, device)),
    }


def bench_cell(
    modules: dict[str, torch.nn.Module],
    shape: Shape,
    tokens: int,
    strategies: list[str],
    device: torch.device,
    dtype: torch.dtype,
    quick: bool,
) -> list[dict[str, Any]]:
    warmup, repeats = (1, 2) if quick else (5, 20 if tokens <= 512 else 10)
    torch.manual_seed(tokens)
    x_TD = torch.randn(tokens, shape.dim, device=device, dtype=dtype)
    grad_TD = torch.randn_like(x_TD)
    moekit = modules["moekit"]
    with torch.no_grad(), exact_float32():
        reference = forward_fn("moekit", modules["reference"], x_TD.float())()
    scale = reference.abs().max().clamp_min(1e-6)
    runs = [(f"moekit[{s}]", "moekit", s) for s in strategies] + [(i, i, None) for i in HF_IMPLS]
    cells = []
    for name, impl, strategy in runs:
        module = modules[impl]
        if strategy is not None:
            moekit.experts.strategy = strategy
        forward = forward_fn(impl, module, x_TD)
        with torch.no_grad():  # tokens whose output row is off by more than the dtype's tolerance
            diff_T = (forward().float() - reference).abs().amax(dim=-1) / scale
            off = float((diff_T > TOLERANCE[dtype]).float().mean())
        for mode, (ms, peak) in time_modes(impl, module, x_TD, grad_TD, device, warmup, repeats).items():
            cell = {
                "shape": shape.name,
                "tokens": tokens,
                "impl": name,
                "mode": mode,
                "ms": ms,
                "tflops": (3 if mode == "fwd_bwd" else 1) * shape.active_flops(tokens) / (ms * 1e-3) / 1e12,
                "tokens_off": off,  # share of tokens off the float32 layer's output
            }
            if mode == "fwd_bwd":
                cell["peak_mib"] = peak
            cells.append(cell)
    moekit.experts.strategy = "auto"
    return cells


def run_gpu(
    device: str = "cuda",
    dtype: str = "bfloat16",
    tokens: tuple[int, ...] | None = None,
    strategies: tuple[str, ...] = ("auto", "loop"),
    quick: bool = False,
    e2e: bool = True,
) -> dict[str, Any]:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return {"status": "no CUDA device: nothing measured"}
    torch_dtype = DTYPES[dtype]
    shapes = QUICK_SHAPES if quick else SHAPES
    tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
    cells = []
    for shape in shapes:
        modules = build(shape, dev, torch_dtype)
        for t in tokens:
            cells += bench_cell(modules, shape, t, list(strategies), dev, torch_dtype, quick)
        del modules
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"device": name, "dtype": dtype, "versions": versions(), "cells": cells}
    if e2e:
        result["e2e"] = run_e2e(quick=quick, rounds=2 if quick else 10, device=device)
    return result


def format_gpu(r: dict[str, Any]) -> str:
    if "cells" not in r:
        return r["status"] + "\n"
    v = r["versions"]
    lines = [
        f"Device: {r['device']}, {r['dtype']} experts, float32 router. Versions: torch {v['torch']}, "
        f"transformers {v['transformers']}, moekit {v['moekit']}.",
        "",
    ]
    impls = list(dict.fromkeys(c["impl"] for c in r["cells"]))
    ours = [i for i in impls if i.startswith("moekit")]
    for shape in dict.fromkeys(c["shape"] for c in r["cells"]):
        for mode in ("fwd", "fwd_bwd"):
            lines += [
                f"{shape}, {mode}: ms (median)",
                "",
                "| T | "
                + " | ".join(impls)
                + " | best moekit TFLOP/s | speedup vs HF best | tokens off f32: moekit | HF |",
                "|---|" + "---|" * (len(impls) + 4),
            ]
            for t in dict.fromkeys(c["tokens"] for c in r["cells"] if c["shape"] == shape):
                row = {
                    c["impl"]: c
                    for c in r["cells"]
                    if (c["shape"], c["tokens"], c["mode"]) == (shape, t, mode)
                }
                best_ours = min((row[i] for i in ours), key=lambda c: c["ms"])
                best_hf = min(row[i]["ms"] for i in HF_IMPLS)
                ours_off = max(row[i]["tokens_off"] for i in ours)
                hf_off = max(row[i]["tokens_off"] for i in HF_IMPLS)
                lines.append(
                    f"| {t} | "
                    + " | ".join(f"{row[i]['ms']:.3g}" for i in impls)
                    + f" | {best_ours['tflops']:.1f} | {best_hf / best_ours['ms']:.2f}x | {ours_off:.1%}"
                    + f"{'' if ours_off <= MAX_TOKENS_OFF else ' (TOO MANY)'} | {hf_off:.1%} |"
                )
            lines.append("")
    if "e2e" in r:
        lines += [format_e2e(r["e2e"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu for a smoke run")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="expert dtype")
    parser.add_argument("--tokens", default=None, help="comma-separated T list (default 1,...,16384)")
    parser.add_argument("--strategies", default="auto,loop", help="moekit grouped-product strategies")
    parser.add_argument("--quick", action="store_true", help="shrunk shapes, T 1 and 8, 2 repeats")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training/generation run")
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else None
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    result = run_gpu(args.device, args.dtype, tokens, strategies, args.quick, not args.no_e2e)
    print(format_gpu(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
