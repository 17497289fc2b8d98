"""Shard a model's MoE layers over an EP group, and checkpoints that ignore the sharding.

`shard_model(model, layout)` turns every `MoE` layer into an expert-parallel one in place: its
`experts` bank is replaced by an `ExpertBank` holding only this rank's E/P experts (slices
`[ep_rank*L : (ep_rank+1)*L]` of every `[E, ...]` tensor, L = E/P) and its `dispatcher` by an
`AllToAllDispatcher` over the EP group. Router, shared experts and everything outside the MoE
layers stay whole (replicated, data parallel).

Checkpoints are always in the single-process layout, so any EP size can read any checkpoint:
  - `gather_full_state_dict(model, layout)` all-gathers the expert shards over the EP group and
    returns the state dict of the unsharded model (full `[E, ...]` expert tensors) on every rank;
  - `load_sharded(model, state_dict, layout)` loads such a state dict into a sharded model,
    slicing out the local experts. EP 2 -> 1 and 1 -> 4 round trips give identical outputs;
  - `gather_optimizer_state` / `load_sharded_optimizer_state` do the same for the optimizer's
    per-parameter state (Adam moments), so a run can resume under another EP size.

Names stay those of the unsharded model (`...ffn.experts.w_in_EDF`), only the leading dim shrinks.

Shape legend: E experts of a layer, L local experts (E/P), P EP size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.moe.experts import ExpertBank
from moekit.moe.layer import MoE
from moekit.parallel.dispatch import AllToAllDispatcher
from moekit.parallel.groups import ParallelLayout, check_divisible
from moekit.parallel.losses import GlobalLosses


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """Every MoE layer of `model` by qualified name (a bare MoE is named "")."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of the routed experts' parameters (sharded over EP, reduced over EDP)."""
    return {
        f"{_prefix(layer_name)}experts.{pname}"
        for layer_name, layer in moe_layers(model).items()
        for pname, _ in layer.experts.named_parameters()
    }


def is_sharded(layer: MoE) -> bool:
    return isinstance(layer.dispatcher, AllToAllDispatcher)


def _sharded_expert_keys(model: nn.Module) -> dict[str, MoE]:
    """State-dict key -> its layer, for the expert tensors of sharded layers."""
    keys = {}
    for layer_name, layer in moe_layers(model).items():
        if is_sharded(layer):
            for pname, _ in layer.experts.named_parameters():
                keys[f"{_prefix(layer_name)}experts.{pname}"] = layer
    return keys


def _local_bank(full: ExpertBank, experts: range) -> ExpertBank:
    bank = ExpertBank(
        len(experts),
        full.dim,
        full.hidden_dim,
        full.activation,
        bias=full.b_in_EF is not None,
        dropout=full.dropout.p if isinstance(full.dropout, nn.Dropout) else 0.0,
        is_glu=full.is_glu,
    )
    for key, value in vars(full).items():  # plain settings (e.g. the grouped-product strategy)
        if not key.startswith("_") and key not in ("num_experts", "training"):
            setattr(bank, key, value)
    with torch.no_grad():
        for name, param in bank.named_parameters():
            param.copy_(getattr(full, name)[experts.start : experts.stop])
    return bank.to(device=full.w_in_EDF.device, dtype=full.w_in_EDF.dtype)


def top_level_moe_layers(model: nn.Module) -> dict[str, MoE]:
    """The MoE layers of `model` that are not inside another MoE layer (hierarchical experts' inner
    layers run only on ranks whose outer expert got tokens)."""
    layers = moe_layers(model)
    return {
        name: layer
        for name, layer in layers.items()
        if not any(other != name and name.startswith(_prefix(other)) for other in layers)
    }


def shard_model(model: nn.Module, layout: ParallelLayout) -> nn.Module:
    """Make every MoE layer of `model` expert parallel over `layout.ep_group` (in place; returns model).

    Call it on identically initialized (or identically loaded) full models on every rank. With
    several ranks every top-level MoE layer also gets `GlobalLosses` (its losses become those of
    the batch of all ranks, EP or not). With ep == 1 the experts and the local dispatcher (the EP-1
    all-to-all) stay as they are; in one process the model is left as is.
    """
    layers = moe_layers(model) if layout.ep > 1 else {}
    for name, layer in layers.items():
        if not isinstance(layer.experts, ExpertBank):
            raise ValueError(
                f"MoE layer {name or '<root>'} has {type(layer.experts).__name__} experts: expert "
                "parallelism shards ExpertBank experts only (not hierarchical MoE)"
            )
        check_divisible(layer.config.num_experts, layout.ep, layout.world_size)
        if is_sharded(layer):
            raise ValueError(f"MoE layer {name or '<root>'} is already sharded")
    for layer in layers.values():
        experts = layout.local_experts(layer.config.num_experts)
        layer.experts = _local_bank(layer.experts, experts)
        layer.dispatcher = AllToAllDispatcher(
            layout.ep_group, layer.config.num_experts, layer.config.drop_policy
        )
    if layout.distributed:
        for layer in top_level_moe_layers(model).values():
            layer.loss_reduction = GlobalLosses(layout.world_size)
    return model


def gather_experts(tensors: dict[str, Tensor], model: nn.Module, layout: ParallelLayout) -> dict[str, Tensor]:
    """Name -> tensor with every sharded expert tensor all-gathered to its full [E, ...] form.

    Keys are parameter/state-dict names of `model`; others pass through. Use it for the model's
    state dict and for optimizer moments keyed by parameter name. A collective over the EP group:
    every rank calls it with the same keys.
    """
    sharded = _sharded_expert_keys(model)
    return {key: _gather_shards(value, layout) if key in sharded else value for key, value in tensors.items()}


def _gather_shards(local: Tensor, layout: ParallelLayout) -> Tensor:
    """[L, ...] on every EP rank -> [E, ...] (EP-rank order is expert order)."""
    parts = [torch.empty_like(local) for _ in range(layout.ep)]
    dist.all_gather(parts, local.detach().contiguous(), group=layout.ep_group)
    return torch.cat(parts, dim=0)


def slice_experts(tensors: dict[str, Tensor], model: nn.Module, layout: ParallelLayout) -> dict[str, Tensor]:
    """The inverse of `gather_experts`: full [E, ...] expert tensors -> this rank's [L, ...] slices."""
    local = dict(tensors)
    for key, layer in _sharded_expert_keys(model).items():
        if key not in local:
            continue  # load_state_dict reports it when strict
        num_experts = layer.config.num_experts
        if local[key].shape[0] != num_experts:
            raise ValueError(
                f"{key} has {local[key].shape[0]} experts in the checkpoint but the layer has {num_experts}: "
                "checkpoints hold the full single-process layout (see gather_full_state_dict)"
            )
        experts = layout.local_experts(num_experts)
        local[key] = local[key][experts.start : experts.stop]
    return local


def gather_full_state_dict(model: nn.Module, layout: ParallelLayout) -> dict[str, Tensor]:
    """State dict of the unsharded model (full [E, ...] expert tensors, detached CPU copies), on every
    rank. A collective over the EP group: every rank must call it."""
    full = gather_experts(model.state_dict(), model, layout)
    return {key: value.detach().cpu().clone() for key, value in full.items()}


def load_sharded(model: nn.Module, state_dict: dict[str, Any], layout: ParallelLayout, strict: bool = True):
    """Load a single-process-layout state dict into a (possibly) sharded model.

    Expert tensors of sharded layers are sliced to this rank's experts; everything else loads as is.
    Returns what `load_state_dict` returns (missing and unexpected keys when strict=False).
    """
    return model.load_state_dict(slice_experts(state_dict, model, layout), strict=strict)


def _optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, str]:
    """Optimizer state index (as in `optimizer.state_dict()`) -> parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: names[id(p)] for i, p in enumerate(params) if id(p) in names}


def gather_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, layout: ParallelLayout
) -> dict:
    """`optimizer.state_dict()` in the single-process layout: the per-parameter state tensors of
    sharded experts (Adam moments, [L, ...]) all-gathered to [E, ...]. Every rank calls it."""
    sd = optimizer.state_dict()
    names = _optimizer_param_names(optimizer, model)
    sharded = _sharded_expert_keys(model)
    params = dict(model.named_parameters())
    state = {}
    for index, per_param in sd["state"].items():  # the same order on every rank
        name = names.get(index)
        state[index] = {
            k: _gather_shards(v, layout) if name in sharded and _like(v, params[name]) else v
            for k, v in per_param.items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def load_sharded_optimizer_state(
    optimizer: torch.optim.Optimizer, state_dict: dict, model: nn.Module, layout: ParallelLayout
) -> None:
    """Load a single-process-layout optimizer state dict, slicing expert state to the local experts."""
    names = _optimizer_param_names(optimizer, model)
    sharded = _sharded_expert_keys(model)
    state = {}
    for index, per_param in state_dict["state"].items():
        name = names.get(int(index))
        if name not in sharded:
            state[index] = per_param
            continue
        num_experts = sharded[name].config.num_experts
        experts = layout.local_experts(num_experts)
        state[index] = {  # clones: a view would keep the full [E, ...] moments alive
            k: v[experts.start : experts.stop].clone() if _is_expert_state(v, num_experts) else v
            for k, v in per_param.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


def _is_expert_state(value: Any, num_experts: int) -> bool:
    return torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == num_experts


def _like(value: Any, param: Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape
