"""Expert pruning and merging (`moekit prune`, `moekit merge`), planned from calibration data.

Both keep `keep` experts in every MoE layer (every layer of a model shares one MoEConfig):

  prune  keeps the `keep` most used experts (assignments on calibration data) and drops the rest,
         with their router rows. An expert no token uses can go without changing any output
         (exactly for routers whose weights do not renormalize over all experts, within float
         rounding for softmax top-k; not for Switch/norm_topk_prob=False, whose weights are
         softmax probabilities over all experts and lose the dropped experts' share).
  merge  (MC-SMoE, Li et al. 2024) also starts from the `keep` most used ("dominant") experts, then
         puts every other expert in the group of the dominant expert it is most similar to, and
         replaces each group by the usage-weighted average of its members' weights, after
         aligning their hidden units to the dominant expert's (align.py). Similarity:
           router  cosine of the experts' router-logit columns over the calibration tokens (MC-SMoE)
           output  cosine of the experts' outputs on the same calibration tokens
           weight  cosine of the flattened expert weights (needs no data)

The router keeps one row per group: the dominant expert's row ("dominant", MC-SMoE's choice and
the default) or the usage-weighted mean of the members' rows ("mean"). A merged group's exact
probability would be the logsumexp of its members' logits, which a linear gate cannot express;
keeping the dominant row routes to the group the tokens its dominant expert already won.

Shape legend: E experts, D model dim, H = 2F (GLU) or F, F expert hidden dim, T tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.compress.align import match_units, permute_units, unit_features
from moekit.compress.calibrate import LayerRecord
from moekit.compress.surgery import moe_layers_named, per_expert_tensors, rebuild
from moekit.moe import MoE

GROUPINGS = ("router", "output", "weight")
ROUTER_ROWS = ("dominant", "mean")
HIDDEN_UNIT_TENSORS = ("experts.w_in_EDF", "experts.w_out_EFD", "experts.b_in_EF")  # permuted by alignment


@dataclass
class LayerPlan:
    """New expert j of a layer is made of `groups[j]` (groups[j][0] the dominant one), averaged
    with coefficients `weights[j]` (summing to 1)."""

    groups: list[list[int]]
    weights: list[list[float]]


def check_keep(model: nn.Module, keep: int) -> None:
    moe = getattr(model.config, "moe", None)
    if moe is None:
        raise ValueError("the model has no MoE layers (moe=None): nothing to prune or merge")
    if not isinstance(keep, int) or keep > moe.num_experts or keep < 1:
        raise ValueError(f"--keep={keep} is invalid: expected 1 <= keep <= num_experts={moe.num_experts}")
    if keep < moe.top_k:
        raise ValueError(
            f"--keep={keep} is below top_k={moe.top_k}: every token needs top_k distinct experts"
        )
    if moe.router == "task" and moe.task_experts is not None:
        raise ValueError(
            "pruning or merging a fixed task_experts table is not supported: extract a task instead"
        )


def dominant_experts(usage_E: Tensor, keep: int) -> list[int]:
    """The `keep` most used experts (ties to the lower index), in index order."""
    order = sorted(range(usage_E.numel()), key=lambda e: (-float(usage_E[e]), e))
    return sorted(order[:keep])


def prune_plan(usage_E: Tensor, keep: int) -> LayerPlan:
    kept = dominant_experts(usage_E, keep)
    return LayerPlan([[e] for e in kept], [[1.0] for _ in kept])


def merge_plan(usage_E: Tensor, keep: int, similarity_EE: Tensor) -> LayerPlan:
    """Dominant experts by usage; every other expert joins its most similar dominant one."""
    dominant = dominant_experts(usage_E, keep)
    groups = {d: [d] for d in dominant}
    for e in range(usage_E.numel()):
        if e not in groups:
            best = max(dominant, key=lambda d: (float(similarity_EE[e, d]), -d))
            groups[best].append(e)
    plan_groups = [groups[d] for d in dominant]
    weights = []
    for members in plan_groups:
        use = torch.tensor([float(usage_E[m]) for m in members], dtype=torch.float64)
        use = use / use.sum() if use.sum() > 0 else torch.full_like(use, 1.0 / len(members))
        weights.append(use.tolist())
    return LayerPlan(plan_groups, weights)


def _cosine_matrix(v_EX: Tensor) -> Tensor:
    v = torch.nn.functional.normalize(v_EX.double(), dim=1)
    return v @ v.t()


@torch.no_grad()
def expert_similarity(layer: MoE, record: LayerRecord | None, grouping: str, max_tokens: int = 512) -> Tensor:
    """[E, E] cosine similarity of the layer's experts under `grouping` (see the module docstring)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"--grouping={grouping!r} is invalid: expected one of {list(GROUPINGS)}")
    bank = layer.experts
    if grouping == "weight":
        return _cosine_matrix(torch.cat([bank.w_in_EDF.flatten(1), bank.w_out_EFD.flatten(1)], dim=1))
    if record is None:
        raise ValueError(f"--grouping={grouping!r} needs calibration data, and the layer saw none")
    if grouping == "router":
        return _cosine_matrix(record.logits_TE.t())
    x_TD = record.x_TD[:max_tokens].to(bank.w_in_EDF.dtype)
    num_experts, tokens = layer.config.num_experts, x_TD.shape[0]
    x_ND = x_TD.repeat(num_experts, 1)  # every expert on the same tokens
    y_ND = bank(x_ND, [tokens] * num_experts)
    return _cosine_matrix(y_ND.view(num_experts, -1))


def merged_layer_tensors(
    layer: MoE, plan: LayerPlan, router_rows: str = "dominant", align: bool = True
) -> dict[str, Tensor]:
    """The layer's per-expert tensors after the plan: one row per group (see the module docstring)."""
    if router_rows not in ROUTER_ROWS:
        raise ValueError(f"--router-rows={router_rows!r} is invalid: expected one of {list(ROUTER_ROWS)}")
    tensors = {k: t.detach() for k, t in per_expert_tensors(layer).items()}
    out = {}
    for name, t in tensors.items():
        if name in HIDDEN_UNIT_TENSORS:
            continue  # merged below, after aligning hidden units
        if name.startswith("router.") and router_rows == "dominant":
            out[name] = torch.stack([t[g[0]] for g in plan.groups])
        else:
            out[name] = torch.stack(
                [_average([t[m] for m in g], w) for g, w in zip(plan.groups, plan.weights)]
            )
    w_in, w_out, b_in = (
        tensors["experts.w_in_EDF"],
        tensors["experts.w_out_EFD"],
        tensors.get("experts.b_in_EF"),
    )
    merged_in, merged_out, merged_b = [], [], []
    for group, weights in zip(plan.groups, plan.weights):
        dominant = group[0]
        members = []
        for m in group:
            parts = (w_in[m], w_out[m], None if b_in is None else b_in[m])
            if align and m != dominant:
                perm_F = match_units(
                    unit_features(w_in[dominant], w_out[dominant]), unit_features(w_in[m], w_out[m])
                )
                parts = permute_units(*parts, perm_F)
            members.append(parts)
        merged_in.append(_average([p[0] for p in members], weights))
        merged_out.append(_average([p[1] for p in members], weights))
        if b_in is not None:
            merged_b.append(_average([p[2] for p in members], weights))
    out["experts.w_in_EDF"], out["experts.w_out_EFD"] = torch.stack(merged_in), torch.stack(merged_out)
    if b_in is not None:
        out["experts.b_in_EF"] = torch.stack(merged_b)
    return out


def _average(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    if len(tensors) == 1:
        return tensors[0].clone()
    acc = sum(w * t.double() for t, w in zip(tensors, weights))
    return acc.to(tensors[0].dtype)


def apply_plans(
    model: nn.Module, plans: Sequence[LayerPlan], router_rows: str = "dominant", align: bool = True
) -> nn.Module:
    """A new model whose MoE layer i is layer i of `model` reduced by plans[i]."""
    layers = moe_layers_named(model)
    if len(plans) != len(layers):
        raise ValueError(f"{len(plans)} plans for {len(layers)} MoE layers")
    keep = {len(p.groups) for p in plans}
    if len(keep) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(keep)}")
    by_prefix = {prefix: plan for (prefix, _), plan in zip(layers, plans)}
    moe = dataclasses.replace(model.config.moe, num_experts=keep.pop())
    return rebuild(
        model, moe, lambda prefix, layer: merged_layer_tensors(layer, by_prefix[prefix], router_rows, align)
    )


def prune_model(
    model: nn.Module, records: Sequence[LayerRecord | None], keep: int
) -> tuple[nn.Module, list[LayerPlan]]:
    """Keep the `keep` most used experts of every MoE layer."""
    check_keep(model, keep)
    plans = [prune_plan(_usage(r, layer), keep) for (_, layer), r in zip(moe_layers_named(model), records)]
    return apply_plans(model, plans), plans


def merge_model(
    model: nn.Module,
    records: Sequence[LayerRecord | None],
    keep: int,
    grouping: str = "router",
    router_rows: str = "dominant",
    align: bool = True,
) -> tuple[nn.Module, list[LayerPlan]]:
    """MC-SMoE merging down to `keep` experts per MoE layer."""
    check_keep(model, keep)
    plans = []
    for (_, layer), record in zip(moe_layers_named(model), records):
        similarity = expert_similarity(layer, record, grouping)
        plans.append(merge_plan(_usage(record, layer), keep, similarity))
    return apply_plans(model, plans, router_rows, align), plans


def _usage(record: LayerRecord | None, layer: MoE) -> Tensor:
    return record.usage_E if record is not None else torch.zeros(layer.config.num_experts)
