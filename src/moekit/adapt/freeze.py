"""Freezing strategies for fine-tuning: which parameters stop training, chosen by name.

Parameters fall into four kinds, found by module type rather than by parameter name, so that every
model family (decoder, encoder-decoder, dense layers between MoE layers) classifies the same way:

    expert     the weights of MoE layers' expert banks: routed experts (`moe.experts`, hierarchical
               experts with everything inside them) and shared experts (`moe.shared`)
    router     the routers' gates of MoE layers (`moe.router`)
    attention  self- and cross-attention modules of every block (q/k/v/o projections, q/k norms)
               and the T5 relative position bias tables
    other      everything else: embeddings, LM head, RMSNorms, dense FFNs

Strategies (ST-MoE section 5 compares several of these):

    none        nothing frozen
    experts     expert weights
    router      routers only (the sigmoid_bias router's non-gradient bias is held too)
    moe         MoE layers: experts + routers
    non_expert  every parameter that is not an expert weight (routers included): only experts train
    non_moe     every parameter outside MoE layers: experts and routers train (ST-MoE's "MoE only")
    attention   attention
    all         everything (LoRA adapters, added afterwards, are then the only trainable weights)

Freezing sets `requires_grad=False`; the trainer's optimizer only receives trainable parameters, so
frozen weights are not even weight-decayed. Tied weights are one parameter and are classified once.
"""

from __future__ import annotations

from torch import Tensor, nn

from moekit.model.layers import RelativePositionBias
from moekit.moe import MoE

KINDS = ("expert", "router", "attention", "other")
STRATEGIES: dict[str, frozenset[str]] = {  # strategy -> the parameter kinds it freezes
    "none": frozenset(),
    "experts": frozenset({"expert"}),
    "router": frozenset({"router"}),
    "moe": frozenset({"expert", "router"}),
    "non_expert": frozenset({"router", "attention", "other"}),
    "non_moe": frozenset({"attention", "other"}),
    "attention": frozenset({"attention"}),
    "all": frozenset(KINDS),
}
ATTENTION_ATTRS = ("attn", "cross_attn")  # Block attributes holding attention modules


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown freezing strategy {strategy!r}: expected one of {list(STRATEGIES)}")
    return strategy


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name (as `named_parameters` lists it) -> its kind, one of KINDS."""
    kind_of_id: dict[int, str] = {}

    def mark(module: nn.Module | None, kind: str) -> None:
        if module is not None:
            for p in module.parameters():
                kind_of_id.setdefault(id(p), kind)

    for module in model.modules():
        if isinstance(module, MoE) and not any(id(p) in kind_of_id for p in module.parameters()):
            mark(module.experts, "expert")  # hierarchical inner MoEs included (they are experts)
            mark(module.shared, "expert")
            mark(module.router, "router")
        elif isinstance(module, RelativePositionBias):
            mark(module, "attention")
        for attr in ATTENTION_ATTRS:
            sub = getattr(module, attr, None)
            if isinstance(sub, nn.Module) and not isinstance(module, MoE):
                mark(sub, "attention")
    return {name: kind_of_id.get(id(p), "other") for name, p in model.named_parameters()}


def frozen_parameter_names(model: nn.Module, strategy: str) -> list[str]:
    """Names of the parameters `strategy` freezes, in `named_parameters` order."""
    kinds = STRATEGIES[check_strategy(strategy)]
    return [name for name, kind in parameter_kinds(model).items() if kind in kinds]


def freeze(model: nn.Module, strategy: str) -> list[str]:
    """Make exactly the parameters `strategy` names untrainable (all others trainable); returns their names."""
    frozen = set(frozen_parameter_names(model, strategy))
    if not frozen and strategy != "none":
        raise ValueError(f"freezing strategy {strategy!r} names no parameter of this model (is it dense?)")
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return [name for name, _ in model.named_parameters() if name in frozen]


def frozen_router_buffers(model: nn.Module, strategy: str) -> list[Tensor]:
    """Non-gradient router state that must hold still when the strategy freezes routers
    (the sigmoid_bias router's expert bias, which the trainer updates after every step)."""
    if "router" not in STRATEGIES[check_strategy(strategy)]:
        return []
    return [b for m in model.modules() if isinstance(m, MoE) for b in m.router.buffers()]
