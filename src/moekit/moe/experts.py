"""Expert banks: E feed-forward experts held as fused `[E, ...]` tensors.

An expert is `down(act(up(x)))` (FFN: ReLU, GELU, SiLU) or `down(act(gate(x)) * up(x))` (GLU:
SwiGLU, GeGLU, and GPT-OSS's clamped variant). Gate and up projections of all experts live in one
tensor `w_in_EDF` of shape [E, D, 2F] for GLU (columns 0..F-1 gate, F..2F-1 up) or [E, D, F] for
FFN, the down projections in `w_out_EFD` [E, F, D]. The bank computes on rows already sorted by
expert (see dispatch.py) with grouped matrix products.

Shared experts (DeepSeek, Qwen2-MoE) are a bank of one expert applied to every token, optionally
scaled by a sigmoid gate. Hierarchical MoE (Shazeer 2017) makes every expert an MoE layer itself.

Shape legend: N sorted rows, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.moe import native
from moekit.moe.activations import (  # noqa: F401  (re-exported: the dense FFN uses them)
    GPT_OSS_ALPHA,
    GPT_OSS_LIMIT,
    apply_activation,
    ffn_activation,
    glu_activation,
)
from moekit.moe.config import MoEConfig
from moekit.moe.dispatch import combine_top_k, gather_token_rows, inverse_permutation
from moekit.moe.fused import DEFAULT_BLOCK_BYTES, ExpertSpec, FusedExperts, experts_forward
from moekit.moe.grouped import GroupPlan, expert_of_rows, expert_pair, grouped_mm, grouped_mm_on_device


class ExpertBank(nn.Module):
    """E experts of one shape, computed group by group on expert-sorted rows."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: str = "swiglu",
        bias: bool = False,
        dropout: float = 0.0,
        is_glu: bool | None = None,
    ):
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation = activation
        self.is_glu = activation in ("swiglu", "geglu", "gpt_oss") if is_glu is None else is_glu
        in_features = 2 * hidden_dim if self.is_glu else hidden_dim
        self.w_in_EDF = nn.Parameter(torch.empty(num_experts, dim, in_features))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b_in_EF = nn.Parameter(torch.zeros(num_experts, in_features)) if bias else None
        self.b_out_ED = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.strategy = "auto"  # grouped product strategy (see grouped.py); tests pin each one
        self.block_bytes = DEFAULT_BLOCK_BYTES  # size of a row block's hidden activations
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in_EDF, std=1.0 / math.sqrt(self.dim))
        nn.init.normal_(self.w_out_EFD, std=1.0 / math.sqrt(self.hidden_dim))
        for b in (self.b_in_EF, self.b_out_ED):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x_ND: Tensor, counts: Sequence[int]) -> Tensor:
        """Rows of x_ND sorted by expert, `counts[e]` rows for expert e -> [N, D]."""
        if self.dropout_active():
            return self._forward_composed(x_ND, counts)  # dropout masks: let autograd keep them
        return self._fused(x_ND, None, None, self._plan(counts, x_ND.shape[0]))

    def forward_tokens(
        self, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, counts: Sequence[int]
    ) -> Tensor:
        """Gather, experts and weighted combine in one pass, with autograd -> [T, D].

        Row n (sorted by expert, `counts` per expert) is token `token_N[n]` with combine weight
        `weight_N[n]`: the result is `sum_n weight_N[n] * expert(x_TD[token_N[n]])` scatter-added
        into token rows, as gathering `x_TD[token_N]`, calling the bank and combining would give,
        without any [N, D] tensor (see fused.py). Gradients reach x_TD, weight_N and the weights.
        """
        if self.dropout_active():
            raise RuntimeError("ExpertBank.forward_tokens does not apply expert dropout: use forward")
        return self._fused(x_TD, token_N, weight_N, self._plan(counts, token_N.shape[0]))

    def _native_bank(self) -> native.Experts:
        return native.Experts(
            self.w_in_EDF, self.w_out_EFD, self.b_in_EF, self.b_out_ED, self.activation, self.is_glu
        )

    def forward_routed(
        self, x_TD: Tensor, expert_idx_A: Tensor, weight_A: Tensor, top_k: int
    ) -> Tensor | None:
        """Inference straight from a token-choice routing (no autograd) -> [T, D], or None where the
        caller must dispatch (the native kernel does not apply and T > 1).

        Assignment a (token-major, T * top_k of them) sends token a // top_k to expert
        expert_idx_A[a] with combine weight weight_A[a]. Where the native kernel applies
        (native.py: decode-size batches) it does sort, experts and combine in one call. Otherwise a
        single token (a decode step at batch 1) goes straight through its K experts here, without the
        sort, the row blocks and their buffers, whose dozens of small calls cost more than the
        products at this size: with two or more threads the experts go two at a time, one bmm per
        projection over a strided view of the pair's weights (each thread streams one expert:
        matrix-vector products run on one thread in MKL); an odd one out, or every expert on one
        thread, takes `mv(w^T, x)`. The K outputs [K, D] are summed with their weights by a single
        product.
        """
        w_in_EDH, w_out_EFD, b_in, b_out = self.w_in_EDF, self.w_out_EFD, self.b_in_EF, self.b_out_ED
        num_rows = expert_idx_A.shape[0]
        bank = self._native_bank()
        if native.applies(x_TD, bank, num_rows, min(num_rows, self.num_experts), self.strategy):
            return native.routed(x_TD, expert_idx_A, weight_A, top_k, bank)
        if x_TD.shape[0] != 1:
            return None
        x_1D, weight_K, num_chosen, dim = x_TD, weight_A, num_rows, x_TD.shape[-1]
        if weight_K.dtype != x_1D.dtype:
            weight_K = weight_K.to(x_1D.dtype)
        experts = expert_idx_A.tolist()
        order = sorted(range(num_chosen), key=experts.__getitem__)  # by expert: pairs are views
        if order != list(range(num_chosen)):
            weight_K = weight_K[order]
            experts = [experts[k] for k in order]
        step = 2 if torch.get_num_threads() >= 2 else 1
        y_parts = []  # the experts' outputs in the order of `experts`: [2, D] per pair, [1, D] alone
        for i in range(0, num_chosen, step):
            if i + 1 < num_chosen and step == 2 and experts[i] != experts[i + 1]:
                e1, e2 = experts[i], experts[i + 1]
                h_21H = torch.bmm(x_1D.expand(2, 1, dim), expert_pair(w_in_EDH, e1, e2))
                if b_in is not None:
                    h_21H += expert_pair(b_in, e1, e2)[:, None]
                a_21F = apply_activation(self.activation, h_21H, self.is_glu)
                y_21D = torch.bmm(a_21F, expert_pair(w_out_EFD, e1, e2))
                if b_out is not None:
                    y_21D += expert_pair(b_out, e1, e2)[:, None]
                y_parts.append(y_21D.view(2, dim))
                continue
            for e in experts[i : i + step]:  # one at a time: [H] = x W_in[e], [D] = a W_out[e]
                h_H = torch.mv(w_in_EDH[e].t(), x_1D[0])
                if b_in is not None:
                    h_H += b_in[e]
                y_D = torch.mv(w_out_EFD[e].t(), apply_activation(self.activation, h_H, self.is_glu))
                if b_out is not None:
                    y_D += b_out[e]
                y_parts.append(y_D[None])
        y_KD = y_parts[0] if len(y_parts) == 1 else torch.cat(y_parts)  # top-2: the pair's output as it is
        return torch.mm(weight_K[None], y_KD)  # [1, D] = sum_k w_k y_k

    def forward_device(
        self, x_TD: Tensor, expert_idx_A: Tensor, weight_A: Tensor, top_k: int
    ) -> tuple[Tensor, Tensor] | None:
        """Steps 2-4 of a dropless token-choice layer on a GPU -> (out [T, D], assignments per
        expert [E] float32), or None where this path does not serve (not CUDA, a strategy other
        than "auto"/"grouped_mm", or no `torch._grouped_mm` for the tensors): see
        `experts_on_device`."""
        if x_TD.device.type != "cuda" or self.strategy not in ("auto", "grouped_mm"):
            return None
        return experts_on_device(self, x_TD, expert_idx_A, weight_A, top_k)

    def _fused(self, x: Tensor, token_N: Tensor | None, weight_N: Tensor | None, plan: GroupPlan) -> Tensor:
        params = (x, weight_N, self.w_in_EDF, self.w_out_EFD, self.b_in_EF, self.b_out_ED)
        spec = ExpertSpec(self.activation, self.is_glu, self.strategy, self.block_bytes)
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
            return FusedExperts.apply(*params, token_N, plan, spec)
        return experts_forward(x, token_N, weight_N, *params[2:], plan, spec, save_hidden=False)[0]

    def dropout_active(self) -> bool:
        return isinstance(self.dropout, nn.Dropout) and self.dropout.training

    @staticmethod
    def _plan(counts: Sequence[int], num_rows: int) -> GroupPlan:
        plan = GroupPlan.from_counts(counts)
        if plan.num_rows > num_rows:
            raise ValueError(f"ExpertBank: counts sum to {plan.num_rows} rows but x has {num_rows}")
        return plan

    def _forward_composed(self, x_ND: Tensor, counts: Sequence[int]) -> Tensor:
        """The same math from autograd-tracked pieces (used with expert dropout while training)."""
        h_NF = grouped_mm(x_ND, self.w_in_EDF, counts, self.strategy)  # [N, F] or [N, 2F]
        row_expert_N = None
        if self.b_in_EF is not None:
            row_expert_N = expert_of_rows(counts, x_ND.device)
            h_NF = h_NF + self.b_in_EF[row_expert_N]
        h_NF = self.dropout(apply_activation(self.activation, h_NF, self.is_glu))
        y_ND = grouped_mm(h_NF, self.w_out_EFD, counts, self.strategy)  # [N, D]
        if self.b_out_ED is not None:
            y_ND = y_ND + self.b_out_ED[row_expert_N]
        return y_ND

    @classmethod
    def from_config(cls, config: MoEConfig) -> ExpertBank:
        return cls(
            config.num_experts,
            config.dim,
            config.hidden_dim,
            config.activation,
            config.expert_bias,
            config.expert_dropout,
        )


def experts_on_device(
    bank: ExpertBank, x_TD: Tensor, expert_idx_A: Tensor, weight_A: Tensor, top_k: int
) -> tuple[Tensor, Tensor] | None:
    """The GPU's dropless experts: nothing is read back to the host, so the CPU keeps queueing
    kernels while the GPU computes (the CPU path's host-side group plan would wait for the GPU at
    every layer). -> (out [T, D], assignments per expert [E] float32), or None where
    `torch._grouped_mm` does not serve these tensors.

    The A = T * K assignments (token-major: assignment a is token a // K) are sorted by expert on
    the device; each expert's group ends at the number of assignments to experts <= e (a
    searchsorted over the sorted ids: no bincount, whose output size is read on the host). Rows
    gather their tokens, run the two grouped products with the activation between, and each
    token's K outputs are summed with its K weights. The gather and the combine are the local
    dispatcher's (dispatch.py): gathers both ways, no scatter-add (whose deterministic CUDA backward
    sorts its indices), no batched [T, 1, K] x [T, K, D] product (a slow kernel for such shapes).
    Under autocast, operands are cast to autocast's dtype as `torch.mm`'s would be.
    """
    if expert_idx_A.shape[0] == 0:
        return None  # no tokens: the host-planned path returns its zeros
    device = x_TD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype
    w_in_EDH, w_out_EFD = bank.w_in_EDF.to(dtype), bank.w_out_EFD.to(dtype)
    expert_N, perm_N = torch.sort(expert_idx_A, stable=True)  # sorted row n is assignment perm_N[n]
    experts_E = torch.arange(bank.num_experts, device=expert_idx_A.device, dtype=expert_N.dtype)
    ends_E = torch.searchsorted(expert_N, experts_E, right=True)  # [E] end row of each group
    offs_E = ends_E.to(torch.int32)
    row_A = inverse_permutation(perm_N)  # the sorted row of every assignment
    x_ND = gather_token_rows(x_TD.to(dtype), perm_N.div(top_k, rounding_mode="floor"), row_A, top_k)
    h_NH = grouped_mm_on_device(x_ND, w_in_EDH, offs_E)
    if h_NH is None:
        return None
    if bank.b_in_EF is not None:
        h_NH = h_NH + bank.b_in_EF.to(dtype)[expert_N]
    a_NF = apply_activation(bank.activation, h_NH, bank.is_glu)
    y_ND = grouped_mm_on_device(a_NF, w_out_EFD, offs_E)
    if y_ND is None:
        return None
    if bank.b_out_ED is not None:
        y_ND = y_ND + bank.b_out_ED.to(dtype)[expert_N]
    out_TD = combine_top_k(y_ND, weight_A, row_A, perm_N, top_k)
    routed_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1)).float()
    return out_TD, routed_E


class SharedExperts(nn.Module):
    """Always-on experts added to the routed output; Qwen2-MoE scales them by sigmoid(x W_s)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        hidden = config.shared_hidden_dim or config.hidden_dim * config.num_shared_experts
        # One fused expert of the combined hidden size equals the sum of num_shared_experts experts.
        self.bank = ExpertBank(
            1, config.dim, hidden, config.activation, config.expert_bias, config.expert_dropout
        )
        self.gate = nn.Linear(config.dim, 1, bias=False) if config.shared_gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        y_TD = self.bank(x_TD, [x_TD.shape[0]])
        if self.gate is not None:
            y_TD = y_TD * torch.sigmoid(self.gate(x_TD))
        return y_TD


class HierarchicalExperts(nn.Module):
    """Every expert is an MoE layer (Shazeer 2017's hierarchical MoE).

    Returns the outputs and the inner layers' aux and z losses, averaged over the inner layers
    that received tokens (an inner layer with no tokens runs nothing and adds no loss).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        from moekit.moe.layer import MoE  # the layer module imports this one

        assert config.inner is not None
        self.num_experts = config.num_experts
        self.layers = nn.ModuleList(MoE(config.inner) for _ in range(config.num_experts))

    def forward(self, x_ND: Tensor, counts: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        outputs, aux, z = [], [], []
        start = 0
        for layer, c in zip(self.layers, counts):
            if c:
                inner = layer(x_ND[start : start + c])
                outputs.append(inner.output)
                aux.append(inner.aux_loss)
                z.append(inner.z_loss)
            start += c
        zero = x_ND.new_zeros((), dtype=torch.float32)
        if not outputs:
            return x_ND.new_zeros(x_ND.shape), zero, zero
        y_ND = torch.cat(outputs, dim=0)
        if y_ND.shape[0] < x_ND.shape[0]:
            y_ND = torch.cat([y_ND, x_ND.new_zeros(x_ND.shape[0] - y_ND.shape[0], x_ND.shape[1])])
        return y_ND, torch.stack(aux).mean(), torch.stack(z).mean()
