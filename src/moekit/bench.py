"""`moekit bench`: the benchmark suites of benchmarks/, run from the command line.

    moekit bench                    layer suite, full: writes docs/benchmarks.json and docs/benchmarks.md
    moekit bench --quick            smoke run of the whole pipeline (shrunk shapes, one repeat)
    moekit bench --suite e2e        end-to-end training/generation tokens/s against transformers' Mixtral
    moekit bench --suite all        both
    moekit bench --suite gpu        the layer on CUDA in bf16 (float32 router): docs/benchmarks_gpu.{json,md}

The suites live in the repository's benchmarks/ folder (benchmarks/bench_layer.py,
benchmarks/bench_e2e.py, benchmarks/bench_gpu.py) as importable modules with their own `main`; this module finds that
folder next to the source tree and loads them by path, so a wheel install without the
repository says so instead of failing obscurely. A suite whose module is not there is reported
as "not yet built", never faked.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from moekit.data.cache import atomic_write_text

SUITES = ("layer", "e2e", "all", "gpu")


def benchmarks_dir() -> Path:
    """The repository's benchmarks/ folder (src/moekit/bench.py -> ../../benchmarks)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def load_suite(name: str) -> ModuleType | None:
    """benchmarks/bench_<name>.py as a module, or None when the file does not exist."""
    path = benchmarks_dir() / f"bench_{name}.py"
    if not path.is_file():
        return None
    module_name = f"moekit_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(
    suite: str, quick: bool = False, tokens: tuple[int, ...] | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Run the suite(s) -> {"layer": result, "e2e": result}; a missing suite gets a status entry."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: expected one of {list(SUITES)}")
    results: dict[str, Any] = {}
    if suite in ("layer", "all"):
        layer = load_suite("layer")
        if layer is None:
            raise OSError(
                f"benchmarks/bench_layer.py not found under {benchmarks_dir()} (run from a checkout)"
            )
        results["layer"] = layer.run_layer(quick, tokens, threads=threads)
    if suite in ("e2e", "all"):
        e2e = load_suite("e2e")
        results["e2e"] = {"status": "not yet built"} if e2e is None else e2e.run_e2e(quick)
    if suite == "gpu":  # not part of "all": it needs a GPU, and its results go to their own files
        gpu = load_suite("gpu")
        results["gpu"] = (
            {"status": "not yet built"} if gpu is None else gpu.run_gpu(tokens=tokens, quick=quick)
        )
    return results


def format_results(results: dict[str, Any]) -> str:
    parts = []
    if "layer" in results:
        layer = load_suite("layer")
        method = "\n".join(
            line for line in (layer.__doc__ or "").splitlines()[1:] if not line.startswith("Run:")
        ).strip()
        parts.append(f"## MoE layer\n\n{method}\n\n" + layer.format_layer(results["layer"]))
    if "e2e" in results:
        e2e = results["e2e"]
        if e2e.get("status") == "not yet built":
            parts.append("## End to end\n\nnot yet built\n")
        else:
            parts.append("## End to end\n\n" + load_suite("e2e").format_e2e(e2e))
    if "gpu" in results:
        gpu = results["gpu"]
        body = gpu["status"] if gpu.get("status") == "not yet built" else load_suite("gpu").format_gpu(gpu)
        parts.append("## MoE layer on the GPU\n\n" + body)
    return "\n".join(parts)


def _bench(args: argparse.Namespace) -> int:
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else None
    results = run(args.suite, args.quick, tokens, args.threads)
    text = format_results(results)
    print(text)
    if args.suite == "gpu" and "cells" not in results["gpu"]:
        return 0  # nothing was measured (no CUDA): no results file to write
    stem = "docs/benchmarks_gpu" if args.suite == "gpu" else "docs/benchmarks"
    out = args.out if args.out is not None else (None if args.quick else f"{stem}.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=1) + "\n")
        print(f"results: {out}")
    md = args.md if args.md is not None else (None if args.quick else f"{stem}.md")
    if md:
        command = "moekit bench" + (f" --suite {args.suite}" if args.suite != "layer" else "")
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(md, f"# Benchmarks\n\nCommand: `{command}`\n\n{text}" + kept_notes(Path(md)))
        print(f"tables: {md}")
    return 0


NOTES_HEADING = "## Notes"


def kept_notes(md: Path) -> str:
    """The hand-written part of an existing results file (from its NOTES_HEADING line on), which a
    new run keeps below its fresh tables; empty when there is none."""
    if not md.is_file():
        return ""
    text = md.read_text()
    at = text.find("\n" + NOTES_HEADING + "\n")
    return "\n\n" + text[at + 1 :] if at >= 0 else ""  # a blank line after the last table


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `moekit bench`."""
    bench = sub.add_parser("bench", help="benchmark the MoE layer (and end to end) against transformers")
    bench.add_argument("--suite", choices=SUITES, default="layer", help="which benchmarks (default: layer)")
    bench.add_argument(
        "--quick", action="store_true", help="smoke run: shrunk shapes, tiny T list, one repeat"
    )
    bench.add_argument("--tokens", default=None, help="comma-separated T list for the layer suite")
    bench.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    bench.add_argument(
        "--out", default=None, help="JSON path (default docs/benchmarks.json; none with --quick)"
    )
    bench.add_argument(
        "--md", default=None, help="Markdown path (default docs/benchmarks.md; none with --quick)"
    )
    bench.set_defaults(func=_bench)
