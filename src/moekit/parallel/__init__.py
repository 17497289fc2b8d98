"""Expert parallelism on torch.distributed: process groups, all-to-all dispatch, sharding, reductions.

    layout = init_parallel(ep, config)          # EP and expert-data-parallel groups, validated
    shard_model(model, layout)                  # MoE layers keep E/P experts, all-to-all dispatch;
                                                # their losses become those of all ranks' batch
    loss.backward(); sync_gradients(model, layout); optimizer.step()
    # or: ddp = data_parallel(model, layout); ddp(x).loss.backward()   # DDP averages the
    #     sync_gradients(model, layout, dense=False); optimizer.step()  # replicated parameters
    state = gather_full_state_dict(model, layout)   # single-process layout, loads under any EP size
    load_sharded(model, state, layout)

Design, communication model and the exact equivalence with one process: docs/expert_parallel.md.
"""

from moekit.parallel.dispatch import AllToAllDispatcher, AllToAllState, Traffic, expected_traffic
from moekit.parallel.groups import ParallelLayout, check_consistent, config_digest, init_parallel
from moekit.parallel.losses import GlobalLosses
from moekit.parallel.shard import (
    expert_parameter_names,
    gather_experts,
    gather_full_state_dict,
    gather_optimizer_state,
    load_sharded,
    load_sharded_optimizer_state,
    moe_layers,
    shard_model,
    slice_experts,
    top_level_moe_layers,
)
from moekit.parallel.sync import (
    clip_grad_norm,
    data_parallel,
    global_load,
    mean_over_ranks,
    reduce_stats,
    sync_gradients,
)

__all__ = [
    "AllToAllDispatcher",
    "AllToAllState",
    "GlobalLosses",
    "ParallelLayout",
    "Traffic",
    "check_consistent",
    "clip_grad_norm",
    "config_digest",
    "data_parallel",
    "expected_traffic",
    "expert_parameter_names",
    "gather_experts",
    "gather_full_state_dict",
    "gather_optimizer_state",
    "global_load",
    "init_parallel",
    "load_sharded",
    "load_sharded_optimizer_state",
    "mean_over_ranks",
    "moe_layers",
    "reduce_stats",
    "shard_model",
    "slice_experts",
    "top_level_moe_layers",
    "sync_gradients",
]
