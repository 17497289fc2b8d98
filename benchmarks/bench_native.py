"""The native expert kernels against moekit's torch path, side by side in one process.

For the layer benchmark's two shapes and T tokens, the MoE layer's forward (no grad) runs in turns
with the few-row kernel, the many-row kernel and the torch path, each call after the caches were
flushed (a 128 MiB buffer read), as in the layer benchmark where other implementations run in
between; and greedy generation of the end-to-end model (bench_e2e.ARCH) in turns with the kernels on
and off. It reports medians and the medians of the paired ratios (torch / kernel: above 1, the
kernel is faster). Each regime is forced at every T for the run (`native.MAX_MEAN_ROWS`); the last
column says which path the layer takes by default. This is how the threshold was chosen.

The training part times the layer's forward+backward the same way with the kernels on and off, and
at the default model's sizes the LM head + loss, RMSNorm and rotary (forward+backward) and one AdamW
step (for-loop, foreach, fused).

The gemm part compares moekit's own GEMM (csrc/gemm.c) with the BLAS's sgemm that torch links: the
kernels' product shapes on one thread (warm: operands in cache; cold: an expert's weights read once,
cycling over more copies than the caches hold), and, with `native.use_blas_gemm` in turns, the
layer's forward and forward+backward at 4096 tokens, the forward at 8 and 128 Mixtral-like experts
(the scaling target's ratio), and the default model's training step.

With --baseline REF it instead compares two builds of the kernels: the layer's forward (no grad,
caches flushed) with the library built from REF's sources (a git revision such as HEAD or main~3,
or a folder holding csrc's files) in turns with the working tree's, both shapes, at every T; the
ratio baseline / current above 1 means the working tree is faster. This is how a kernel change is
measured before it is kept.

Run:  python benchmarks/bench_native.py [--quick] [--tokens 1,8,64,128,256,512,4096]
                                        [--part inference|training|gemm|all] [--baseline REF]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


def layer_inputs(
    quick: bool, tokens: tuple[int, ...]
) -> Iterator[tuple[Any, torch.nn.Module, int, torch.Tensor]]:
    """(shape, its MoE layer in eval mode, T, an input [T, D]) for both shapes and every T."""
    for shape in QUICK_SHAPES if quick else SHAPES:
        layer = build_moekit(shape).eval()
        for t in tokens:
            yield shape, layer, t, torch.randn(t, shape.dim, generator=torch.Generator().manual_seed(t))


def _rounds_and_flush(quick: bool) -> tuple[int, torch.Tensor | None]:
    """Rounds per cell, and the buffer whose read flushes the caches before each call (none quick)."""
    return (2, None) if quick else (15, torch.ones(FLUSH_BYTES // 4))


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
    rounds, flush = _rounds_and_flush(quick)
    try:
        for shape, layer, t, x in layer_inputs(quick, tokens):
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


def on_off_times(fn: Any, rounds: int, flush: torch.Tensor | None) -> dict[str, float]:
    """`fn` with the native kernels on and off (native.ENABLED), in turns -> medians in ms and the
    median of the per-round ratios off / on."""
    was = native.ENABLED
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for on in (True, False):  # warm-up, both
            native.ENABLED = on
            fn()
        for _ in range(rounds):
            for on in (True, False):
                native.ENABLED = on
                if flush is not None:
                    flush.sum()
                start = time.perf_counter()
                fn()
                times[on].append(time.perf_counter() - start)
    finally:
        native.ENABLED = was
    return {
        "native_ms": statistics.median(times[True]) * 1e3,
        "torch_ms": statistics.median(times[False]) * 1e3,
        "torch_over_native": statistics.median(b / a for a, b in zip(times[True], times[False])),
    }


def run_training(quick: bool = False, tokens: tuple[int, ...] = (1, 8, 64, 256, 512, 4096)) -> dict[str, Any]:
    """Training-side kernels against the torch path, in turns: the MoE layer's forward+backward at T
    tokens on both shapes (caches flushed), then at the default model's sizes (8 x 256 tokens, dim
    256, vocabulary 4096, bench_e2e.ARCH): the LM head + loss, its 9 RMSNorms, rotary on q and k of
    its 4 layers (each forward+backward), and one AdamW step of the whole model for loop, foreach and
    fused."""
    from moekit.model.cross_entropy import linear_cross_entropy
    from moekit.model.layers import RMSNorm, Rotary, apply_rope

    result: dict[str, Any] = {"kernel": native.status(), "layer": [], "ops": [], "adamw": None}
    if native.library() is None:
        return result
    rounds = 2 if quick else 11
    flush = None if quick else torch.ones(FLUSH_BYTES // 4)
    for shape in QUICK_SHAPES if quick else SHAPES:
        layer = build_moekit(shape).train()
        for t in tokens:
            x = torch.randn(t, shape.dim, generator=torch.Generator().manual_seed(t), requires_grad=True)

            def step(layer=layer, x=x) -> None:
                out = layer(x).output
                out.backward(torch.ones_like(out))
                layer.zero_grad(set_to_none=True)
                x.grad = None

            row = on_off_times(step, rounds if t < 4096 else max(2, rounds // 2), flush)
            result["layer"].append(dict(shape=shape.name, tokens=t, **row))
    arch = dict(bench_e2e.ARCH)
    rows, dim, vocab, heads, kv_heads, layers = (
        (64, 64, 512, 4, 2, 2) if quick else (2048, 256, 4096, 8, 4, 4)
    )
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, dim, generator=gen, requires_grad=True)
    w = (0.05 * torch.randn(vocab, dim, generator=gen)).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=gen)

    def head_and_loss() -> None:
        linear_cross_entropy(h, w, None, targets).backward()
        h.grad = w.grad = None

    norm = RMSNorm(dim)
    x_norm = torch.randn(rows, dim, generator=gen, requires_grad=True)
    g_norm = torch.randn(rows, dim, generator=gen)

    def norms() -> None:
        for _ in range(2 * layers + 1):
            norm(x_norm).backward(g_norm)
        x_norm.grad = norm.weight.grad = None

    head_dim, seq = dim // heads, 256 if not quick else 32
    batch = rows // seq
    cos, sin = Rotary(head_dim, seq, 10000.0)(torch.arange(seq))
    q_base = torch.randn(batch, seq, heads, head_dim, generator=gen)
    k_base = torch.randn(batch, seq, kv_heads, head_dim, generator=gen)

    def rotary() -> None:
        for _ in range(layers):
            q = q_base.transpose(1, 2).requires_grad_(True)  # the heads' strided view
            k = k_base.transpose(1, 2).requires_grad_(True)
            torch.autograd.backward(
                [apply_rope(q, cos, sin), apply_rope(k, cos, sin)],
                [torch.ones(batch, heads, seq, head_dim), torch.ones(batch, kv_heads, seq, head_dim)],
            )

    for name, fn in (
        (f"LM head + loss, {rows} x {dim} x {vocab}", head_and_loss),
        (f"{2 * layers + 1} RMSNorms, [{rows}, {dim}]", norms),
        (f"rotary on q and k of {layers} layers", rotary),
    ):
        result["ops"].append(dict(name=name, **on_off_times(fn, rounds * 2, None)))
    if quick:
        arch.update(layers=2, dim=64, heads=4, kv_heads=2, expert_hidden=128)
    model = bench_e2e.moekit_model(arch)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    optimizers = {
        impl: torch.optim.AdamW(
            model.parameters(), lr=1e-4, **{impl: True} if impl != "loop" else {"foreach": False}
        )
        for impl in ("loop", "foreach", "fused")
    }
    times: dict[str, list[float]] = {impl: [] for impl in optimizers}
    for i in range(rounds + 1):
        for impl, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            if i:
                times[impl].append(time.perf_counter() - start)
    result["adamw"] = {impl: statistics.median(t) * 1e3 for impl, t in times.items()}
    return result


# (ta, tb, m, n, k) of the kernels' products: the Mixtral-like experts' two forward products at an
# expert's 64 rows (128 experts) and 799 (a many-row block at 8 experts), their backward's four at 64
# rows, the default model's experts (dim 256, hidden 512, 512 rows), its LM head + loss (2048-row
# chunks of 128, vocabulary 4096) and an attention block's scores (64 rows, 256 keys, head dim 32:
# the kernels leave that one to the BLAS)
GEMM_SHAPES = (
    (0, 0, 64, 2816, 512),
    (0, 0, 64, 512, 1408),
    (0, 0, 799, 2816, 512),
    (0, 0, 799, 512, 1408),
    (0, 1, 64, 1408, 512),
    (1, 0, 1408, 512, 64),
    (1, 0, 512, 2816, 64),
    (0, 1, 64, 512, 2816),
    (0, 0, 512, 1024, 256),
    (0, 0, 512, 256, 512),
    (0, 1, 128, 4096, 256),
    (0, 0, 128, 256, 4096),
    (1, 0, 4096, 256, 128),
    (0, 1, 64, 256, 32),
)
QUICK_GEMM_SHAPES = ((0, 0, 24, 96, 40), (1, 1, 30, 64, 17))


def _operands(ta: int, tb: int, m: int, n: int, k: int, copies: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(m + n + k)
    a = torch.randn(k, m, generator=gen) if ta else torch.randn(m, k, generator=gen)
    b = torch.randn(copies, *((n, k) if tb else (k, n)), generator=gen)
    return a, b, torch.empty(m, n)


def _best_product_seconds(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, ta: bool, tb: bool, reps: int, copies: int, rounds: int
) -> dict[str, float]:
    """Best seconds per product of torch.mm (the BLAS) and native.gemm, in turns: `reps` times over
    the first `copies` of b's leading dim."""
    op_a = a.T if ta else a
    fns = {
        "blas": lambda i: torch.mm(op_a, b[i].T if tb else b[i], out=c),
        "moekit": lambda i: native.gemm(a, b[i], c, ta=ta, tb=tb),
    }
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _rep in range(reps):
                for i in range(copies):
                    fn(i)
            best[name] = min(best[name], (time.perf_counter() - start) / (reps * copies))
    return best


def run_gemm(quick: bool = False) -> dict[str, Any]:
    """moekit's GEMM against the BLAS's: products on one thread (GFLOP/s), then whole workloads with
    the kernels' products by one or the other in turns (ms)."""
    result: dict[str, Any] = {"kernel": native.status(), "products": [], "workloads": []}
    if native.library() is None or native.blas_sgemm() is None:
        return result
    threads = torch.get_num_threads()
    rounds = 2 if quick else 7
    torch.set_num_threads(1)
    try:
        for ta, tb, m, n, k in QUICK_GEMM_SHAPES if quick else GEMM_SHAPES:
            # cold: B (the weight) read once per product, from more copies than L3 holds
            copies = 1 if quick else max(1, (64 << 20) // (4 * n * k))
            a, b, c = _operands(ta, tb, m, n, k, copies)
            row: dict[str, Any] = dict(ta=ta, tb=tb, m=m, n=n, k=k)
            for temp, count in (("warm", 1), ("cold", copies)):
                reps = max(1, int(4e8 // (2 * m * n * k))) if temp == "warm" else 1
                best = _best_product_seconds(a, b, c, bool(ta), bool(tb), reps, count, rounds)
                for name, seconds in best.items():
                    row[f"{temp}_{name}_gflops"] = 2 * m * n * k / seconds / 1e9
            result["products"].append(row)
    finally:
        torch.set_num_threads(threads)
    shapes = {s.name: s for s in (QUICK_SHAPES if quick else SHAPES)}
    t = 16 if quick else 4096
    workloads: list[tuple[str, Any]] = []
    for shape in shapes.values():
        layer = build_moekit(shape).eval()
        x = torch.randn(t, shape.dim, generator=torch.Generator().manual_seed(t))
        x_req = x.clone().requires_grad_(True)

        def forward(layer=layer, x=x) -> None:
            with torch.no_grad():
                layer(x)

        def forward_backward(layer=layer, x=x_req) -> None:
            layer(x).output.sum().backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None

        workloads += [
            (f"{shape.name} forward, T={t}", forward),
            (f"{shape.name} forward+backward", forward_backward),
        ]
    base = next(iter(shapes.values()))
    counts = (8, 16) if quick else (8, 128)
    for experts in counts:
        layer = build_moekit(type(base)(f"e{experts}", base.dim, base.hidden, experts, base.top_k)).eval()
        x = torch.randn(t, base.dim, generator=torch.Generator().manual_seed(1))

        def scaled(layer=layer, x=x) -> None:
            with torch.no_grad():
                layer(x)

        workloads.append((f"{base.name}-sized experts, {experts} of them, forward", scaled))
    arch = dict(bench_e2e.ARCH)
    if quick:
        arch.update(layers=2, dim=64, heads=4, kv_heads=2, expert_hidden=128)
    model = bench_e2e.moekit_model(arch)
    batch, seq = (2, 32) if quick else (8, 256)
    workloads.append(
        (
            f"default model's training step ({batch} x {seq})",
            bench_e2e.train_step_fn(model, "moekit", batch, seq),
        )
    )
    was = native.BLAS_GEMM
    try:
        for name, fn in workloads:
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(1 + rounds):  # a warm-up round first
                for blas in (True, False):
                    native.use_blas_gemm(blas)
                    start = time.perf_counter()
                    fn()
                    if i:
                        times[blas].append(time.perf_counter() - start)
            result["workloads"].append(
                dict(
                    name=name,
                    blas_ms=statistics.median(times[True]) * 1e3,
                    moekit_ms=statistics.median(times[False]) * 1e3,
                    blas_over_moekit=statistics.median(b / m for b, m in zip(times[True], times[False])),
                )
            )
    finally:
        native.use_blas_gemm(was)
    scaling = [w for w in result["workloads"] if "experts," in w["name"]]
    if len(scaling) == 2:
        result["scaling"] = {
            "experts": counts,
            **{gemm: scaling[1][f"{gemm}_ms"] / scaling[0][f"{gemm}_ms"] for gemm in ("blas", "moekit")},
        }
    return result


def format_gemm(r: dict[str, Any]) -> str:
    if not r["products"]:
        return "GEMM comparison: the kernels or the BLAS's sgemm are not available here."
    lines = [
        "Products on one thread, GFLOP/s (best of the rounds; cold: the second operand read once per "
        "product from more copies than the caches hold), moekit's GEMM and the BLAS's sgemm in turns:",
        "",
        "| op(A) [m, k] x op(B) [k, n] | warm: BLAS | warm: moekit | cold: BLAS | cold: moekit | moekit / BLAS (cold) |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["products"]:
        name = f"{'A^T' if c['ta'] else 'A'} [{c['m']}, {c['k']}] x {'B^T' if c['tb'] else 'B'} [{c['k']}, {c['n']}]"
        lines.append(
            f"| {name} | {c['warm_blas_gflops']:.1f} | {c['warm_moekit_gflops']:.1f} | {c['cold_blas_gflops']:.1f} | "
            f"{c['cold_moekit_gflops']:.1f} | {c['cold_moekit_gflops'] / c['cold_blas_gflops']:.2f}x |"
        )
    lines += [
        "",
        "Workloads with the kernels' products by the BLAS or by moekit's GEMM, in turns, ms (medians):",
        "",
        "| | BLAS | moekit GEMM | BLAS / moekit (paired) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {w['name']} | {w['blas_ms']:.4g} | {w['moekit_ms']:.4g} | {w['blas_over_moekit']:.2f}x |"
        for w in r["workloads"]
    ]
    if "scaling" in r:
        sc = r["scaling"]
        few, many = sc["experts"]
        lines += [
            "",
            f"Forward at {many} / {few} experts: {sc['blas']:.3f} with the BLAS, {sc['moekit']:.3f} with "
            "moekit's GEMM.",
        ]
    return "\n".join(lines)


def baseline_sources(ref: str) -> list[Path]:
    """The kernels' sources (and headers) of `ref` -- a folder holding csrc's files, or a git
    revision of this repository -- copied into a new temporary folder -> the sources' paths there.
    Files that `ref` does not have (kernels added since) are left out; the experts' kernel is needed."""
    names = [p.name for p in native.SOURCES] + sorted(h.name for h in native.CSRC.glob("*.h"))
    required = native.SOURCES[0].name
    folder = Path(tempfile.mkdtemp(prefix="moekit-baseline-"))
    repo = Path(__file__).resolve().parents[1]
    csrc = native.CSRC.relative_to(repo) if native.CSRC.is_relative_to(repo) else None
    for name in names:
        if Path(ref).is_dir():
            if not (Path(ref) / name).exists() and name != required:
                continue
            text = (Path(ref) / name).read_bytes()
        elif csrc is None:
            raise ValueError(
                f"--baseline {ref!r}: not a folder, and moekit is not installed from this repository"
            )
        else:
            done = subprocess.run(
                ["git", "show", f"{ref}:{(csrc / name).as_posix()}"], cwd=repo, capture_output=True
            )
            if done.returncode != 0:
                if name != required:
                    continue
                raise ValueError(
                    f"--baseline {ref!r}: no {csrc / name} there ({done.stderr.decode().strip()})"
                )
            text = done.stdout
        (folder / name).write_bytes(text)
    return [folder / p.name for p in native.SOURCES if (folder / p.name).exists()]


def run_baseline(
    ref: str, quick: bool = False, tokens: tuple[int, ...] = (1, 8, 64, 128, 256, 512, 4096)
) -> dict[str, Any]:
    """The layer's forward with the kernels built from `ref` and from the working tree, in turns."""
    current = native.library()
    result: dict[str, Any] = {"baseline": ref, "layer": []}
    if current is None:
        return result
    sources = baseline_sources(ref)
    baseline = native._load(native.build(sources, sources[0].parent / "build"))
    libraries = {"baseline": baseline, "current": current}
    rounds, flush = _rounds_and_flush(quick)
    try:
        for shape, layer, t, x in layer_inputs(quick, tokens):
            times: dict[str, list[float]] = {name: [] for name in libraries}
            prepared: dict[str, Any] = dict.fromkeys(libraries)  # each build's prepared call
            with torch.no_grad():
                for i in range(1 + rounds):  # a warm-up round first
                    for name, lib in libraries.items():
                        use_library(lib)  # (the work sizes are asked of the library in use)
                        layer.__dict__["_native_call"] = prepared[name]
                        if flush is not None:
                            flush.sum()
                        start = time.perf_counter()
                        layer(x)
                        if i:
                            times[name].append(time.perf_counter() - start)
                        prepared[name] = layer.__dict__.get("_native_call")
            result["layer"].append(
                dict(
                    shape=shape.name,
                    tokens=t,
                    **{f"{name}_ms": statistics.median(v) * 1e3 for name, v in times.items()},
                    baseline_over_current=statistics.median(
                        b / c for b, c in zip(times["baseline"], times["current"])
                    ),
                )
            )
    finally:
        use_library(current)
    return result


def use_library(lib: Any) -> None:
    native._state["lib"] = lib
    native._kernel_work.cache_clear()


def format_baseline(r: dict[str, Any]) -> str:
    lines = [
        f"MoE layer forward (no grad, caches flushed between calls), kernels built from {r['baseline']} "
        "and from the working tree, in turns, ms:",
        "",
        "| shape | T | baseline | current | baseline / current (paired) |",
        "|---|---|---|---|---|",
    ]
    for c in r["layer"]:
        lines.append(
            f"| {c['shape']} | {c['tokens']} | {c['baseline_ms']:.3g} | {c['current_ms']:.3g} | "
            f"{c['baseline_over_current']:.2f}x |"
        )
    return "\n".join(lines)


def format_training(r: dict[str, Any]) -> str:
    if not r["layer"]:
        return "Training kernels: not available here (nothing to compare)."
    lines = [
        "MoE layer forward+backward (caches flushed), ms, native kernels on / off in turns:",
        "",
        "| shape | T | native | torch | torch / native (paired) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['shape']} | {c['tokens']} | {c['native_ms']:.3g} | {c['torch_ms']:.3g} | {c['torch_over_native']:.2f}x |"
        for c in r["layer"]
    ]
    lines += ["", "At the default model's sizes, forward+backward, ms:", "", "| | native | torch | paired |"]
    lines += ["|---|---|---|---|"]
    lines += [
        f"| {c['name']} | {c['native_ms']:.3g} | {c['torch_ms']:.3g} | {c['torch_over_native']:.2f}x |"
        for c in r["ops"]
    ]
    a = r["adamw"]
    lines += [
        "",
        f"AdamW step of the default model, ms: for-loop {a['loop']:.3g}, foreach {a['foreach']:.3g}, "
        f"fused {a['fused']:.3g} (moekit's trainer and bench_e2e use fused).",
    ]
    return "\n".join(lines)


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
    parser.add_argument(
        "--part", choices=["inference", "training", "gemm", "all"], default="all", help="which comparisons"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="REF",
        help="compare the kernels built from REF (a git revision or a folder of csrc files) with the working tree's",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    if args.baseline is not None:
        print(format_baseline(run_baseline(args.baseline, args.quick, tokens)))
        return 0
    if args.part in ("inference", "all"):
        print(format_result(run(args.quick, tokens)))
    if args.part in ("training", "all"):
        print()
        print(format_training(run_training(args.quick, tokens)))
    if args.part in ("gemm", "all"):
        print()
        print(format_gemm(run_gemm(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
