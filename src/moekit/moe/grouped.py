"""Grouped matrix products: rows sorted by expert, one weight matrix per contiguous group.

`grouped_mm(x_ND, w_EDF, counts)` computes `x[rows of e] @ w[e]` for every expert e, where the
rows of expert e are the `counts[e]` rows following those of experts 0..e-1. This is the dropless
compute of MegaBlocks/ScatterMoE without padding to a capacity and without `[T, E, C]` one-hot
tensors. The autograd function writes every output and gradient row exactly once, skips weight
gradients that nobody asked for, and gives exact zeros to experts that received no rows (never an
unwritten buffer).

Shape legend: N sorted rows, D input features, F output features, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _group_bounds(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty group."""
    bounds, start = [], 0
    for e, c in enumerate(counts):
        if c:
            bounds.append((e, start, start + c))
        start += c
    return bounds


def _grouped_forward(x_ND: Tensor, w_EDF: Tensor, bounds: list[tuple[int, int, int]]) -> Tensor:
    out_NF = x_ND.new_empty(x_ND.shape[0], w_EDF.shape[-1])
    covered = 0
    for e, s, t in bounds:
        torch.mm(x_ND[s:t], w_EDF[e], out=out_NF[s:t])
        covered = t
    if covered < x_ND.shape[0]:  # rows past the last group (none in normal use) are zero, not garbage
        out_NF[covered:].zero_()
    return out_NF


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, w_EDF: Tensor, counts: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        bounds = _group_bounds(counts)
        ctx.bounds = bounds
        ctx.save_for_backward(x_ND, w_EDF)
        return _grouped_forward(x_ND, w_EDF, bounds)

    @staticmethod
    def backward(ctx, grad_NF: Tensor):  # type: ignore[override]
        x_ND, w_EDF = ctx.saved_tensors
        grad_NF = grad_NF.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _grouped_forward(grad_NF, w_EDF.transpose(1, 2), ctx.bounds)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w_EDF)
            for e, s, t in ctx.bounds:
                torch.mm(x_ND[s:t].t(), grad_NF[s:t], out=grad_w[e])
        return grad_x, grad_w, None


def grouped_mm(x_ND: Tensor, w_EDF: Tensor, counts: Sequence[int]) -> Tensor:
    """[N, F] = per-expert `x_ND[group e] @ w_EDF[e]`; `counts` (host ints) sum to at most N."""
    if x_ND.shape[-1] != w_EDF.shape[1]:
        raise ValueError(
            f"grouped_mm: x has {x_ND.shape[-1]} features but the weights expect {w_EDF.shape[1]}"
        )
    if len(counts) != w_EDF.shape[0]:
        raise ValueError(f"grouped_mm: {len(counts)} group counts for {w_EDF.shape[0]} experts")
    return _GroupedMM.apply(x_ND, w_EDF, tuple(int(c) for c in counts))


def expert_of_rows(counts: Sequence[int], device: torch.device) -> Tensor:
    """[N] expert id of every sorted row."""
    counts_t = torch.as_tensor(list(counts), device=device)
    return torch.arange(len(counts), device=device).repeat_interleave(counts_t)
