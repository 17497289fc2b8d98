"""Gradient, loss and routing-statistics reductions for data x expert parallel training.

The objective of a step is the mean over the W ranks of each rank's local loss (its own micro
batch's cross-entropy, a mean over its tokens, plus the aux and z losses, which `GlobalLosses`
makes those of the batch of all ranks, the same value on every rank; moekit/parallel/losses.py).
`sync_gradients` turns every rank's local gradients into the gradient of that objective:

  - non-expert parameters (replicated on all W ranks): all-reduce SUM over the world, / W;
  - expert parameters (held by the Q = W/P ranks of one expert-data-parallel group): during the
    backward they already received the gradient of every loss of their EP group (the reverse
    all-to-all brings it home), so an all-reduce SUM over the EDP group covers each of the W
    losses exactly once; divide by W, not by Q. Averaging over the EDP group (/ Q) would scale
    expert gradients up by P, a classic expert-parallel bug.

The first half can be torch's DistributedDataParallel instead (`data_parallel`, what `moekit
train` uses by default): DDP averages the non-expert gradients over the world in buckets while
the backward still runs, on a process group of its own (`layout.dp_group`; its all-reduces run on
a background thread next to the MoE all-to-alls of the autograd thread, and a communicator must
not be shared between threads whose collectives could interleave differently on different ranks).
The expert parameters are left out of DDP and `sync_gradients(..., dense=False)` reduces them as
above. Without DDP, `sync_gradients` does both halves in one call after the last accumulation
micro step (no `no_sync` needed, no overlap with the backward).

Clip with `clip_grad_norm` (the norm over all experts of the EP group), not torch's, which sees
only the local expert shard and gives each rank a different clip factor.

The aux loss is never scaled by the world size or by accumulation steps: every rank adds the aux
loss of the global batch (its gradient is the rank's share of it, times W; the mean above divides
by W again), so the step's aux loss and its gradient are those of one process on that batch. For
logging, `mean_over_ranks` averages a scalar and `reduce_stats` sums the per-expert counts.
The sigmoid-bias router's bias must stay identical on all ranks: update it from `global_load`.

With a single-process layout every function here is a no-op (or the identity).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moekit.moe import losses as L
from moekit.moe.layer import MoEStats
from moekit.parallel.dispatch import collective_device
from moekit.parallel.groups import ParallelLayout
from moekit.parallel.shard import expert_parameter_names


def _sum_and_scale(tensors: list[Tensor], scale: float, group) -> None:
    """In place: every tensor <- scale * (sum over `group`), one flat all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        group_tensors = by_dtype[dtype]
        flat = _flatten_dense_tensors(group_tensors)
        dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        for t, reduced in zip(group_tensors, _unflatten_dense_tensors(flat, group_tensors)):
            t.copy_(reduced)


def sync_gradients(model: nn.Module, layout: ParallelLayout, dense: bool = True) -> None:
    """Make `.grad` the gradient of the mean of all ranks' losses (call after the backward).

    dense=False: only the expert parameters (DistributedDataParallel, `data_parallel`, has
    averaged the others during the backward). Every rank must call it. A trainable parameter
    without a gradient gets zeros, so that all ranks reduce the same tensors (a missing gradient
    on one rank would hang the others).
    """
    if not layout.distributed:
        return
    expert_names = expert_parameter_names(model)
    replicated, experts = [], []
    for name, param in model.named_parameters():
        is_expert = name in expert_names
        if not param.requires_grad or not (dense or is_expert):
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        (experts if is_expert else replicated).append(param.grad)
    scale = 1.0 / layout.world_size
    _sum_and_scale(replicated, scale, group=None)
    _sum_and_scale(experts, scale, group=layout.edp_group)


def data_parallel(model: nn.Module, layout: ParallelLayout) -> nn.Module:
    """`model` wrapped in DistributedDataParallel over its replicated parameters; `model` itself
    for one process. Call it after `shard_model`, run the training forward through the wrapper
    (under its `no_sync()` for all but the last micro batch of an accumulated step), then
    `sync_gradients(model, layout, dense=False)` for the expert parameters, which DDP leaves out.

    DDP averages over `layout.dp_group` (all ranks, a communicator of its own). Buffers are not
    broadcast: the sigmoid-bias router's bias is kept equal on every rank by `global_load`. Every
    replicated trainable parameter must get a gradient in every backward (as in any MoE model
    here: routers, shared experts, attention, norms, embeddings all do).
    """
    if not layout.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ignored = sorted(expert_parameter_names(model))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, process_group=layout.dp_group, broadcast_buffers=False)


def clip_grad_norm(model: nn.Module, max_norm: float, layout: ParallelLayout) -> Tensor:
    """Global-norm clipping after `sync_gradients`: the norm of the whole unsharded gradient.

    `torch.nn.utils.clip_grad_norm_` would see only this rank's expert shard, so ranks would
    clip by different factors and their replicated weights would drift apart. Here the expert
    part of the squared norm is summed over the EP group (the dense part is already identical on
    every rank); every rank gets the same norm, the one of a single process. Returns the norm.
    """
    expert_names = expert_parameter_names(model)
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grads.append(param.grad)
        sq = param.grad.detach().double().square().sum().cpu()
        if name in expert_names:
            expert_sq += sq
        else:
            dense_sq += sq
    if layout.distributed and layout.ep > 1:
        expert_sq = expert_sq.to(collective_device(layout.ep_group))
        dist.all_reduce(expert_sq, group=layout.ep_group)
    total = (dense_sq + expert_sq.cpu()).sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
    return total.float()


def mean_over_ranks(value: Tensor, layout: ParallelLayout) -> Tensor:
    """Mean of a (detached) tensor over all ranks, for logging losses."""
    value = value.detach().clone()
    if layout.distributed:
        dist.all_reduce(value)
        value /= layout.world_size
    return value


def global_load(routed_per_expert: Tensor, layout: ParallelLayout) -> Tensor:
    """[E] routed assignments per expert summed over all ranks (feed it to `MoE.update_bias`)."""
    load = routed_per_expert.detach().clone()
    if layout.distributed:
        dist.all_reduce(load)
    return load


def reduce_stats(stats: MoEStats, layout: ParallelLayout) -> MoEStats:
    """One layer's routing statistics over all ranks: counts summed, ratios recomputed.

    The router entropy is the mean of the ranks' means (exact for equal real tokens per rank).
    """
    if not layout.distributed:
        return stats
    num_experts = stats.tokens_per_expert.numel()
    packed = torch.cat(
        [
            stats.tokens_per_expert.float(),
            stats.routed_per_expert.float(),
            stats.router_entropy.view(1).float(),
        ]
    )
    dist.all_reduce(packed)
    kept_E, routed_E = packed[:num_experts], packed[num_experts : 2 * num_experts]
    total = routed_E.sum()
    dropped = torch.where(total > 0, 1.0 - kept_E.sum() / total.clamp_min(1.0), total.new_zeros(()))
    return MoEStats(
        tokens_per_expert=kept_E,
        routed_per_expert=routed_E,
        dropped_fraction=dropped,
        router_entropy=packed[-1] / layout.world_size,
        max_load_violation=L.max_load_violation(routed_E),
    )
