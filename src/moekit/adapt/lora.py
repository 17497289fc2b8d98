"""LoRA adapters (Hu et al. 2021) for attention projections, dense FFNs and fused expert banks.

A LoRA adapter replaces a frozen weight W by W + s * A B with a trainable low-rank pair A, B
(B starts at zero, so an adapted model starts as the original) and s = alpha / rank.

Expert banks hold all experts in two fused tensors, w_in_EDF [E, D, H] (H = 2F for GLU: gate | up)
and w_out_EFD [E, F, D]. Their adapter is per expert and fused the same way:
    A_in [E, D, r], B_in [E, r, H]   and   A_out [E, F, r], B_out [E, r, D]
and it runs inside the grouped compute on the expert-sorted rows, never materializing W + s A B:
    h = x W_in[e] + s (x A_in[e]) B_in[e]        (three grouped products over the same groups)
    y = act(h) W_out[e] + s (act(h) A_out[e]) B_out[e]
The frozen base weights get no gradient at all (the grouped product skips gradients nobody asked
for), so training memory is the adapters' plus activations.

`apply_lora(model, rank)` wraps the chosen modules in place; `merge_lora(model)` folds every adapter
back into its base weight (W += s A B) and unwraps it, so the model saves and loads as a plain
moekit model with the same outputs.

Shape legend: N expert-sorted rows, D model dim, F expert hidden dim, H = 2F (GLU) or F, E experts,
r rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.model.layers import FeedForward
from moekit.moe import MoE
from moekit.moe.experts import ExpertBank, apply_activation
from moekit.moe.grouped import expert_of_rows, grouped_mm

TARGETS = ("attention", "experts", "ffn")  # what apply_lora can adapt
ATTENTION_ATTRS = ("attn", "cross_attn")


class LoRALinear(nn.Module):
    """y = base(x) + s * (x A^T) B^T with A [r, in], B [out, r]; the base Linear is frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        _check_rank(rank)
        self.base = base
        self.rank = rank
        self.scale = (rank if alpha is None else alpha) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear inits its weight
        base.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with W += s B A (the adapter folded in)."""
        self.base.weight += (self.scale * (_wide(self.lora_B) @ _wide(self.lora_A))).to(
            self.base.weight.dtype
        )
        return self.base


class LoRAExpertBank(nn.Module):
    """An ExpertBank with a per-expert low-rank adapter on both fused weights; the bank is frozen."""

    def __init__(self, base: ExpertBank, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        _check_rank(rank)
        self.base = base
        self.rank = rank
        self.scale = (rank if alpha is None else alpha) / rank
        E, D, H = base.w_in_EDF.shape
        Fh = base.w_out_EFD.shape[1]
        kw = {"dtype": base.w_in_EDF.dtype, "device": base.w_in_EDF.device}
        # A ~ N(0, 1/fan_in) keeps x A at the scale of x; B = 0 makes the adapted bank start as the base.
        self.lora_A_in_EDR = nn.Parameter(torch.randn(E, D, rank, **kw) / math.sqrt(D))
        self.lora_B_in_ERH = nn.Parameter(torch.zeros(E, rank, H, **kw))
        self.lora_A_out_EFR = nn.Parameter(torch.randn(E, Fh, rank, **kw) / math.sqrt(Fh))
        self.lora_B_out_ERD = nn.Parameter(torch.zeros(E, rank, D, **kw))
        base.requires_grad_(False)

    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    def forward(self, x_ND: Tensor, counts: Sequence[int]) -> Tensor:
        """Rows of x_ND sorted by expert, `counts[e]` rows for expert e -> [N, D]."""
        b, s = self.base, self.scale
        h_NH = grouped_mm(x_ND, b.w_in_EDF, counts)  # [N, H]
        low_NR = grouped_mm(x_ND, self.lora_A_in_EDR, counts)  # [N, r]
        h_NH = h_NH + s * grouped_mm(low_NR, self.lora_B_in_ERH, counts)
        row_expert_N = None
        if b.b_in_EF is not None:
            row_expert_N = expert_of_rows(counts, x_ND.device)
            h_NH = h_NH + b.b_in_EF[row_expert_N]
        a_NF = b.dropout(apply_activation(b.activation, h_NH, b.is_glu))  # [N, F]
        y_ND = grouped_mm(a_NF, b.w_out_EFD, counts)
        low_NR = grouped_mm(a_NF, self.lora_A_out_EFR, counts)  # [N, r]
        y_ND = y_ND + s * grouped_mm(low_NR, self.lora_B_out_ERD, counts)
        if b.b_out_ED is not None:
            y_ND = y_ND + b.b_out_ED[row_expert_N]
        return y_ND

    @torch.no_grad()
    def merged(self) -> ExpertBank:
        """The base bank with W_in += s A_in B_in and W_out += s A_out B_out, per expert."""
        b, s = self.base, self.scale
        b.w_in_EDF += (s * torch.bmm(_wide(self.lora_A_in_EDR), _wide(self.lora_B_in_ERH))).to(
            b.w_in_EDF.dtype
        )
        b.w_out_EFD += (s * torch.bmm(_wide(self.lora_A_out_EFR), _wide(self.lora_B_out_ERD))).to(
            b.w_out_EFD.dtype
        )
        return b


LORA_MODULES = (LoRALinear, LoRAExpertBank)


def _wide(t: Tensor) -> Tensor:
    """At least float32 for the merge product (bf16 adapters would round A B before adding it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_rank(rank: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank={rank!r} is invalid: expected a positive integer")


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown or targets!r}: expected some of {list(TARGETS)}")
    return targets


def _swap_linears(module: nn.Module, rank: int, alpha: float | None, prefix: str, out: list[str]) -> None:
    """Wrap every nn.Linear below `module` (attention projections, dense FFN matrices)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear(child, rank, alpha))
            out.append(f"{prefix}{name}")
        elif not isinstance(child, LORA_MODULES):
            _swap_linears(child, rank, alpha, f"{prefix}{name}.", out)


def apply_lora(
    model: nn.Module, rank: int, alpha: float | None = None, targets: Iterable[str] = TARGETS
) -> list[str]:
    """Wrap the target modules of `model` in LoRA adapters, in place; returns the wrapped module names.

    targets: "attention" (every Linear of self/cross-attention), "experts" (routed and shared expert
    banks of MoE layers; routers are never adapted), "ffn" (dense FFNs). alpha defaults to rank
    (scale 1). Each wrapped base weight is frozen; the adapters are trainable.
    """
    targets = check_targets(targets)
    _check_rank(rank)
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, LORA_MODULES):
            continue
        if "attention" in targets:
            for attr in ATTENTION_ATTRS:
                sub = getattr(module, attr, None)
                if isinstance(sub, nn.Module) and not isinstance(module, MoE):
                    _swap_linears(sub, rank, alpha, f"{prefix}{attr}.", wrapped)
        if "ffn" in targets and isinstance(module, FeedForward):
            _swap_linears(module, rank, alpha, prefix, wrapped)
        if "experts" in targets and isinstance(module, MoE):
            if isinstance(module.experts, ExpertBank):
                module.experts = LoRAExpertBank(module.experts, rank, alpha)
                wrapped.append(f"{prefix}experts")
            if module.shared is not None and isinstance(module.shared.bank, ExpertBank):
                module.shared.bank = LoRAExpertBank(module.shared.bank, rank, alpha)
                wrapped.append(f"{prefix}shared.bank")
    if not wrapped:
        raise ValueError(f"apply_lora: the model has no modules of the targets {list(targets)}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it, in place; returns the model.

    The merged model has the original module structure and parameter names (it saves and loads as
    a plain moekit model) and computes the same function as the adapted one, up to rounding."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LORA_MODULES):
                setattr(module, name, child.merged())
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (A and B of every LoRA module)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, LORA_MODULES)
        for name, p in m.named_parameters(recurse=False)
        if name.startswith("lora_")
    ]
