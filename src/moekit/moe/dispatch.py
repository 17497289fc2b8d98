"""Dispatch and combine: move token assignments to their experts and the results back.

The routing gives A assignments (token, expert, weight). Dispatch sorts them by expert (stable,
in priority order within an expert), applies the capacity rule, and gathers the kept tokens into
one contiguous `[N, D]` block where expert e owns `counts[e]` consecutive rows. The experts run a
grouped product over those groups. Combine scales each result by its weight and adds it into the
token's output row; a dropped assignment contributes exactly zero (the token still has the
residual connection outside this layer).

Capacity (C slots per expert, see MoEConfig.capacity) drops the assignments past C in priority
order: "position" gives priority to all first choices before any second choice, and within a rank
to earlier tokens (Switch, GShard); "probability" orders each rank by router weight, so the least
confident assignments are dropped first (batch-priority routing, V-MoE/Tutel).

`LocalDispatcher` keeps everything on this process; an all-to-all dispatcher for expert
parallelism implements the same two methods.

Shape legend: T tokens, D dim, E experts, K experts per token, A assignments, N kept assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.moe.router import Routing


@dataclass
class SlotAssignment:
    """Which assignments run, grouped by expert."""

    perm_N: Tensor  # [N] assignment index of every kept row, sorted by expert
    counts: list[int]  # kept rows per expert (host ints: they size the grouped products)
    routed_E: Tensor  # [E] float32 valid assignments per expert before capacity
    kept_E: Tensor  # [E] float32 kept assignments per expert


def priority_order(routing: Routing, policy: str) -> Tensor | None:
    """[A] assignment indices in drop priority (first = kept first); None = natural order."""
    k = routing.top_k
    if k == 0:  # expert choice: already exactly C per expert
        return None
    num_tokens = routing.num_assignments // k
    idx_KT = torch.arange(routing.num_assignments, device=routing.expert_idx_A.device).view(num_tokens, k).t()
    if policy == "probability":
        w_KT = routing.weight_A.detach().view(num_tokens, k).t()
        order_KT = torch.argsort(w_KT, dim=1, descending=True, stable=True)
        idx_KT = idx_KT.gather(1, order_KT)
    return idx_KT.reshape(-1)  # rank-major: every first choice before any second choice


def assign_slots(
    expert_idx_A: Tensor,
    valid_A: Tensor | None,
    num_experts: int,
    capacity: int | None,
    order_A: Tensor | None = None,
) -> SlotAssignment:
    """Sort valid assignments by expert (priority order within an expert) and drop those past capacity."""
    num_assignments = expert_idx_A.numel()
    if valid_A is None and capacity is None:  # dropless: every assignment runs, in expert order
        perm_A = (
            torch.argsort(expert_idx_A, stable=True)
            if order_A is None
            else order_A[torch.argsort(expert_idx_A[order_A], stable=True)]
        )
        routed_E = torch.bincount(expert_idx_A, minlength=num_experts).float()  # [E]
        return SlotAssignment(perm_A, [int(c) for c in routed_E.tolist()], routed_E, routed_E.clone())
    # Invalid assignments go to a sentinel bucket E, sorted last and never computed.
    bucket_A = expert_idx_A if valid_A is None else expert_idx_A.masked_fill(~valid_A, num_experts)
    if order_A is None:
        perm_A = torch.argsort(bucket_A, stable=True)
    else:
        perm_A = order_A[torch.argsort(bucket_A[order_A], stable=True)]
    routed_E1 = torch.bincount(bucket_A, minlength=num_experts + 1)  # [E + 1]
    routed_E = routed_E1[:num_experts]
    if capacity is None:
        kept_E = routed_E
        perm_N = perm_A[: int(routed_E.sum())]
    else:
        start_E1 = torch.cumsum(routed_E1, 0) - routed_E1
        sorted_bucket_A = bucket_A[perm_A]
        position_A = torch.arange(num_assignments, device=perm_A.device) - start_E1[sorted_bucket_A]
        keep_A = (position_A < capacity) & (sorted_bucket_A < num_experts)
        perm_N = perm_A[keep_A]
        kept_E = routed_E.clamp(max=capacity)
    return SlotAssignment(perm_N, kept_E.tolist(), routed_E.float(), kept_E.float())


def capacity_keep_mask(
    expert_idx_A: Tensor,
    group_A: Tensor,
    valid_A: Tensor | None,
    num_experts: int,
    num_groups: int,
    capacity: int,
    order_A: Tensor | None = None,
) -> Tensor:
    """[A] bool: valid assignments within the first `capacity` of their (group, expert) in priority order.

    Capacity per group (Switch/mesh-tf groups, HF Switch: one group per sequence) instead of per call:
    each of G groups gives every expert C slots. The kept mask then feeds `assign_slots` as its
    `valid_A` with no further capacity.
    """
    num_buckets = num_groups * num_experts
    bucket_A = group_A * num_experts + expert_idx_A  # [A] in [0, G * E)
    if valid_A is not None:
        bucket_A = bucket_A.masked_fill(~valid_A, num_buckets)  # sentinel bucket, never kept
    if order_A is None:
        perm_A = torch.argsort(bucket_A, stable=True)
    else:
        perm_A = order_A[torch.argsort(bucket_A[order_A], stable=True)]
    count_B1 = torch.bincount(bucket_A, minlength=num_buckets + 1)  # [G * E + 1]
    start_B1 = torch.cumsum(count_B1, 0) - count_B1
    sorted_bucket_A = bucket_A[perm_A]
    position_A = torch.arange(bucket_A.numel(), device=bucket_A.device) - start_B1[sorted_bucket_A]
    keep_sorted_A = (position_A < capacity) & (sorted_bucket_A < num_buckets)
    return torch.zeros_like(keep_sorted_A).scatter(0, perm_A, keep_sorted_A)


@dataclass
class DispatchState:
    """What combine needs to bring expert outputs home, plus the counts for statistics."""

    token_N: Tensor  # [N] token of every kept row
    weight_N: Tensor  # [N] combine weight of every kept row
    num_tokens: int
    routed_E: Tensor  # [E] valid assignments per expert before capacity
    kept_E: Tensor  # [E] assignments per expert that ran
    # Set when every assignment of a token-major routing runs (dropless top-k): combine then
    # un-permutes with one gather and sums each token's K rows, no scatter-add needed.
    top_k: int = 0  # K of that routing, 0 otherwise
    row_A: Tensor | None = None  # [A] sorted row of every assignment (the inverse permutation)
    perm_N: Tensor | None = None  # [N] assignment of every sorted row
    weight_A: Tensor | None = None  # [A] token-major combine weights


def _sum_gathered(src_ND: Tensor, row_TK: Tensor, weight_TK: Tensor | None = None) -> Tensor:
    """out[t] = sum_k (weight[t, k] *) src[row[t, k]]: K row gathers accumulated into one [T, D].

    On the CPU, gathering all T*K rows at once would allocate a fresh [T*K, D] tensor (often past
    glibc's mmap threshold, so page faults on every call) and a batched product opens an OpenMP
    region even for the tiny batches of a decode step; K gathers into a reused [T, D] buffer do
    neither. On a GPU, where each op is a kernel launch that the host pays for, one gather and one
    reduction do it (`_one_shot`), whatever K.
    """
    num_tokens, top_k = row_TK.shape
    if _one_shot(src_ND):
        src_TKD = src_ND.index_select(0, row_TK.reshape(-1)).view(num_tokens, top_k, -1)
        if weight_TK is None:
            return src_TKD.sum(1)
        return (src_TKD * weight_TK[:, :, None]).sum(1)  # (a [T, 1, K] x [T, K, D] bmm is slow on GPUs)
    out_TD = src_ND.new_empty(num_tokens, src_ND.shape[1])
    torch.index_select(src_ND, 0, row_TK[:, 0], out=out_TD)
    if weight_TK is not None:
        out_TD.mul_(weight_TK[:, 0:1])
    buf_TD = src_ND.new_empty(out_TD.shape) if top_k > 1 else None
    for k in range(1, top_k):
        torch.index_select(src_ND, 0, row_TK[:, k], out=buf_TD)
        if weight_TK is None:
            out_TD.add_(buf_TD)
        else:
            out_TD.addcmul_(buf_TD, weight_TK[:, k : k + 1])
    return out_TD


def _one_shot(t: Tensor) -> bool:
    """Whether gathers of K rows per token run as one op rather than K (off the CPU: see _sum_gathered)."""
    return t.device.type != "cpu"


class _GatherRows(torch.autograd.Function):
    """x_ND = x_TD[token_N] where every token has exactly K rows; backward without a scatter-add.

    The gradient of token t is the sum of its K rows; `row_A` (token-major) lists them, so the
    backward is K gathers instead of a serial `index_add`.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_N: Tensor, row_A: Tensor, top_k: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(row_A)
        ctx.top_k = top_k
        return x_TD.index_select(0, token_N)  # [N, D]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND: Tensor):  # type: ignore[override]
        (row_A,) = ctx.saved_tensors
        row_TK = row_A.view(-1, ctx.top_k)
        return _sum_gathered(grad_ND.contiguous(), row_TK), None, None, None


class _CombineTopK(torch.autograd.Function):
    """out_TD[t] = sum_k weight_TK[t, k] * y_ND[row of (t, k)]: K gathers, no scatter-add."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, weight_A: Tensor, row_A: Tensor, perm_N: Tensor, top_k: int) -> Tensor:  # type: ignore[override]
        row_TK = row_A.view(-1, top_k)
        weight_TK = weight_A.to(y_ND.dtype).view(row_TK.shape)
        ctx.save_for_backward(y_ND if ctx.needs_input_grad[1] else None, weight_TK, row_TK, perm_N)
        ctx.weight_dtype = weight_A.dtype
        return _sum_gathered(y_ND, row_TK, weight_TK)  # [T, D]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD: Tensor):  # type: ignore[override]
        y_ND, weight_TK, row_TK, perm_N = ctx.saved_tensors
        top_k = row_TK.shape[1]
        grad_TD = grad_TD.contiguous()
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:  # row n of y came from token perm_N[n] // K with weight w[perm_N[n]]
            weight_N = weight_TK.reshape(-1).index_select(0, perm_N)
            token_N = perm_N.div(top_k, rounding_mode="floor")
            grad_y = grad_TD.index_select(0, token_N).mul_(weight_N[:, None])  # [N, D]
        if ctx.needs_input_grad[1] and _one_shot(y_ND):  # every (t, k) dot product at once
            y_TKD = y_ND.index_select(0, row_TK.reshape(-1)).view(*row_TK.shape, -1)
            grad_w = (y_TKD * grad_TD[:, None, :]).sum(-1).reshape(-1).to(ctx.weight_dtype)
        elif ctx.needs_input_grad[1]:
            grad_TK = weight_TK.new_empty(weight_TK.shape)
            buf_TD = grad_TD.new_empty(grad_TD.shape)
            for k in range(top_k):
                torch.index_select(y_ND, 0, row_TK[:, k], out=buf_TD)
                torch.sum(buf_TD.mul_(grad_TD), dim=1, out=grad_TK[:, k])
            grad_w = grad_TK.reshape(-1).to(ctx.weight_dtype)
        return grad_y, grad_w, None, None, None


def inverse_permutation(perm_N: Tensor) -> Tensor:
    """row_A with row_A[perm_N[n]] = n: the sorted row of every assignment."""
    return torch.empty_like(perm_N).scatter_(0, perm_N, torch.arange(perm_N.shape[0], device=perm_N.device))


def gather_token_rows(x_TD: Tensor, token_N: Tensor, row_A: Tensor, top_k: int) -> Tensor:
    """x_ND = x_TD[token_N] for a dropless token-major routing (every token has K rows, listed by
    row_A), with a backward of K gathers instead of a scatter-add."""
    return _GatherRows.apply(x_TD, token_N, row_A, top_k)


def combine_top_k(y_ND: Tensor, weight_A: Tensor, row_A: Tensor, perm_N: Tensor, top_k: int) -> Tensor:
    """out_TD[t] = sum_k weight_A[t * K + k] * y_ND[row_A[t * K + k]], with gathers in both
    directions (no scatter-add, no atomics)."""
    return _CombineTopK.apply(y_ND, weight_A, row_A, perm_N, top_k)


class LocalDispatcher:
    """Single-process dispatch: gather kept assignments in expert order, bring them home in combine."""

    def group_assignments(self, num_assignments: int) -> int:
        """Assignments that share each expert's capacity: on one process, its own."""
        return num_assignments

    def dispatch(
        self,
        x_TD: Tensor,
        routing: Routing,
        valid_A: Tensor | None,
        capacity: int | None,
        order_A: Tensor | None,
        num_experts: int,
        gather: bool = True,
    ) -> tuple[Tensor | None, list[int], DispatchState]:
        """-> rows `[N, D]` grouped by expert, rows per expert, state for combine.

        `gather=False` only plans: the rows are left to the caller (None is returned for them), who
        reads `state.token_N` and `state.weight_N` (the fused inference path of the MoE layer).
        """
        slots = assign_slots(routing.expert_idx_A, valid_A, num_experts, capacity, order_A)
        num_tokens, top_k = x_TD.shape[0], routing.top_k
        weight_N = routing.weight_A.index_select(0, slots.perm_N)
        dropless_token_major = (
            routing.token_idx_A is None and top_k > 0 and sum(slots.counts) == routing.num_assignments
        )
        if dropless_token_major:
            token_N = slots.perm_N.div(top_k, rounding_mode="floor")
        else:
            token_N = routing.token_index()[slots.perm_N]
        if not gather:
            return (
                None,
                slots.counts,
                DispatchState(token_N, weight_N, num_tokens, slots.routed_E, slots.kept_E),
            )
        if dropless_token_major:
            perm_N = slots.perm_N
            row_A = inverse_permutation(perm_N)
            x_ND = gather_token_rows(x_TD, token_N, row_A, top_k)
            state = DispatchState(
                token_N,
                weight_N,
                num_tokens,
                slots.routed_E,
                slots.kept_E,
                top_k,
                row_A,
                perm_N,
                routing.weight_A,
            )
            return x_ND, slots.counts, state
        x_ND = x_TD.index_select(0, token_N)  # [N, D]
        return x_ND, slots.counts, DispatchState(token_N, weight_N, num_tokens, slots.routed_E, slots.kept_E)

    def combine(self, y_ND: Tensor, state: DispatchState) -> Tensor:
        """[T, D] = sum over a token's kept assignments of weight * expert output."""
        if state.row_A is not None:
            return combine_top_k(y_ND, state.weight_A, state.row_A, state.perm_N, state.top_k)
        weighted_ND = y_ND * state.weight_N.to(y_ND.dtype)[:, None]
        out_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[1])
        return out_TD.index_add(0, state.token_N, weighted_ND)
