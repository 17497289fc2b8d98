"""Grouped matrix products: rows sorted by expert, one weight matrix per contiguous group.

`grouped_mm(x_ND, w_EDF, counts)` computes `x[rows of e] @ w[e]` for every expert e, where the
rows of expert e are the `counts[e]` rows following those of experts 0..e-1. This is the dropless
compute of MegaBlocks/ScatterMoE without padding to a capacity and without `[T, E, C]` one-hot
tensors. The autograd function writes every output and gradient row exactly once, skips weight
gradients that nobody asked for, and gives exact zeros to experts that received no rows (never an
unwritten buffer).

Four strategies compute the same products (`strategy=`; "auto" picks by shape):
  - "loop": one `torch.mm` per non-empty group, written in place into the output (any dtype);
  - "bmm": one `torch.bmm` when every expert has the same number of rows (expert choice, full
    capacity, a single shared expert);
  - "pairs": groups two at a time, each pair one `torch.bmm` over a strided batch of the two
    experts' weights (a view: `w[e1 : e2 + 1 : e2 - e1]`, no copy). Two groups with equal row
    counts are viewed as a batch in place; unequal ones are zero-padded into a small buffer;
  - "grouped_mm": one `torch._grouped_mm` call (float32/bfloat16/float16, 16-byte aligned rows),
    which loops over the groups in C++. It is only ever called inside our own autograd functions:
    its CPU backward mishandles expanded gradients.
On CPU float32 all of them run at the same GEMM speed for large groups. Small groups are another
matter: MKL runs a product of a few rows on one thread (and `_grouped_mm` runs its groups one after
another), so with two threads half the machine idles, while a batched product gives each thread
whole matrices. On a 2-core EPYC a pair of 1-8 row products ran 1.8-2.1x faster as one bmm than
as two mm (1.2-1.3x at 16-32 rows; weight-gradient products are not paired: their large output
already splits over the threads). "auto" therefore uses "bmm" when it applies (one call instead of
E); "pairs" on a CPU with two or more threads for small groups (up to 64 rows on average); on one
thread "grouped_mm" for small groups (one call instead of E); and "loop" otherwise, since
`_grouped_mm` allocates its own output (then copied into place). The loop does a one-row group as
`mv(w^T, x)`, MKL's matrix-vector product over the transposed weight, which streams the weight
up to twice as fast as a 1-row `mm` on some CPUs.

The helpers below (`GroupPlan`, `mm_groups`, `weight_grad_groups`) are shared with the fused
expert function in experts.py, which calls them on row blocks.

Shape legend: N sorted rows, D input features, F output features, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.moe.memory import gradient_buffer, scratch, zero_new_buffer

STRATEGIES = ("auto", "loop", "bmm", "pairs", "grouped_mm")
SMALL_GROUPS_MIN, SMALL_ROWS = 2, 64  # "auto" pairs (or _grouped_mm) >= 2 groups of <= 64 rows on average
# "pairs" zero-pads two unequal groups only when a weight matrix is at least this large: below it
# the copies cost about what the second thread saves (equal groups pair without copies at any size)
PAIR_PAD_MIN_BYTES = 1 << 20
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GroupPlan:
    """Where each expert's rows are: built once per call from the host-side counts."""

    counts: tuple[int, ...]  # rows per expert, E entries
    bounds: tuple[tuple[int, int, int], ...]  # (expert, start, end) of every non-empty group
    num_rows: int  # sum(counts)

    @classmethod
    def from_counts(cls, counts: Sequence[int]) -> GroupPlan:
        bounds, start = [], 0
        for e, c in enumerate(counts):
            c = int(c)
            if c:
                bounds.append((e, start, start + c))
            start += c
        return cls(tuple(int(c) for c in counts), tuple(bounds), start)

    def blocks(self, max_rows: int) -> list[tuple[int, int, GroupPlan]]:
        """Cut the rows into blocks of at most `max_rows` rows: (start, end, plan local to the block).

        Small neighbouring groups share a block (one activation call for many tiny groups when
        decoding); a group larger than `max_rows` is split into near-equal pieces, so that a block's
        intermediates stay in cache and the GEMMs keep enough rows to run at full speed.
        """
        if 0 < self.num_rows <= max_rows:  # the common small case: one block, this plan
            return [(0, self.num_rows, self)]
        num_experts, blocks = len(self.counts), []
        pending: list[tuple[int, int, int]] = []

        def close() -> None:
            if pending:
                start, counts = pending[0][1], [0] * num_experts
                for e, s, t in pending:
                    counts[e] += t - s
                blocks.append((start, pending[-1][2], GroupPlan.from_counts(counts)))
                pending.clear()

        for e, s, t in self.bounds:
            rows = t - s
            if rows > max_rows:
                close()
                pieces = -(-rows // max_rows)
                edges = [s + rows * i // pieces for i in range(pieces + 1)]
                for a, b in zip(edges[:-1], edges[1:]):
                    pending.append((e, a, b))
                    close()
                continue
            if pending and t - pending[0][1] > max_rows:
                close()
            pending.append((e, s, t))
        close()
        return blocks

    @property
    def uniform(self) -> bool:
        """Every expert has the same, non-zero number of rows (one bmm does it all)."""
        return bool(self.counts) and self.counts[0] > 0 and len(set(self.counts)) == 1


# (device type, dtype) where torch._grouped_mm raised (e.g. a GPU generation it has no kernel
# for): the loop serves them from then on instead of failing every call
_GROUPED_MM_UNSUPPORTED: set[tuple[str, torch.dtype]] = set()
# (device type, dtype) where it ran: an error there later is a real one (raised, not a fallback)
_GROUPED_MM_WORKS: set[tuple[str, torch.dtype]] = set()


def _try_grouped_mm(x_ND: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor | None:
    """torch._grouped_mm(x, w, offs), or None where it has no kernel for this device and dtype
    (remembered: `_grouped_mm_ok` answers False from then on). Out of memory, or any error where it
    has run before, is raised."""
    key = (x_ND.device.type, x_ND.dtype)
    try:
        y_NF = torch._grouped_mm(x_ND, w_EDF, offs=offs_E)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        if key in _GROUPED_MM_WORKS:
            raise
        _GROUPED_MM_UNSUPPORTED.add(key)
        return None
    _GROUPED_MM_WORKS.add(key)
    return y_NF


def _grouped_mm_ok(x_ND: Tensor, w_EDF: Tensor) -> bool:
    """torch._grouped_mm's requirements: dtype, and 16-byte aligned pointers and row strides."""
    if not hasattr(torch, "_grouped_mm") or x_ND.dtype not in GROUPED_MM_DTYPES or x_ND.dtype != w_EDF.dtype:
        return False
    if (x_ND.device.type, x_ND.dtype) in _GROUPED_MM_UNSUPPORTED:
        return False
    size = x_ND.element_size()
    strides = (x_ND.stride(0), w_EDF.stride(0), max(w_EDF.stride(1), w_EDF.stride(2)))
    aligned = x_ND.data_ptr() % 16 == 0 and w_EDF.data_ptr() % 16 == 0
    return aligned and all((s * size) % 16 == 0 for s in strides)


def grouped_mm_on_device(x_ND: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor | None:
    """[N, F] = `x_ND[group e] @ w_EDF[e]` by one `torch._grouped_mm`, with autograd (torch's own
    backward), where group e ends at row `offs_E[e]` (int32 cumulative counts, on x's device: no
    host sync). None where `_grouped_mm` does not serve these tensors (dtype, alignment, or it
    raised once for this device and dtype): the caller then takes the host-planned path."""
    if not _grouped_mm_ok(x_ND, w_EDF):
        return None
    return _try_grouped_mm(x_ND, w_EDF, offs_E)


def pick_strategy(strategy: str, plan: GroupPlan, x_ND: Tensor, w_EDF: Tensor) -> str:
    """The strategy to run: the requested one, or for "auto" the fastest that applies."""
    if strategy not in STRATEGIES:
        raise ValueError(f"grouped_mm: unknown strategy {strategy!r}: expected one of {list(STRATEGIES)}")
    if strategy == "auto":
        if plan.uniform and plan.num_rows == x_ND.shape[0]:
            return "bmm"
        groups = len(plan.bounds)
        single_rows = sum(1 for _, s, t in plan.bounds if t - s == 1)
        small = groups >= SMALL_GROUPS_MIN and plan.num_rows <= SMALL_ROWS * groups
        if small and x_ND.device.type == "cpu" and torch.get_num_threads() >= 2 and x_ND.dtype == w_EDF.dtype:
            return "pairs"
        if small and single_rows < groups and _grouped_mm_ok(x_ND, w_EDF):
            return "grouped_mm"
        return "loop"  # large groups, or only one-row groups (matrix-vector products)
    if strategy == "bmm" and not (plan.uniform and plan.num_rows == x_ND.shape[0]):
        return "loop"  # bmm needs equal groups covering every row
    if strategy == "grouped_mm" and not _grouped_mm_ok(x_ND, w_EDF):
        return "loop"
    if strategy == "pairs" and x_ND.dtype != w_EDF.dtype:
        return "loop"  # bmm needs one dtype
    return strategy


def mm_groups(x_ND: Tensor, w_EDF: Tensor, plan: GroupPlan, out_NF: Tensor, strategy: str = "auto") -> Tensor:
    """out[group e] = x[group e] @ w[e] for every non-empty group; other rows of out are untouched.

    No autograd: callers wrap it. `w_EDF` may be a transposed view (the backward passes w^T).
    """
    strategy = pick_strategy(strategy, plan, x_ND, w_EDF)
    if strategy == "grouped_mm" and plan.bounds:
        offs_E = torch.tensor(plan.counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        y_NF = _try_grouped_mm(x_ND, w_EDF, offs_E.to(x_ND.device))
        if y_NF is None:  # no kernel for this device/dtype: the loop instead
            strategy = "loop"
        else:
            out_NF[: plan.num_rows].copy_(y_NF[: plan.num_rows])
            return out_NF
    if strategy == "bmm":
        num_experts, rows = len(plan.counts), plan.counts[0]
        torch.bmm(x_ND.view(num_experts, rows, -1), w_EDF, out=out_NF.view(num_experts, rows, -1))
        return out_NF
    groups: Sequence[tuple[int, int, int]] = plan.bounds
    if strategy == "pairs":
        groups = _mm_pairs(x_ND, w_EDF, plan, out_NF)
    for e, s, t in groups:  # the loop (grouped_mm with no non-empty group: nothing to compute)
        if t - s == 1:  # one row: a matrix-vector product over w^T (up to twice as fast in MKL)
            torch.mv(w_EDF[e].t(), x_ND[s], out=out_NF[s])
        else:
            torch.mm(x_ND[s:t], w_EDF[e], out=out_NF[s:t])
    return out_NF


def expert_pair(w_E: Tensor, e1: int, e2: int) -> Tensor:
    """A [2, ...] view of experts e1 < e2: a strided batch over the expert dim, no copy."""
    return w_E[e1 : e2 + 1 : e2 - e1]


def _row_pair(x_ND: Tensor, s1: int, s2: int, rows: int) -> Tensor:
    """A [2, rows, D] view of the rows from s1 and from s2 (s1 + rows <= s2): no copy."""
    step, stride_d = x_ND.stride()
    offset = x_ND.storage_offset() + s1 * step
    return x_ND.as_strided((2, rows, x_ND.shape[1]), ((s2 - s1) * step, step, stride_d), offset)


def _mm_pairs(x_ND: Tensor, w_EDF: Tensor, plan: GroupPlan, out_NF: Tensor) -> list[tuple[int, int, int]]:
    """The "pairs" strategy: every two groups of similar size as one bmm; returns the groups left
    for the loop (an odd one out, and unequal pairs of small weights)."""
    by_rows = sorted(plan.bounds, key=lambda g: (g[2] - g[1], g[0]))  # neighbours differ least
    pad = w_EDF.shape[1] * w_EDF.shape[2] * w_EDF.element_size() >= PAIR_PAD_MIN_BYTES
    left = list(by_rows[len(by_rows) - len(by_rows) % 2 :])
    for i in range(0, len(by_rows) - 1, 2):
        (e1, s1, t1), (e2, s2, t2) = sorted(by_rows[i : i + 2])  # in expert order, so rows too
        w_2DF = expert_pair(w_EDF, e1, e2)
        m1, m2 = t1 - s1, t2 - s2
        if m1 == m2:  # the two groups are a strided batch of the rows as they are
            x_2RD = _row_pair(x_ND, s1, s2, m1)
            if s2 == t1 and out_NF.is_contiguous():  # neighbours: their output rows are one block
                torch.bmm(x_2RD, w_2DF, out=out_NF[s1:t2].view(2, m1, -1))
            else:  # bmm into a strided out runs its two products one after the other: copy instead
                (y_2RF,) = scratch(out_NF, (2, m1, out_NF.shape[1]), pool="pairs")
                _row_pair(out_NF, s1, s2, m1).copy_(torch.bmm(x_2RD, w_2DF, out=y_2RF))
        elif pad:  # (buffers kept between calls: fresh ones cost page faults whenever glibc trimmed)
            rows = max(m1, m2)
            x_2RD, y_2RF = scratch(x_ND, (2, rows, x_ND.shape[1]), (2, rows, out_NF.shape[1]), pool="pairs")
            x_2RD[0, :m1], x_2RD[1, :m2] = x_ND[s1:t1], x_ND[s2:t2]
            x_2RD[0, m1:].zero_()  # the shorter group's padding rows (their outputs are not used)
            x_2RD[1, m2:].zero_()
            torch.bmm(x_2RD, w_2DF, out=y_2RF)
            out_NF[s1:t1], out_NF[s2:t2] = y_2RF[0, :m1], y_2RF[1, :m2]
        else:
            left += [(e1, s1, t1), (e2, s2, t2)]
    return left


def weight_grad_groups(
    a_ND: Tensor, b_NF: Tensor, plan: GroupPlan, grad_EDF: Tensor, touched: list[bool] | None = None
) -> None:
    """grad[e] (+)= a[group e]^T @ b[group e].

    With `touched` (one flag per expert, updated here) the first product of an expert overwrites
    grad[e] and later ones (row blocks of the same expert) accumulate; without it every product
    overwrites. Experts never touched are left to the caller to zero.
    """
    if touched is None and plan.uniform and plan.num_rows == a_ND.shape[0]:
        num_experts, rows = len(plan.counts), plan.counts[0]
        a_ERD = a_ND.view(num_experts, rows, -1)
        torch.bmm(a_ERD.transpose(1, 2), b_NF.view(num_experts, rows, -1), out=grad_EDF)
        return
    for e, s, t in plan.bounds:
        if touched is not None and touched[e]:
            grad_EDF[e].addmm_(a_ND[s:t].t(), b_NF[s:t])
        else:
            torch.mm(a_ND[s:t].t(), b_NF[s:t], out=grad_EDF[e])
            if touched is not None:
                touched[e] = True


def zero_untouched(grad_E: Tensor, touched: Sequence[bool], reused: bool = False) -> None:
    """Exact zeros for the experts that received no rows: each run of neighbouring ones at once.

    `grad_E` must be a buffer the caller has just allocated (see `memory.zero_new_buffer`), or, with
    `reused`, memory kept from an earlier gradient (`memory.gradient_buffer`): its pages are mapped
    and warm, so they are written (dropping them would only make the next step fault them again).
    """
    e, num_experts = 0, len(touched)
    while e < num_experts:
        if touched[e]:
            e += 1
            continue
        end = e + 1
        while end < num_experts and not touched[end]:
            end += 1
        if reused:
            grad_E[e:end].zero_()
        else:
            zero_new_buffer(grad_E, e, end)
        e = end


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, w_EDF: Tensor, plan: GroupPlan, strategy: str) -> Tensor:  # type: ignore[override]
        ctx.plan, ctx.strategy = plan, strategy
        ctx.save_for_backward(x_ND, w_EDF)
        out_NF = x_ND.new_empty(x_ND.shape[0], w_EDF.shape[-1])
        if plan.num_rows < x_ND.shape[0]:  # rows past the last group (none in normal use) are zero
            out_NF[plan.num_rows :].zero_()
        return mm_groups(x_ND, w_EDF, plan, out_NF, strategy)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NF: Tensor):  # type: ignore[override]
        x_ND, w_EDF = ctx.saved_tensors
        plan: GroupPlan = ctx.plan
        grad_NF = grad_NF.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = x_ND.new_empty(x_ND.shape)
            if plan.num_rows < x_ND.shape[0]:
                grad_x[plan.num_rows :].zero_()
            mm_groups(grad_NF, w_EDF.transpose(1, 2), plan, grad_x, ctx.strategy)
        if ctx.needs_input_grad[1]:
            grad_w, reused = gradient_buffer(w_EDF)
            touched = [c > 0 for c in plan.counts]
            weight_grad_groups(x_ND, grad_NF, plan, grad_w)
            zero_untouched(grad_w, touched, reused)
        return grad_x, grad_w, None, None


def grouped_mm(x_ND: Tensor, w_EDF: Tensor, counts: Sequence[int], strategy: str = "auto") -> Tensor:
    """[N, F] = per-expert `x_ND[group e] @ w_EDF[e]`; `counts` (host ints) sum to at most N."""
    if x_ND.shape[-1] != w_EDF.shape[1]:
        raise ValueError(
            f"grouped_mm: x has {x_ND.shape[-1]} features but the weights expect {w_EDF.shape[1]}"
        )
    if len(counts) != w_EDF.shape[0]:
        raise ValueError(f"grouped_mm: {len(counts)} group counts for {w_EDF.shape[0]} experts")
    plan = GroupPlan.from_counts(counts)
    if plan.num_rows > x_ND.shape[0]:
        raise ValueError(f"grouped_mm: counts sum to {plan.num_rows} rows but x has {x_ND.shape[0]}")
    pick_strategy(strategy, plan, x_ND, w_EDF)  # validates the name
    return _GroupedMM.apply(x_ND, w_EDF, plan, strategy)


def expert_of_rows(counts: Sequence[int], device: torch.device) -> Tensor:
    """[N] expert id of every sorted row."""
    counts_t = torch.as_tensor(list(counts), device=device)
    return torch.arange(len(counts), device=device).repeat_interleave(counts_t)
