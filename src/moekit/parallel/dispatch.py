"""AllToAllDispatcher: expert-parallel dispatch and combine with variable-size all-to-alls.

Same interface as `moe.dispatch.LocalDispatcher`, so `MoE` runs unchanged with a bank that holds
only this rank's E/P experts. Follow one layer call on EP rank r of P:

  1. choose the kept assignments (all valid ones when dropless; see "capacity" below) and sort
     them by expert: experts are sharded contiguously, so the rows for EP rank p are one block;
  2. exchange per-expert row counts with one `all_to_all_single` of E int64 ([P, E/P] each way);
  3. send the token rows with a variable-size `all_to_all_single` (rows to p = its experts' counts);
  4. reorder the received rows from source-major to expert-major, so the local bank sees
     `counts[l]` consecutive rows per local expert l, exactly as on one process;
  5. combine: undo the reorder, send the expert outputs back with the reverse all-to-all, and
     scatter-add them weighted into the token rows (the same code as the local combine).
Both exchanges are `_AllToAll` autograd functions whose backward is the reverse exchange.

Capacity is per expert over the whole EP group: C = ceil(CF * k * T_group / E) with T_group the real
tokens of all P ranks (the layer asks `group_assignments`). Which assignments win the C slots is
decided exactly as one process would decide it on the batch concatenated in EP-rank order: every
rank all-gathers (expert, weight) of every assignment, builds the single-process priority order
(`moe.dispatch.priority_order`: all first choices before any second choice, then by position or by
router weight), runs `assign_slots` on it and keeps its own kept assignments. All ranks compute
the same decision from the same gathered data; the gathered metadata costs 16 bytes per assignment
per rank (see docs/expert_parallel.md). Expert-choice routing picks its tokens per rank (dropless).

Every rank enters every collective, also when it sends or receives no rows; a rank whose experts
get no tokens runs its bank on zero rows, and the grouped product gives exact zero gradients.

`traffic` counts the bytes this rank sends to other ranks (its own chunk is a local copy);
`expected_traffic` is the communication model it is checked against.

Shape legend: T tokens, D dim, E experts, L local experts (E/P), P EP ranks, A assignments,
N kept rows sent by this rank, R rows received by this rank, G assignments of the whole EP group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.moe.dispatch import DispatchState, LocalDispatcher, assign_slots, priority_order
from moekit.moe.grouped import expert_of_rows
from moekit.moe.losses import expert_counts
from moekit.moe.router import Routing

COUNT_BYTES = 8  # int64 counts and sizes
META_BYTES = 16  # float64 (expert, weight) per assignment, gathered in capacity mode


@dataclass
class Traffic:
    """Bytes this rank sent to other ranks, summed over calls (reset it once per step)."""

    dispatch_bytes: int = 0  # token rows sent to the experts' owners (forward)
    combine_bytes: int = 0  # expert outputs sent back to the tokens' owners (forward)
    backward_bytes: int = 0  # gradients of both exchanges (backward)
    metadata_bytes: int = 0  # per-expert counts; capacity mode: token count, sizes, (expert, weight)
    calls: int = 0  # forward dispatches

    @property
    def token_bytes(self) -> int:
        return self.dispatch_bytes + self.combine_bytes + self.backward_bytes

    @property
    def total_bytes(self) -> int:
        return self.token_bytes + self.metadata_bytes

    def reset(self) -> None:
        self.dispatch_bytes = self.combine_bytes = self.backward_bytes = self.metadata_bytes = 0
        self.calls = 0


def expected_traffic(
    num_tokens: int,
    dim: int,
    top_k: int,
    ep: int,
    num_experts: int,
    elem_bytes: int = 4,
    capacity_factor: float | None = None,
    backward: bool = True,
) -> Traffic:
    """Bytes one rank sends for one MoE layer call under perfectly balanced routing.

    Balanced: each rank's k*T assignments are spread evenly over the E experts, so (P-1)/P of its
    rows leave the rank, and it receives as many as it sends. With capacity the kept share is
    min(1, CF) (exact when CF >= 1: nothing is dropped). Derivation in docs/expert_parallel.md.
    """
    kept_share = 1.0 if capacity_factor is None else min(1.0, capacity_factor)
    rows_off_rank = round(top_k * num_tokens * kept_share * (ep - 1) / ep)
    row_bytes = dim * elem_bytes
    metadata = COUNT_BYTES * (num_experts // ep) * (ep - 1)
    if capacity_factor is not None:  # token-count all-reduce, sizes and (expert, weight) all-gathers
        metadata += (2 * COUNT_BYTES + META_BYTES * top_k * num_tokens) * (ep - 1)
    one_way = rows_off_rank * row_bytes
    return Traffic(one_way, one_way, 2 * one_way if backward else 0, metadata, 1)


def collective_device(group=None) -> torch.device:
    """Where small bookkeeping tensors for `group`'s collectives live (NCCL needs CUDA, gloo CPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _off_rank(rows: list[int], rank: int) -> int:
    return sum(rows) - rows[rank]


def _exchange(x_ND: Tensor, send_rows: list[int], recv_rows: list[int], group) -> Tensor:
    out_RD = x_ND.new_empty((sum(recv_rows), *x_ND.shape[1:]))
    dist.all_to_all_single(out_RD, x_ND.contiguous(), recv_rows, send_rows, group=group)
    return out_RD


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all of rows; backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x_ND, send_rows, recv_rows, group, traffic, rank):  # type: ignore[override]
        ctx.send_rows, ctx.recv_rows, ctx.group, ctx.traffic, ctx.rank = (
            send_rows,
            recv_rows,
            group,
            traffic,
            rank,
        )
        return _exchange(x_ND, send_rows, recv_rows, group)

    @staticmethod
    def backward(ctx, grad_RD):  # type: ignore[override]
        row_bytes = math.prod(grad_RD.shape[1:]) * grad_RD.element_size()
        ctx.traffic.backward_bytes += _off_rank(ctx.recv_rows, ctx.rank) * row_bytes
        grad_ND = _exchange(grad_RD, ctx.recv_rows, ctx.send_rows, ctx.group)
        return grad_ND, None, None, None, None, None


@dataclass
class AllToAllState:
    """The local combine's state for this rank's tokens, plus how the rows were exchanged."""

    local: DispatchState  # rows this rank sent: their tokens, weights; per-expert counts of its tokens
    send_rows: list[int]  # [P] rows this rank sends to each EP rank
    recv_rows: list[int]  # [P] rows this rank receives from each EP rank
    perm_R: Tensor  # [R] received row of every expert-major row

    @property
    def routed_E(self) -> Tensor:  # [E] this rank's valid assignments per expert before capacity
        return self.local.routed_E

    @property
    def kept_E(self) -> Tensor:  # [E] this rank's assignments per expert that ran
        return self.local.kept_E


class AllToAllDispatcher:
    """Dispatch over an EP group; this rank computes experts ep_rank*L .. ep_rank*L + L - 1."""

    def __init__(self, group, num_experts: int, drop_policy: str = "position", device=None):
        self.group = group
        self._device = torch.device(device) if device is not None else collective_device(group)
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by the EP group size {self.ep}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep
        self.drop_policy = drop_policy
        self.traffic = Traffic()
        self._local = LocalDispatcher()

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep={self.ep}, ep_rank={self.ep_rank}, experts={self.num_experts})"

    # ------------------------------------------------------------------ capacity
    def group_assignments(self, num_assignments: int) -> int:
        """Routed assignments of the whole EP group: they share each expert's capacity."""
        total = torch.tensor([num_assignments], dtype=torch.int64, device=self._device)
        dist.all_reduce(total, group=self.group)
        self.traffic.metadata_bytes += COUNT_BYTES * (self.ep - 1)
        return int(total)

    def _group_keep(self, routing: Routing, valid_A: Tensor | None, capacity: int) -> Tensor:
        """[A] bool: which of this rank's assignments win a slot, decided over the whole EP group."""
        num_experts = self.num_experts
        bucket_A = (
            routing.expert_idx_A
            if valid_A is None
            else routing.expert_idx_A.masked_fill(~valid_A, num_experts)
        )
        meta_A2 = torch.stack([bucket_A.double(), routing.weight_A.detach().double()], dim=1)
        sizes = self._all_gather(torch.tensor([meta_A2.shape[0]], dtype=torch.int64, device=meta_A2.device))
        sizes = [int(s) for s in sizes]
        padded = meta_A2.new_zeros(max(sizes), 2)
        padded[: meta_A2.shape[0]] = meta_A2
        gathered = self._all_gather(padded)
        # what this rank hands over: its size, and its metadata padded to the largest rank's
        self.traffic.metadata_bytes += (COUNT_BYTES + META_BYTES * padded.shape[0]) * (self.ep - 1)
        meta_G2 = torch.cat([g[:s] for g, s in zip(gathered, sizes)])
        bucket_G = meta_G2[:, 0].long()
        valid_G = bucket_G < num_experts
        # The concatenated routing is token-major over the concatenated batch, as on one process.
        group_routing = Routing(
            logits_TE=meta_G2.new_empty(0),
            probs_TE=meta_G2.new_empty(0),
            expert_idx_A=bucket_G,
            weight_A=meta_G2[:, 1],
            top_k=routing.top_k,
        )
        order_G = priority_order(group_routing, self.drop_policy)
        slots = assign_slots(bucket_G, valid_G, num_experts, capacity, order_G)
        keep_G = torch.zeros_like(valid_G)
        keep_G[slots.perm_N] = True
        offset = sum(sizes[: self.ep_rank])
        return keep_G[offset : offset + meta_A2.shape[0]].to(routing.expert_idx_A.device)

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        out = [torch.empty_like(t) for _ in range(self.ep)]
        dist.all_gather(out, t, group=self.group)
        return out

    # ------------------------------------------------------------------ dispatch / combine
    def dispatch(
        self,
        x_TD: Tensor,
        routing: Routing,
        valid_A: Tensor | None,
        capacity: int | None,
        order_A: Tensor | None,
        num_experts: int,
    ) -> tuple[Tensor, list[int], AllToAllState]:
        """-> rows `[R, D]` for the local experts (expert-major), rows per local expert, state."""
        if num_experts != self.num_experts:
            raise ValueError(f"dispatcher built for {self.num_experts} experts, layer has {num_experts}")
        ep, num_local = self.ep, self.num_local
        routed_E = expert_counts(routing.expert_idx_A, valid_A, num_experts)  # before capacity
        if capacity is not None:
            keep_A = self._group_keep(routing, valid_A, capacity)
            valid_A = keep_A if valid_A is None else valid_A & keep_A
        slots = assign_slots(routing.expert_idx_A, valid_A, num_experts, None, order_A)
        token_N = routing.token_index()[slots.perm_N]
        weight_N = routing.weight_A[slots.perm_N]

        send_counts_E = torch.tensor(
            slots.counts, dtype=torch.int64, device=x_TD.device
        )  # rank-major: [P, L] flattened
        recv_counts_E = torch.empty_like(send_counts_E)  # [P, L]: from source p, for my local experts
        dist.all_to_all_single(recv_counts_E, send_counts_E, group=self.group)
        self.traffic.metadata_bytes += COUNT_BYTES * num_local * (ep - 1)
        send_rows = send_counts_E.view(ep, num_local).sum(1).tolist()
        recv_counts_PL = recv_counts_E.view(ep, num_local)
        recv_rows = recv_counts_PL.sum(1).tolist()

        x_ND = x_TD[token_N]  # [N, D] sorted by expert = grouped by destination rank
        row_bytes = x_ND.shape[1] * x_ND.element_size()
        self.traffic.dispatch_bytes += _off_rank(send_rows, self.ep_rank) * row_bytes
        self.traffic.calls += 1
        x_RD = _AllToAll.apply(x_ND, send_rows, recv_rows, self.group, self.traffic, self.ep_rank)
        # Received rows are source-major ([p][l] blocks); the bank wants expert-major ([l][p]).
        local_expert_R = expert_of_rows(recv_counts_E.tolist(), x_RD.device) % num_local
        perm_R = torch.argsort(local_expert_R, stable=True)
        local = DispatchState(token_N, weight_N, x_TD.shape[0], routed_E, slots.kept_E)
        state = AllToAllState(local, send_rows, recv_rows, perm_R)
        return x_RD[perm_R], recv_counts_PL.sum(0).tolist(), state

    def combine(self, y_RD: Tensor, state: AllToAllState) -> Tensor:
        """[T, D] = sum over a token's kept assignments of weight * expert output."""
        inverse_R = torch.empty_like(state.perm_R)
        inverse_R[state.perm_R] = torch.arange(state.perm_R.numel(), device=state.perm_R.device)
        y_source_major_RD = y_RD[inverse_R]
        row_bytes = y_RD.shape[1] * y_RD.element_size()
        self.traffic.combine_bytes += _off_rank(state.recv_rows, self.ep_rank) * row_bytes
        y_ND = _AllToAll.apply(
            y_source_major_RD, state.recv_rows, state.send_rows, self.group, self.traffic, self.ep_rank
        )
        return self._local.combine(y_ND, state.local)
