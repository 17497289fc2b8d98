"""GlobalLosses: every MoE loss of a data-parallel step is the loss of the batch of all ranks.

The balance losses are not means over tokens: the Switch loss `E * sum_i f_i P_i` multiplies two
batch means, the importance and load losses are CV^2 of batch sums. Computed on each rank's
micro batch and averaged over ranks, they differ from the loss one process computes on the
concatenated batch (on the 20-step test runs with coefficient 0.1: 8e-3 in the balance loss,
1e-2 in the cross-entropy). `shard_model` therefore installs `GlobalLosses` as `MoE.loss_reduction`
on every top-level MoE layer when the world has several ranks (expert parallel or not); the layer
then returns, on every rank, the losses of the global batch, with the gradient that makes
`sync_gradients` (mean over ranks) give the one-process gradient.

How: each layer call packs the sums the losses are built from into one vector and all-reduces it
over the world (one collective of `2E + 2` floats per layer and micro batch; `+ 2` for the
sequence-wise loss and `+ E` for each of the importance and load losses when their coefficients
are non-zero):

    counts_E  selections of real tokens per expert (f_i = counts_i / sum counts; no gradient)
    psum_E    router probabilities summed over real tokens (P_i = psum_i / N)
    N         real tokens;  z_loss * N  (the z-loss is a mean over real tokens)
    S, seq_balance * S  sequences with real tokens (the sequence-wise loss is a mean over them)
    importance_E, load_E  the vectors whose CV^2 are the importance and load losses

and applies the existing loss functions to the global sums: the Switch loss of one "token" whose
probabilities are P (`switch_load_balance_loss(P[None], counts)` is `E * sum_i f_i P_i`), the
z and sequence-wise losses as the global sums over the global counts, the CV^2 of the global
vectors. Values are identical on every rank and equal the one-process losses.

Gradient: the all-reduce is `_GroupSum`, whose backward multiplies the incoming gradient by the
world size W instead of all-reducing it. That is the exact adjoint here: every rank computes the
same function of the same reduced vector and backpropagates the same multiple of it (the
step's objective is the mean over ranks of each rank's loss), so the all-reduce of the ranks'
equal upstream gradients is W times this rank's; `sync_gradients` divides by W again. No
collective runs in the backward.

Not covered: the inner layers of hierarchical experts (they run only on ranks whose outer
expert got tokens, so they keep their per-rank losses), and `aux_loss_mode="transformers"`,
whose pooled balance loss is computed by the model from each rank's router logits.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.moe import losses as L
from moekit.moe.router import Routing


class _GroupSum(torch.autograd.Function):
    """All-reduce SUM over `group`; backward: W * grad (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, group, world):  # type: ignore[override]
        ctx.world = world
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.world, None, None


class GlobalLosses:
    """`MoE.loss_reduction` of data-parallel training: the losses of all ranks' batch on every rank.

    Every rank must run the layer equally often (every forward of a sharded model is a collective
    already), and with autograd off, read the losses on all ranks or on none.
    """

    def __init__(self, world_size: int, group=None):
        self.world = world_size  # of `group` (None: the default group, every rank)
        self.group = group

    def __repr__(self) -> str:
        return f"GlobalLosses(world={self.world})"

    def __call__(
        self,
        layer,
        local: dict[str, Tensor],
        x: Tensor,
        routing: Routing,
        real_A: Tensor | None,
        mask_T: Tensor | None,
    ) -> dict[str, Tensor]:
        cfg, num_experts = layer.config, layer.config.num_experts
        probs_TE = routing.probs_TE
        dtype = probs_TE.dtype
        m_T = probs_TE.new_ones(probs_TE.shape[0]) if mask_T is None else mask_T.to(dtype)  # [T] real tokens
        num_real = m_T.sum()
        counts_E = L.expert_counts(routing.expert_idx_A, real_A, num_experts).to(dtype)
        psum_E = (probs_TE * m_T[:, None]).sum(dim=0)
        parts = [counts_E, psum_E, num_real.view(1), (local["z"].to(dtype) * num_real).view(1)]
        seq = cfg.seq_balance_coef > 0
        if seq:
            num_seq = self._sequences_with_tokens(x, m_T)
            parts += [num_seq.view(1), (local["seq_balance"].to(dtype) * num_seq).view(1)]
        if cfg.importance_coef > 0:
            parts.append(
                L.expert_importance(routing.weight_A, routing.expert_idx_A, real_A, num_experts).to(dtype)
            )
        if cfg.load_coef > 0:
            load_E = routing.load_E if routing.load_E is not None else counts_E
            parts.append(load_E.to(dtype))
        total = _GroupSum.apply(torch.cat(parts), self.group, self.world)

        counts_g, psum_g = total[:num_experts], total[num_experts : 2 * num_experts]
        real_g = total[2 * num_experts].clamp_min(1.0)
        losses = dict(local)
        losses["load_balance"] = L.switch_load_balance_loss((psum_g / real_g)[None], counts_g)
        losses["z"] = total[2 * num_experts + 1] / real_g
        rest = total[2 * num_experts + 2 :]
        if seq:
            losses["seq_balance"] = rest[1] / rest[0].clamp_min(1.0)
            rest = rest[2:]
        if cfg.importance_coef > 0:
            losses["importance"], rest = L.cv_squared(rest[:num_experts]), rest[num_experts:]
        if cfg.load_coef > 0:
            losses["load"] = L.load_loss(rest[:num_experts])
        return losses

    @staticmethod
    def _sequences_with_tokens(x: Tensor, m_T: Tensor) -> Tensor:
        """Sequences of this call with at least one real token (as the sequence-wise loss counts)."""
        num_sequences = math.prod(x.shape[:-2]) if x.ndim >= 3 else 1
        if m_T.numel() == 0 or num_sequences == 0:
            return m_T.new_zeros(())
        return (m_T.view(num_sequences, -1).sum(dim=1) > 0).to(m_T.dtype).sum()
