"""Aligning the hidden units of two experts before averaging them (weight matching).

An expert's hidden units can be permuted without changing its function (permute the columns of
W_in -- gate and up together for GLU -- and the rows of W_out alike). Two experts trained apart
hold similar units in different places, so averaging them unaligned blurs both; MC-SMoE aligns
them first. Here unit f of an expert is described by its weights [gate_f | up_f | down_f], the
cosine similarity of every pair of units is computed, and the permutation of the member's units
that maximizes the total similarity to the dominant expert's is solved exactly.

`linear_sum_assignment` is the shortest-augmenting-path algorithm (Jonker-Volgenant, as in
Crouse 2016 and scipy), vectorized over columns with numpy: O(n^3) worst case.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def linear_sum_assignment(cost: np.ndarray) -> np.ndarray:
    """For a square cost matrix [n, n]: col[i] for every row i, minimizing sum cost[i, col[i]]."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != n:
        raise ValueError(f"linear_sum_assignment needs a square matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("linear_sum_assignment: the cost matrix has NaN or infinite entries")
    u, v = np.zeros(n), np.zeros(n)  # dual variables of rows and columns
    col4row, row4col = np.full(n, -1), np.full(n, -1)
    for cur_row in range(n):
        shortest = np.full(n, np.inf)  # shortest augmenting path cost to every column
        path = np.full(n, -1)
        seen_rows, seen_cols = np.zeros(n, bool), np.zeros(n, bool)
        i, min_val, sink = cur_row, 0.0, -1
        while sink < 0:
            seen_rows[i] = True
            reduced = min_val + cost[i] - u[i] - v
            better = ~seen_cols & (reduced < shortest)
            path[better] = i
            shortest[better] = reduced[better]
            candidates = np.where(seen_cols, np.inf, shortest)
            lowest = candidates.min()
            ties = np.flatnonzero(candidates == lowest)
            free = ties[row4col[ties] < 0]  # prefer a tie that ends the path
            j = int(free[0] if free.size else ties[0])
            min_val = lowest
            seen_cols[j] = True
            if row4col[j] < 0:
                sink = j
            else:
                i = int(row4col[j])
        u[cur_row] += min_val
        others = seen_rows.copy()
        others[cur_row] = False
        u[others] += min_val - shortest[col4row[others]]
        v[seen_cols] -= min_val - shortest[seen_cols]
        j = sink
        while True:  # flip the augmenting path
            i = int(path[j])
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == cur_row:
                break
    return col4row


def unit_features(w_in_DH: Tensor, w_out_FD: Tensor) -> Tensor:
    """[F, 3D] (GLU) or [F, 2D] descriptors of an expert's hidden units: gate | up | down weights."""
    hidden = w_out_FD.shape[0]
    parts = [w_in_DH[:, f * hidden : (f + 1) * hidden].t() for f in range(w_in_DH.shape[1] // hidden)]
    return torch.cat([*parts, w_out_FD], dim=1)


def permute_units(w_in_DH: Tensor, w_out_FD: Tensor, b_in_H: Tensor | None, perm_F: Tensor):
    """The same expert with hidden unit perm_F[f] moved to position f (function unchanged)."""
    hidden = w_out_FD.shape[0]
    cols = torch.cat([perm_F + f * hidden for f in range(w_in_DH.shape[1] // hidden)])
    return w_in_DH[:, cols], w_out_FD[perm_F], None if b_in_H is None else b_in_H[cols]


def match_units(reference_FX: Tensor, member_FX: Tensor) -> Tensor:
    """perm_F such that member unit perm_F[f] best matches reference unit f (max total cosine)."""
    a = torch.nn.functional.normalize(reference_FX.double(), dim=1)
    b = torch.nn.functional.normalize(member_FX.double(), dim=1)
    similarity_FF = (a @ b.t()).numpy()
    return torch.from_numpy(linear_sum_assignment(-similarity_FF)).long()
