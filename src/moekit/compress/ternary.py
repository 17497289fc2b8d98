"""Ternary experts fitted with GPTQ error feedback (QMoE, Frantar & Alistarh 2023).

Every output row r of a weight matrix W [R rows = output units, C columns = inputs] gets the grid
{lo_r, 0, hi_r} with lo_r = min(min(W_r), 0) and hi_r = max(max(W_r), 0), fixed from the original
row and rounded to float16 (what is stored). A weight rounds to the nearest grid point -- to zero
unless it is past half a level, `dead_zone = 0.5` -- so most weights become 0. A larger dead zone
makes still more zeros (a cheaper code) at a larger rounding error.

GPTQ (Frantar et al. 2022) quantizes the columns one at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian H = X^T X of the layer's
calibration inputs X [N, C] (for an expert: the tokens routed to it). It minimizes the error of
the layer's *outputs* on that data, ||X W^T - X Q^T||, rather than of the weights. The inverse is
taken once through a Cholesky factor (the upper factor U of H^-1 holds the OBS update rows), and
columns are processed in blocks whose updates to later columns are applied lazily as one product.

Shape legend: R rows (output units), C columns (inputs), N calibration rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ternary_levels(w_RC: Tensor) -> tuple[Tensor, Tensor]:
    """(lo_R, hi_R): the row grids {lo, 0, hi}, rounded to float16 (returned as float32)."""
    lo_R = w_RC.min(dim=1).values.clamp(max=0).half().float()
    hi_R = w_RC.max(dim=1).values.clamp(min=0).half().float()
    return lo_R, hi_R


def ternary_round(w_R: Tensor, lo_R: Tensor, hi_R: Tensor, dead_zone: float = 0.5) -> Tensor:
    """int8 symbols in {-1, 0, 1}: +1 past dead_zone * hi, -1 below dead_zone * lo, else 0."""
    up = (hi_R > 0) & (w_R > dead_zone * hi_R.to(w_R.dtype))
    down = (lo_R < 0) & (w_R < dead_zone * lo_R.to(w_R.dtype))
    return up.to(torch.int8) - down.to(torch.int8)


def ternary_values(sym: Tensor, lo_R: Tensor, hi_R: Tensor) -> Tensor:
    """The weights the symbols stand for; sym [R, ...] with one grid per row."""
    shape = (-1,) + (1,) * (sym.ndim - 1)
    lo, hi = lo_R.view(shape), hi_R.view(shape)
    zero = torch.zeros((), dtype=lo.dtype)
    return torch.where(sym > 0, hi, torch.where(sym < 0, lo, zero))


def damped_hessian(h_CC: Tensor, damp: float) -> Tensor:
    """H + damp * mean(diag H) * I, with unused inputs (zero diagonal) given a unit diagonal.

    A Hessian with no data at all (an expert no calibration token reached) becomes the identity:
    GPTQ then reduces to plain rounding."""
    h = h_CC.clone().double()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    if bool(dead.all()):
        return torch.eye(h.shape[0], dtype=h.dtype)
    h.diagonal().add_(damp * float(diag[~dead].mean()))
    return h


def gptq_ternary(
    w_RC: Tensor, h_CC: Tensor, damp: float = 0.01, dead_zone: float = 0.5, block: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ with a per-row ternary grid -> (symbols int8 [R, C], lo_R, hi_R).

    Runs in float64; h_CC is the (undamped) Hessian X^T X of the inputs."""
    w = w_RC.detach().double().clone()
    lo_R, hi_R = ternary_levels(w_RC.detach().float())
    lo64, hi64 = lo_R.double(), hi_R.double()
    h = damped_hessian(h_CC, damp)
    # U: upper Cholesky factor of H^-1. Row i of U, divided by U[i, i], is the OBS update that
    # spreads column i's error over columns i+1.. (GPTQ's reformulation of the per-column inverse).
    u_CC = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    num_cols = w.shape[1]
    sym = torch.zeros(w.shape, dtype=torch.int8)
    for start in range(0, num_cols, block):
        end = min(start + block, num_cols)
        w_blk = w[:, start:end]  # a view: updated in place
        err_blk = torch.zeros_like(w_blk)
        u_blk = u_CC[start:end, start:end]
        for i in range(end - start):
            col = w_blk[:, i]
            s = ternary_round(col, lo64, hi64, dead_zone)
            sym[:, start + i] = s
            err = (col - ternary_values(s, lo64, hi64)) / u_blk[i, i]
            w_blk[:, i:] -= err[:, None] * u_blk[i, i:][None, :]
            err_blk[:, i] = err
        w[:, end:] -= err_blk @ u_CC[start:end, end:]
    return sym, lo_R, hi_R


def round_ternary(w_RC: Tensor, dead_zone: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Plain round-to-nearest ternary (no error feedback): the baseline GPTQ improves on."""
    lo_R, hi_R = ternary_levels(w_RC.detach().float())
    return ternary_round(w_RC.detach().float(), lo_R[:, None], hi_R[:, None], dead_zone), lo_R, hi_R
