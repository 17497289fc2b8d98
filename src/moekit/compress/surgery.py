"""Model surgery on expert banks: rebuild a model with a new MoE layer config and new expert tensors.

Extraction, pruning and merging all keep every non-expert weight and change only the experts of
each MoE layer and the router rows that belong to them. In every router and expert bank the expert
index is dimension 0 of the tensors that have one (gate.weight [E, D], gate.bias [E], noise.weight,
expert_bias, w_in_EDF, w_out_EFD, b_in_EF, b_out_ED), so one rule serves every router: the
per-expert tensors of a layer are the `router.*` and `experts.*` entries whose first dimension is E.
Shared experts are kept as they are; hierarchical MoE layers are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.moe import ExpertBank, MoE, MoEConfig


def moe_layers_named(model: nn.Module) -> list[tuple[str, MoE]]:
    """(state-dict prefix, layer) of every MoE layer, in module order."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    for name, m in layers:
        if m.config.inner is not None:
            raise ValueError(f"{name}: hierarchical MoE layers (MoEConfig.inner) are not supported here")
    return layers


def per_expert_tensors(moe: MoE) -> dict[str, Tensor]:
    """The layer's tensors indexed by expert on dimension 0 (router rows and expert weights)."""
    if not isinstance(moe.experts, ExpertBank):
        raise ValueError(
            f"the experts are {getattr(moe.experts, 'method', type(moe.experts).__name__)}-quantized: "
            "extract, prune or merge the float checkpoint, then quantize"
        )
    num_experts = moe.config.num_experts
    return {
        name: t
        for name, t in moe.state_dict().items()
        if name.startswith(("router.", "experts.")) and t.ndim >= 1 and t.shape[0] == num_experts
    }


def rebuild(
    model: nn.Module, moe: MoEConfig, layer_tensors: Callable[[str, MoE], dict[str, Tensor]]
) -> nn.Module:
    """A new model of the same class with MoE layer config `moe`; `layer_tensors(prefix, layer)`
    gives the new per-expert tensors of each layer (names relative to the layer). Everything else
    is copied; the result is in eval mode on the CPU."""
    cfg = dataclasses.replace(model.config, moe=moe)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for prefix, layer in moe_layers_named(model):
        for name, t in layer_tensors(prefix, layer).items():
            state[f"{prefix}.{name}"] = t.detach().cpu()
    new = type(model)(cfg)
    expected = new.state_dict()
    for key, t in expected.items():
        if key not in state or tuple(state[key].shape) != tuple(t.shape):
            got = tuple(state[key].shape) if key in state else "nothing"
            raise ValueError(f"surgery produced {got} for {key!r}; the new model expects {tuple(t.shape)}")
    with torch.no_grad():
        new.load_state_dict({k: state[k] for k in expected})
    return new.eval()
