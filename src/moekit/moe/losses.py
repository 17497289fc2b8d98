"""Auxiliary losses of MoE routing, computed explicitly from one call's routing.

Nothing here keeps state: each function takes tensors and returns a scalar tensor. Padding is
excluded everywhere through `mask_T` (True = real token), so padded batches give the same losses
as the unpadded tokens alone. None of these losses is scaled by a data-parallel world size or by
gradient-accumulation steps; that is the caller's choice and a classic bug when made implicitly.

Shape legend: T tokens, E experts, A assignments, B sequences, S tokens per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _mask_or_ones(mask_T: Tensor | None, num_tokens: int, device: torch.device) -> Tensor:
    if mask_T is None:
        return torch.ones(num_tokens, dtype=torch.float32, device=device)
    return mask_T.to(torch.float32)


def counts(index: Tensor, weights: Tensor | None, size: int) -> Tensor:
    """[size] float32 sums of `weights` (ones when None) by index in [0, size). `torch.bincount` on
    the CPU; elsewhere a scatter-add (`scatter_counts`): CUDA's bincount reads the largest index
    back to the host to size its output, a sync in every layer's losses."""
    if index.device.type != "cpu":
        return scatter_counts(index, weights, size)
    return torch.bincount(index, weights=weights, minlength=size).to(torch.float32)


def scatter_counts(index: Tensor, weights: Tensor | None, size: int) -> Tensor:
    """`counts` by a scatter-add into [size] zeros (no host sync on any device)."""
    if weights is None:
        values = torch.ones(index.shape, dtype=torch.float32, device=index.device)
    else:
        values = weights.to(torch.float32)
    return torch.zeros(size, dtype=torch.float32, device=index.device).index_add_(0, index, values)


def expert_counts(expert_idx_A: Tensor, valid_A: Tensor | None, num_experts: int) -> Tensor:
    """[E] float32 number of (valid) assignments per expert."""
    return counts(expert_idx_A, None if valid_A is None else valid_A.to(torch.float32), num_experts)


def switch_load_balance_loss(probs_TE: Tensor, counts_E: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Switch Transformer balance loss `E * sum_i f_i * P_i`, exactly 1 at perfect balance.

    f_i: fraction of the routed assignments (top-k selections of real tokens, before any
    capacity drop) that chose expert i; P_i: mean router probability of expert i over real tokens.
    """
    num_tokens, num_experts = probs_TE.shape
    if mask_T is None:  # the common case in few ops: it runs on every call, decode steps included
        p_sum_E = probs_TE.sum(dim=0)
        scale = num_experts / max(num_tokens, 1)
        return (counts_E * p_sum_E).sum() * scale / counts_E.sum().clamp_min(1.0)
    m_T = _mask_or_ones(mask_T, num_tokens, probs_TE.device)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    p_E = (probs_TE * m_T[:, None]).sum(dim=0) / m_T.sum().clamp_min(1.0)
    return num_experts * (f_E * p_E).sum()


def router_z_loss(logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over real tokens of (logsumexp_j logits_tj)^2."""
    lse_T = torch.logsumexp(_at_least_float32(logits_TE), dim=-1)
    if mask_T is None:
        return lse_T.square().sum() / max(logits_TE.shape[0], 1)
    m_T = _mask_or_ones(mask_T, logits_TE.shape[0], logits_TE.device)
    return (lse_T.square() * m_T).sum() / m_T.sum().clamp_min(1.0)


def cv_squared(v_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var/mean^2 (population variance), 0 for a single expert."""
    if v_E.numel() <= 1:
        return v_E.new_zeros(())
    v_E = _at_least_float32(v_E)
    return v_E.var(unbiased=False) / (v_E.mean().square() + eps)


def expert_importance(
    weight_A: Tensor, expert_idx_A: Tensor, valid_A: Tensor | None, num_experts: int
) -> Tensor:
    """[E] importance_i = sum over the batch of expert i's gate values (of valid assignments)."""
    w_A = weight_A if valid_A is None else weight_A * valid_A.to(weight_A.dtype)
    w_A = _at_least_float32(w_A)
    return w_A.new_zeros(num_experts).index_add(0, expert_idx_A, w_A)


def importance_loss(
    weight_A: Tensor, expert_idx_A: Tensor, valid_A: Tensor | None, num_experts: int
) -> Tensor:
    """Shazeer 2017: CV^2 of importance, importance_i = sum over the batch of expert i's gate values."""
    return cv_squared(expert_importance(weight_A, expert_idx_A, valid_A, num_experts))


def load_loss(load_E: Tensor) -> Tensor:
    """Shazeer 2017: CV^2 of the load (smooth estimate for noisy gating, else assignment counts)."""
    return cv_squared(load_E)


def sequence_balance_loss(
    probs_TE: Tensor,
    expert_idx_A: Tensor,
    token_idx_A: Tensor,
    num_sequences: int,
    mask_T: Tensor | None = None,
) -> Tensor:
    """DeepSeek-V3 sequence-wise balance: the Switch loss computed within each sequence, averaged.

    Tokens are laid out sequence-major (token t belongs to sequence t // S). Sequences with no real
    token do not count.
    """
    num_tokens, num_experts = probs_TE.shape
    seq_len = num_tokens // num_sequences
    m_T = _mask_or_ones(mask_T, num_tokens, probs_TE.device)
    m_BS = m_T.view(num_sequences, seq_len)
    p_BE = (probs_TE.view(num_sequences, seq_len, num_experts) * m_BS[..., None]).sum(1)
    real_B = m_BS.sum(dim=1)
    p_BE = p_BE / real_B.clamp_min(1.0)[:, None]
    seq_A = token_idx_A // seq_len
    flat_idx = seq_A * num_experts + expert_idx_A
    counts_BE = counts(flat_idx, m_T[token_idx_A], num_sequences * num_experts).view(
        num_sequences, num_experts
    )
    f_BE = counts_BE / counts_BE.sum(dim=1, keepdim=True).clamp_min(1.0)
    per_seq_B = num_experts * (f_BE * p_BE).sum(dim=1)
    has_tokens_B = (real_B > 0).to(torch.float32)
    return (per_seq_B * has_tokens_B).sum() / has_tokens_B.sum().clamp_min(1.0)


def router_entropy(probs_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Mean over real tokens of the entropy (nats) of the router distribution."""
    if mask_T is None:
        return torch.special.entr(probs_TE).sum() / max(probs_TE.shape[0], 1)  # entr(p) = -p log p
    m_T = _mask_or_ones(mask_T, probs_TE.shape[0], probs_TE.device)
    ent_T = torch.special.entr(probs_TE).sum(dim=-1)
    return (ent_T * m_T).sum() / m_T.sum().clamp_min(1.0)


def max_load_violation(counts_E: Tensor) -> Tensor:
    """MaxVio = max_i load_i / mean load - 1 (0 at perfect balance)."""
    counts_E = counts_E.float()
    total = counts_E.sum()
    # (max * E - total) / total = max / mean - 1, and 0 / 1 = 0 when nothing was routed
    return (counts_E.max() * counts_E.numel() - total) / total.clamp_min(1e-12)


def pooled_load_balancing_loss(
    logits_per_layer: Sequence[Tensor], top_k: int, mask_T: Tensor | None = None
) -> Tensor:
    """transformers' `load_balancing_loss_func`: the Switch loss over all layers' tokens pooled.

    Each layer's [T, E] logits go through softmax and a top-k; selections and probabilities are
    summed over layers as if all layers' tokens were one batch (the same expert index in different
    layers counts together): `E * sum_e (count_e / N) * (Psum_e / N)`, N = layers * real tokens.
    About k at balance (moekit's per-layer loss is 1). Padding (mask_T False) is left out.
    Only the probabilities carry gradient, as in transformers.
    """
    num_experts = logits_per_layer[0].shape[-1]
    counts_E = logits_per_layer[0].new_zeros(num_experts, dtype=torch.float32)
    prob_sum_E = torch.zeros_like(counts_E)
    rows = counts_E.new_zeros(())
    for logits_TE in logits_per_layer:
        probs_TE = _at_least_float32(logits_TE).softmax(dim=-1)
        selected_TK = probs_TE.topk(top_k, dim=-1).indices
        m_T = _mask_or_ones(mask_T, probs_TE.shape[0], probs_TE.device)
        counts_E = counts_E.index_add(0, selected_TK.reshape(-1), m_T.repeat_interleave(top_k))
        prob_sum_E = prob_sum_E + (probs_TE * m_T[:, None]).sum(dim=0)
        rows = rows + m_T.sum()
    rows = rows.clamp_min(1.0)
    return num_experts * ((counts_E / rows) * (prob_sum_E / rows)).sum()
