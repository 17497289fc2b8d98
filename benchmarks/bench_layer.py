"""Layer benchmark: moekit's MoE layer against transformers' sparse MoE blocks, CPU float32.

Measured in one process, medians of repeated runs after warm-up, the implementations of a cell
interleaved run by run so that a noisy neighbour on a shared machine slows all of them alike:
  - one MoE layer, forward (no grad) and forward+backward, for T tokens, on two shapes: Mixtral-like
    (dim 512, expert hidden 1408, 8 experts, top-2) and fine-grained (dim 512, expert hidden 256,
    64 experts, top-8); SwiGLU, dropless;
  - transformers 5.23's `MixtralSparseMoeBlock` / `Qwen3MoeSparseMoeBlock` built from tiny configs,
    each with `experts_implementation="eager"` and `"grouped_mm"` (a config kwarg; the
    `@use_experts_implementation` decorator in transformers/integrations/moe.py dispatches on
    `config._experts_implementation`). They get moekit's weights, so every implementation routes
    identically and the outputs are compared; and a GShard-style one-hot einsum layer at capacity
    factor 1.25 (below; it drops tokens, so its output differs by design);
  - the machine's ceilings in the same run: square sgemm GFLOP/s, and the read bandwidth of a
    buffer far larger than the caches;
  - per cell: ms, GFLOP/s of active expert FLOPs (6 T k D F forward, 3x that forward+backward),
    fraction of the sgemm ceiling, for T <= 8 the memory floor (bytes of the distinct experts'
    weights the routing touches / read bandwidth), and the peak memory of forward+backward;
  - scaling: moekit's forward at T=4096 as experts grow 8 -> 32 -> 128 (Mixtral-like, top-2).

Peak memory is the largest total of live torch CPU tensors allocated during one forward+backward
above what was live before it, from torch.profiler's allocation events (profile_memory=True). It
is exact for tensor memory and immune to the allocator's caching (RSS is not: glibc keeps freed
heap pages, and a high-water mark in one process mixes cells); it leaves out the BLAS library's
private scratch, the same for every implementation. Gradients of the weights count: every
implementation allocates them.

Run:  python -m moekit bench [--quick] [--suite layer|e2e|all]   or   python benchmarks/bench_layer.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TOKENS = (1, 8, 64, 512, 4096)
QUICK_TOKENS = (1, 8)
SCALING_EXPERTS = (8, 32, 128)
CAPACITY_FACTOR_GSHARD = 1.25
IMPLS = ("moekit", "hf_eager", "hf_grouped_mm", "gshard_einsum")
HF_IMPLS = ("hf_eager", "hf_grouped_mm")
MIN_REPEATS, BUDGET_S = 3, 10.0  # an implementation stops after MIN_REPEATS timed runs once past BUDGET_S


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    hidden: int
    experts: int
    top_k: int

    def active_flops(self, tokens: int) -> float:
        """Forward FLOPs of the routed experts: T * k tokens through gate, up and down (2 per MAC)."""
        return 6.0 * tokens * self.top_k * self.dim * self.hidden

    def expert_bytes(self) -> int:
        return 3 * self.dim * self.hidden * 4  # gate, up, down in float32

    def floor_seconds(self, distinct_experts: int, read_gbs: float) -> float:
        """The memory floor: the distinct experts' weights read once at `read_gbs` GB/s."""
        return distinct_experts * self.expert_bytes() / (read_gbs * 1e9)


SHAPES = (Shape("mixtral", 512, 1408, 8, 2), Shape("fine_grained", 512, 256, 64, 8))
# --quick is a smoke test of the whole pipeline (< 60 s even on a busy 2-core machine): the same
# code on shapes shrunk 4x, so its numbers say nothing about the real shapes.
QUICK_SHAPES = (Shape("mixtral", 128, 352, 8, 2), Shape("fine_grained", 128, 64, 64, 8))


# ---------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": [round(v, 2) for v in load],
    }


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def cpu_used_by_others(start: tuple[float, float] | None, wall_s: float) -> float | None:
    """Cores' worth of CPU that other processes used since `start` (0 on a quiet machine).

    The load average cannot say this: this process's own threads raise it."""
    end = cpu_seconds()
    if start is None or end is None or wall_s <= 0:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / wall_s)


def versions() -> dict[str, str]:
    import transformers

    import moekit
    from moekit.moe import native

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "moekit": getattr(moekit, "__version__", "unknown"),
        "native_kernel": native.status(),
    }


def _median_seconds(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sgemm_ceiling(sizes: tuple[int, ...] = (2048, 4096), repeats: int = 5) -> dict[str, float]:
    """Best median GFLOP/s of square float32 matmuls (into a preallocated output)."""
    best = {"gflops": 0.0, "n": 0}
    for n in sizes:
        a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        seconds = _median_seconds(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), 1, repeats)
        gflops = 2 * n**3 / seconds / 1e9
        if gflops > best["gflops"]:
            best = {"gflops": gflops, "n": n}
    return best


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """GB/s of a full read (a sum) of a float32 buffer far larger than the caches (STREAM's rule)."""
    buf = torch.ones(nbytes // 4)
    seconds = _median_seconds(buf.sum, 1, repeats)
    return {"gbs": nbytes / seconds / 1e9, "bytes": nbytes}


class Probes:
    """The machine's ceilings measured in phase with a cell: a square sgemm and a read of a buffer
    far larger than the caches, each run once per round, in turns with the implementations. On a
    shared host the machine's speed drifts by 2x within minutes (square sgemm 97-178 GFLOP/s on
    one day): a fraction of a ceiling measured at another time says as much about the drift as
    about the code. In turns, the probe and the cell see the same machine."""

    def __init__(self, quick: bool):
        n = 256 if quick else 2048
        self.n = n
        self.a, self.b, self.out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        self.buf = torch.ones((16 << 20 if quick else 256 << 20) // 4)

    def sgemm(self) -> None:
        torch.mm(self.a, self.b, out=self.out)

    def read(self) -> None:
        self.buf.sum()

    def sgemm_gflops(self, seconds: float) -> float:
        return 2 * self.n**3 / seconds / 1e9

    def read_gbs(self, seconds: float) -> float:
        return self.buf.numel() * 4 / seconds / 1e9


# ---------------------------------------------------------------------------- implementations
def build_moekit(shape: Shape, seed: int = 0) -> nn.Module:
    from moekit.moe import MoE, MoEConfig

    torch.manual_seed(seed)
    return MoE(
        MoEConfig(dim=shape.dim, hidden_dim=shape.hidden, num_experts=shape.experts, top_k=shape.top_k)
    )


def build_hf(shape: Shape, impl: str, source: nn.Module) -> nn.Module:
    """transformers' block for the shape with `source`'s (a moekit MoE) weights copied in."""
    experts_implementation = impl.removeprefix("hf_")
    if shape.name == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(
            hidden_size=shape.dim, intermediate_size=shape.hidden, num_local_experts=shape.experts,
            num_experts_per_tok=shape.top_k, experts_implementation=experts_implementation,
        )  # fmt: skip
        block = MixtralSparseMoeBlock(cfg)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(
            hidden_size=shape.dim, moe_intermediate_size=shape.hidden, num_experts=shape.experts,
            num_experts_per_tok=shape.top_k, norm_topk_prob=True, experts_implementation=experts_implementation,
        )  # fmt: skip
        block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(source.router.gate.weight)
        # moekit w_in [E, D, 2F] (gate | up columns), w_out [E, F, D]; HF stores the transposes.
        block.experts.gate_up_proj.copy_(source.experts.w_in_EDF.transpose(1, 2))
        block.experts.down_proj.copy_(source.experts.w_out_EFD.transpose(1, 2))
    return block


class GShardEinsum(nn.Module):
    """GShard-style MoE: one-hot `[T, E, C]` dispatch/combine tensors and einsums, fixed capacity.

    Same router and experts (shared parameters) as the moekit layer it wraps; assignments past
    C = ceil(cf * k * T / E) slots of an expert, in rank-major position order, are dropped.
    """

    def __init__(self, source: nn.Module, capacity_factor: float = CAPACITY_FACTOR_GSHARD):
        super().__init__()
        self.gate_weight = source.router.gate.weight  # [E, D]
        self.w_in_EDH = source.experts.w_in_EDF  # [E, D, 2F]
        self.w_out_EFD = source.experts.w_out_EFD  # [E, F, D]
        self.top_k = source.config.top_k
        self.capacity_factor = capacity_factor

    def forward(self, x_TD: Tensor) -> Tensor:
        num_tokens, num_experts, k = x_TD.shape[0], self.gate_weight.shape[0], self.top_k
        capacity = max(1, math.ceil(self.capacity_factor * k * num_tokens / num_experts))
        probs_TE = F.linear(x_TD, self.gate_weight).softmax(dim=-1)
        w_TK, idx_TK = probs_TE.topk(k, dim=-1)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        onehot_KTE = F.one_hot(idx_TK.t(), num_experts)  # rank-major priority: all first choices first
        pos_KTE = onehot_KTE.reshape(k * num_tokens, num_experts).cumsum(0).view_as(onehot_KTE) - 1
        pos_TK = (pos_KTE * onehot_KTE).sum(-1).t()  # slot of every assignment in its expert
        keep_TK = pos_TK < capacity
        slot_TK = idx_TK * capacity + pos_TK.clamp(max=capacity - 1)
        combine_TEC = torch.zeros(num_tokens, num_experts * capacity, dtype=x_TD.dtype)
        combine_TEC = combine_TEC.scatter_add(1, slot_TK, w_TK * keep_TK)
        combine_TEC = combine_TEC.view(num_tokens, num_experts, capacity)
        dispatch_TEC = (combine_TEC > 0).to(x_TD.dtype).detach()
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        h_ECH = torch.bmm(x_ECD, self.w_in_EDH)
        gate, up = h_ECH.chunk(2, dim=-1)
        y_ECD = torch.bmm(F.silu(gate) * up, self.w_out_EFD)
        return torch.einsum("tec,ecd->td", combine_TEC, y_ECD)


def forward_fn(impl: str, module: nn.Module, x_TD: Tensor) -> Callable[[], Tensor]:
    """A callable returning the layer output [T, D] for input x (with autograd if enabled)."""
    if impl == "moekit":
        return lambda: module(x_TD).output
    if impl in HF_IMPLS:
        x_1TD = x_TD.view(1, *x_TD.shape)
        return lambda: module(x_1TD).view(x_TD.shape)
    return lambda: module(x_TD)


def _zero_grads(modules: list[nn.Module], x: Tensor) -> None:
    """Fresh gradients for every run: accumulating into existing .grad would add a pass."""
    x.grad = None
    for m in modules:
        for p in m.parameters():
            p.grad = None


def _run_fn(
    mode: str, impl: str, module: nn.Module, x_TD: Tensor, x_req: Tensor, grad_TD: Tensor
) -> Callable[[], None]:
    """One timed run: a forward (run with autograd off: `bench_shape` times the forward cells inside
    one no_grad block, as a decode loop runs, not a no_grad block per call), or a forward+backward
    from the fixed output gradient."""
    if mode == "fwd":
        return forward_fn(impl, module, x_TD)
    run = forward_fn(impl, module, x_req)
    return lambda: run().backward(grad_TD)


def peak_memory_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live torch CPU tensor bytes allocated while fn runs, above the level before it.

    moekit's scratch workspace and kept gradient memory (moe/memory.py) are freed first, so that
    the run allocates them again and they count: it is memory the layer holds."""
    from torch.profiler import ProfilerActivity, profile

    from moekit.moe.memory import release_gradient_buffers, release_scratch

    release_scratch()
    release_gradient_buffers()

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------- layer cells
def _repeats(tokens: int, quick: bool) -> tuple[int, int]:
    """(warm-up runs, timed runs) by size: small cells are cheap and noisy, so run them more."""
    if quick:
        return 1, 1
    if tokens <= 8:
        return 3, 30
    if tokens <= 64:
        return 2, 15
    if tokens <= 512:
        return 2, 9
    return 1, 7  # (5 left medians of the slowest cells at the mercy of one or two slow runs)


def bench_shape(
    shape: Shape, tokens_list: tuple[int, ...], ceilings: dict[str, Any], quick: bool, memory: bool = True
) -> list[dict[str, Any]]:
    """Every (T, implementation, mode) cell of one shape."""
    moe = build_moekit(shape)
    modules = {"moekit": moe, **{impl: build_hf(shape, impl, moe) for impl in HF_IMPLS}}
    modules["gshard_einsum"] = GShardEinsum(moe)
    sgemm, bandwidth = ceilings["sgemm"]["gflops"], ceilings["read_bandwidth"]["gbs"]
    probes = Probes(quick)
    cells = []
    for tokens in tokens_list:
        torch.manual_seed(1000 + tokens)
        x_TD = torch.randn(tokens, shape.dim)
        grad_TD = torch.randn(tokens, shape.dim)
        x_req = x_TD.clone().requires_grad_(True)
        with torch.no_grad():
            reference = forward_fn("moekit", moe, x_TD)()
            distinct = int(moe.router(x_TD).expert_idx_A.unique().numel())
            diffs = {
                impl: float((forward_fn(impl, modules[impl], x_TD)() - reference).abs().max())
                for impl in HF_IMPLS
            }
        floor_s = shape.floor_seconds(distinct, bandwidth)
        warmup, repeats = _repeats(tokens, quick)

        for mode in ("fwd", "fwd_bwd"):
            fns = {impl: _run_fn(mode, impl, modules[impl], x_TD, x_req, grad_TD) for impl in IMPLS}
            fns["probe_sgemm"] = probes.sgemm
            if mode == "fwd" and tokens <= 8:
                fns["probe_read"] = probes.read
            times: dict[str, list[float]] = {name: [] for name in fns}
            # the forward cells with autograd off for the whole loop (the probes need none)
            with torch.set_grad_enabled(mode != "fwd"):
                for i in range(warmup + repeats):
                    for impl, fn in fns.items():
                        if len(times[impl]) >= MIN_REPEATS and sum(times[impl]) > BUDGET_S:
                            continue  # a very slow baseline: enough runs for a median
                        _zero_grads(list(modules.values()), x_req)
                        start = time.perf_counter()
                        fn()
                        elapsed = time.perf_counter() - start
                        if i >= warmup:
                            times[impl].append(elapsed)
            sgemm_in_phase = probes.sgemm_gflops(statistics.median(times["probe_sgemm"]))
            for impl in IMPLS:
                seconds = statistics.median(times[impl])
                flops = shape.active_flops(tokens) * (3 if mode == "fwd_bwd" else 1)
                cell: dict[str, Any] = {
                    "shape": shape.name,
                    "tokens": tokens,
                    "impl": impl,
                    "mode": mode,
                    "ms": seconds * 1e3,
                    "ms_min": min(times[impl]) * 1e3,
                    "repeats": len(times[impl]),
                    "gflops": flops / seconds / 1e9,
                    "frac_sgemm": flops / seconds / 1e9 / sgemm,
                    "sgemm_in_phase_gflops": sgemm_in_phase,
                    "frac_sgemm_in_phase": flops / seconds / 1e9 / sgemm_in_phase,
                }
                if mode == "fwd" and tokens <= 8:
                    cell.update(distinct_experts=distinct, floor_ms=floor_s * 1e3, x_floor=seconds / floor_s)
                    read_in_phase = probes.read_gbs(statistics.median(times["probe_read"]))
                    floor_in_phase_s = shape.floor_seconds(distinct, read_in_phase)
                    cell.update(read_in_phase_gbs=read_in_phase, x_floor_in_phase=seconds / floor_in_phase_s)
                if mode == "fwd" and impl in diffs:
                    cell["max_abs_diff_vs_moekit"] = diffs[impl]
                if mode == "fwd_bwd" and memory:
                    _zero_grads(list(modules.values()), x_req)
                    cell["peak_mb"] = peak_memory_bytes(fns[impl]) / 2**20
                cells.append(cell)
        _zero_grads(list(modules.values()), x_req)
    return cells


def bench_scaling(
    base: Shape, experts_list: tuple[int, ...], tokens: int, quick: bool
) -> list[dict[str, Any]]:
    """moekit forward time at fixed T, top-k and expert size as the number of experts grows."""
    models = {
        e: build_moekit(Shape(f"mixtral_e{e}", base.dim, base.hidden, e, base.top_k)).eval()
        for e in experts_list
    }
    torch.manual_seed(7)
    x_TD = torch.randn(tokens, base.dim)
    warmup, repeats = (1, 1) if quick else (1, 7)
    times: dict[int, list[float]] = {e: [] for e in experts_list}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for e, model in models.items():
                start = time.perf_counter()
                model(x_TD)
                if i >= warmup:
                    times[e].append(time.perf_counter() - start)
    first = statistics.median(times[experts_list[0]])
    rows = []
    for e in experts_list:
        seconds = statistics.median(times[e])
        rows.append(
            {
                "experts": e,
                "tokens": tokens,
                "ms": seconds * 1e3,
                "gflops": base.active_flops(tokens) / seconds / 1e9,
                "relative_to_first": seconds / first,
            }
        )
    return rows


# ---------------------------------------------------------------------------- targets
def _cell(cells: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for c in cells:
        if all(c.get(k) == v for k, v in match.items()):
            return c
    return None


def evaluate_targets(cells: list[dict[str, Any]], scaling: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value, threshold and met/not met."""
    targets = []
    keys = sorted({(c["shape"], c["tokens"], c["mode"]) for c in cells})
    slower, speedups = [], {"fwd": [], "fwd_bwd": []}
    for shape, tokens, mode in keys:
        ours = _cell(cells, shape=shape, tokens=tokens, mode=mode, impl="moekit")
        hf = [_cell(cells, shape=shape, tokens=tokens, mode=mode, impl=i) for i in HF_IMPLS]
        best = min(c["ms"] for c in hf if c is not None)
        speedups[mode].append(best / ours["ms"])
        if ours["ms"] > best:
            slower.append(f"{shape} T={tokens} {mode}: {ours['ms']:.3g} vs {best:.3g} ms")
    targets.append(
        {
            "name": "moekit at least as fast as transformers' best in every layer cell",
            "value": f"{len(keys) - len(slower)}/{len(keys)} cells",
            "threshold": "all",
            "met": not slower,
            "detail": slower,
        }
    )
    for mode, want in (("fwd_bwd", 1.5), ("fwd", 1.2)):
        geo = (
            math.exp(statistics.fmean(math.log(s) for s in speedups[mode]))
            if speedups[mode]
            else float("nan")
        )
        targets.append(
            {
                "name": f"geometric-mean speedup over transformers' best, {mode} cells",
                "value": round(geo, 3),
                "threshold": f">= {want}",
                "met": geo >= want,
            }
        )
    # The ceilings in phase with the cell (Probes) where measured, else the run's best sample; the
    # detail gives the other.
    for mode, want in (("fwd", 0.85), ("fwd_bwd", 0.75)):
        for c in cells:
            if c["impl"] == "moekit" and c["mode"] == mode and c["tokens"] == 4096:
                frac = c.get("frac_sgemm_in_phase", c["frac_sgemm"])
                targets.append(
                    {
                        "name": f"{c['shape']} T=4096 {mode}: fraction of the sgemm ceiling (in phase)",
                        "value": round(frac, 3),
                        "threshold": f">= {want}",
                        "met": frac >= want,
                        "detail": f"{c['frac_sgemm']:.3f} of the run's best sgemm sample",
                    }
                )
    for c in cells:
        if c["impl"] == "moekit" and c["mode"] == "fwd" and "x_floor" in c:
            x_floor = c.get("x_floor_in_phase", c["x_floor"])
            targets.append(
                {
                    "name": f"{c['shape']} T={c['tokens']} fwd: time / memory floor (in phase)",
                    "value": round(x_floor, 3),
                    "threshold": "<= 1.5",
                    "met": x_floor <= 1.5,
                    "detail": f"{c['x_floor']:.3f} of the floor at the run's best bandwidth sample",
                }
            )
    for c in cells:
        if c["impl"] == "moekit" and c["mode"] == "fwd_bwd" and c["tokens"] == 4096 and "peak_mb" in c:
            hf = [_cell(cells, shape=c["shape"], tokens=4096, mode="fwd_bwd", impl=i) for i in HF_IMPLS]
            least = min(h["peak_mb"] for h in hf if h is not None)
            targets.append(
                {
                    "name": f"{c['shape']} T=4096 fwd+bwd peak memory vs transformers' smallest (MiB)",
                    "value": f"{c['peak_mb']:.0f} vs {least:.0f}",
                    "threshold": "<=",
                    "met": c["peak_mb"] <= least,
                }
            )
    if len(scaling) > 1:
        last = scaling[-1]
        targets.append(
            {
                "name": f"forward at {last['experts']} experts / {scaling[0]['experts']} experts (T={last['tokens']})",
                "value": round(last["relative_to_first"], 3),
                "threshold": "<= 1.15",
                "met": last["relative_to_first"] <= 1.15,
            }
        )
    return targets


# ---------------------------------------------------------------------------- run and report
def run_layer(
    quick: bool = False,
    tokens: tuple[int, ...] | None = None,
    memory: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """The whole layer suite -> a JSON-ready dict, run with `threads` intra-op threads if given.

    The smoke run (quick) is single-threaded unless told otherwise: on a busy machine a thread team
    stalls whenever one of its threads is descheduled.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if quick else previous))
    try:
        return _run_layer(quick, tokens or (QUICK_TOKENS if quick else TOKENS), memory)
    finally:
        torch.set_num_threads(previous)


def measure_ceilings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sgemm": sgemm_ceiling((512,), 2), "read_bandwidth": read_bandwidth(64 << 20, 2)}
    return {"sgemm": sgemm_ceiling(), "read_bandwidth": read_bandwidth()}


def best_ceilings(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest of the ceilings measured along the run: other jobs only ever lower them."""
    sgemm = max((s["sgemm"] for s in samples), key=lambda c: c["gflops"])
    bandwidth = max((s["read_bandwidth"] for s in samples), key=lambda c: c["gbs"])
    return {
        "sgemm": sgemm,
        "read_bandwidth": bandwidth,
        "samples": [
            {"sgemm_gflops": s["sgemm"]["gflops"], "read_gbs": s["read_bandwidth"]["gbs"]} for s in samples
        ],
    }


def apply_ceilings(cells: list[dict[str, Any]], shapes: tuple[Shape, ...], ceilings: dict[str, Any]) -> None:
    """Fractions of the sgemm ceiling and of the memory floor, from the final ceilings."""
    by_name = {s.name: s for s in shapes}
    sgemm, bandwidth = ceilings["sgemm"]["gflops"], ceilings["read_bandwidth"]["gbs"]
    for c in cells:
        c["frac_sgemm"] = c["gflops"] / sgemm
        if "distinct_experts" in c:
            floor_s = by_name[c["shape"]].floor_seconds(c["distinct_experts"], bandwidth)
            c["floor_ms"], c["x_floor"] = floor_s * 1e3, c["ms"] / (floor_s * 1e3)


def _run_layer(quick: bool, tokens: tuple[int, ...], memory: bool) -> dict[str, Any]:
    info = machine_info()
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    shapes = QUICK_SHAPES if quick else SHAPES
    samples, cells = [], []
    for shape in shapes:  # ceilings before each shape and at the end; the best one is the ceiling
        samples.append(measure_ceilings(quick))
        cells += bench_shape(shape, tokens, samples[-1], quick, memory)
    scaling = bench_scaling(
        shapes[0], SCALING_EXPERTS[:2] if quick else SCALING_EXPERTS, 8 if quick else 4096, quick
    )
    samples.append(measure_ceilings(quick))
    ceilings = best_ceilings(samples)
    apply_ceilings(cells, shapes, ceilings)
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    others = cpu_used_by_others(cpu_start, time.perf_counter() - wall_start)
    info["cores_used_by_others"] = None if others is None else round(others, 3)
    return {
        "suite": "layer",
        "quick": quick,
        "machine": info,
        "versions": versions(),
        "shapes": [asdict(s) for s in shapes],
        "ceilings": ceilings,
        "cells": cells,
        "scaling": scaling,
        "targets": evaluate_targets(cells, scaling),
    }


def _both(cell: dict[str, Any], key: str, unit: str) -> str:
    """`key` against the run's best ceiling / against the one in phase (where measured)."""
    text = f"{cell[key]:.2f}{unit}"
    if f"{key}_in_phase" in cell:
        text += f" / {cell[f'{key}_in_phase']:.2f}{unit}"
    return text


def format_layer(r: dict[str, Any]) -> str:
    """Markdown tables of a `run_layer` result."""
    m, v, c = r["machine"], r["versions"], r["ceilings"]
    others = m.get("cores_used_by_others")
    lines = []
    if others is not None and others > 0.1:
        lines += [
            f"**Note: the machine was shared while this ran** (other processes used {others:.2f} of its "
            f"{m['logical_cores']} cores on average): absolute times are inflated and noisy, "
            "small cells most (an OpenMP/MKL region waits for a descheduled thread). The implementations of "
            "a cell ran interleaved, so the ratios between them are the meaningful numbers.",
            "",
        ]
    lines += [
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch threads {m['torch_threads']}; "
        f"load average {m['loadavg_at_start']} at start, {m.get('loadavg_at_end')} at end; "
        f"other processes used {'?' if others is None else f'{others:.2f}'} cores on average during the run.",
        f"Versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, moekit {v['moekit']}; "
        f"native kernels {v.get('native_kernel', 'not recorded')}.",
        f"Ceilings: sgemm {c['sgemm']['gflops']:.0f} GFLOP/s (n={c['sgemm']['n']}), "
        f"read bandwidth {c['read_bandwidth']['gbs']:.1f} GB/s ({c['read_bandwidth']['bytes'] >> 20} MiB buffer); "
        f"the best of {len(c.get('samples', [])) or 1} measurements along the run (sgemm GFLOP/s: "
        + ", ".join(f"{x['sgemm_gflops']:.0f}" for x in c.get("samples", []))
        + "). In phase: an n=2048 sgemm (and for T <= 8 a read of 256 MiB) run once per round in turns "
        "with the implementations of each cell; the fractions show both, the run's best / in phase, "
        "and the targets take the in-phase ones.",
        "",
    ]
    for shape in r["shapes"]:
        name = shape["name"]
        lines += [
            f"### {name}: dim {shape['dim']}, expert hidden {shape['hidden']}, {shape['experts']} experts, top-{shape['top_k']}",
            "",
        ]
        for mode, title in (("fwd", "forward (no grad)"), ("fwd_bwd", "forward + backward")):
            head = (
                "| T | "
                + " | ".join(IMPLS)
                + " | moekit GFLOP/s | moekit / sgemm (best / in phase) | speedup vs HF best |"
            )
            if mode == "fwd":
                head += " moekit / memory floor (best / in phase) |"
            else:
                head += " peak MiB (moekit / eager / grouped_mm / gshard) |"
            head += " sgemm in phase, GFLOP/s |"
            lines += [f"{title}, ms (median):", "", head, "|" + "---|" * (head.count("|") - 1)]
            for tokens in sorted({x["tokens"] for x in r["cells"] if x["shape"] == name}):
                row = {i: _cell(r["cells"], shape=name, tokens=tokens, mode=mode, impl=i) for i in IMPLS}
                ours = row["moekit"]
                best = min(row[i]["ms"] for i in HF_IMPLS)
                cols = [f"{row[i]['ms']:.3g}" for i in IMPLS]
                extra = [f"{ours['gflops']:.1f}", _both(ours, "frac_sgemm", ""), f"{best / ours['ms']:.2f}x"]
                if mode == "fwd":
                    extra.append(_both(ours, "x_floor", "x") if "x_floor" in ours else "")
                else:
                    extra.append(" / ".join(f"{row[i].get('peak_mb', float('nan')):.0f}" for i in IMPLS))
                extra.append(
                    f"{ours['sgemm_in_phase_gflops']:.0f}" if "sgemm_in_phase_gflops" in ours else ""
                )
                lines.append(f"| {tokens} | " + " | ".join(cols + extra) + " |")
            lines.append("")
    if r["scaling"]:
        lines += [
            "Scaling (moekit forward, Mixtral-like experts, top-2):",
            "",
            "| experts | T | ms | GFLOP/s | vs first |",
        ]
        lines.append("|---|---|---|---|---|")
        for s in r["scaling"]:
            lines.append(
                f"| {s['experts']} | {s['tokens']} | {s['ms']:.3g} | {s['gflops']:.0f} | {s['relative_to_first']:.2f}x |"
            )
        lines.append("")
    lines += ["Targets:", "", "| target | value | threshold | met |", "|---|---|---|---|"]
    for t in r["targets"]:
        lines.append(
            f"| {t['name']} | {t['value']} | {t['threshold']} | {'met' if t['met'] else 'NOT met'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny T list, one repeat (smoke test)")
    parser.add_argument("--tokens", default=None, help="comma-separated T list (default 1,8,64,512,4096)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else None
    result = run_layer(args.quick, tokens, memory=not args.no_memory, threads=args.threads)
    print(format_layer(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
