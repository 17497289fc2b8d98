"""Parameter and FLOP counts, and the dense model that matches an MoE model's compute.

    count_params(model or config) -> ParamCount(total, active, embedding)
    flops_per_token(config, seq_len) -> FlopCount(attention, ffn, router, lm_head); .total
    dense_baseline(config) -> ModelConfig with moe=None and the same FFN FLOPs per token

Conventions:
  * Parameters: `total` and `active` both INCLUDE the token embedding and the LM head (counted once
    when tied); `embedding` says how many of them those vocab-sized matrices hold, so
    `active - embedding` is the Kaplan-style non-embedding count. Active = what one token uses:
    top_k of the E routed experts, plus the router, shared experts and everything non-expert.
  * FLOPs: forward matrix products only, 2 FLOPs per multiply-accumulate; norms, activations,
    softmax and biases are left out. Attention scores (QK^T and AV) are counted for every query
    against all `seq_len` keys (a causal kernel skipping the masked half does about half of that).
  * Expert-choice routing uses top_k as the average number of experts per token.

FLOPs come from config fields alone: GLU activations (swiglu, geglu, gpt_oss) have 3 matrices
per expert, the others 2; shared experts have hidden size shared_hidden_dim or
hidden_dim * num_shared_experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moekit.model.config import ModelConfig
from moekit.model.decoder import MoETransformer
from moekit.moe import HierarchicalExperts, MoE, MoEConfig

DENSE_FFN_MATRICES = 3  # the dense FFN is SwiGLU by default (2 matrices for ffn_activation relu/gelu/silu)


@dataclass(frozen=True)
class ParamCount:
    total: int  # every parameter, embeddings and LM head included
    active: int  # the parameters one token uses
    embedding: int  # token embedding + untied LM head (included in total and active)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token, by part."""

    attention: int  # q/k/v/o projections + scores over seq_len keys
    ffn: int  # dense FFNs, the top_k routed experts and shared experts
    router: int  # router gates (and noisy top-k noise gates, shared-expert gates)
    lm_head: int

    @property
    def total(self) -> int:
        return self.attention + self.ffn + self.router + self.lm_head


# ---------------------------------------------------------------------- parameters


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _moe_active_params(moe: MoE) -> int:
    """Router + shared + top_k experts; a hierarchical expert contributes its own active count."""
    if isinstance(moe.experts, HierarchicalExperts):
        per_expert = _moe_active_params(moe.experts.layers[0])
    else:
        per_expert = _numel(moe.experts) // moe.config.num_experts
    return _numel(moe.router) + _numel(moe.shared) + moe.config.top_k * per_expert


def count_params(model_or_config: nn.Module | ModelConfig) -> ParamCount:
    """Count over the model's parameters. A ModelConfig is counted as the decoder-only
    `MoETransformer` it describes, built on the meta device (no memory, any size)."""
    if isinstance(model_or_config, ModelConfig):
        with torch.device("meta"):
            model = MoETransformer(model_or_config)
    else:
        model = model_or_config
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    inactive = sum(_numel(moe) - _moe_active_params(moe) for moe in _top_level_moes(model))
    vocab_modules = [getattr(model, name, None) for name in ("tok_embeddings", "output")]
    vocab_params = {id(p): p.numel() for m in vocab_modules if m is not None for p in m.parameters()}
    return ParamCount(total=total, active=total - inactive, embedding=sum(vocab_params.values()))


def _top_level_moes(module: nn.Module) -> list[MoE]:
    """MoE layers not nested in another MoE (hierarchical inner layers are counted by their parent)."""
    found: list[MoE] = []
    for child in module.children():
        found.extend([child] if isinstance(child, MoE) else _top_level_moes(child))
    return found


# ---------------------------------------------------------------------- FLOPs


def _expert_matrices(moe: MoEConfig) -> int:
    return 3 if moe.is_glu else 2


def shared_hidden_dim(moe: MoEConfig) -> int:
    if moe.num_shared_experts == 0:
        return 0
    return moe.shared_hidden_dim or moe.hidden_dim * moe.num_shared_experts


def moe_ffn_flops(moe: MoEConfig) -> int:
    """Expert FLOPs of one token in one MoE layer: top_k routed experts + shared experts."""
    if moe.inner is not None:  # hierarchical: each expert is an MoE layer, its router included
        per_expert = moe_ffn_flops(moe.inner) + moe_router_flops(moe.inner)
    else:
        per_expert = 2 * _expert_matrices(moe) * moe.dim * moe.hidden_dim
    shared = 2 * _expert_matrices(moe) * moe.dim * shared_hidden_dim(moe)
    return moe.top_k * per_expert + shared


def moe_router_flops(moe: MoEConfig) -> int:
    gates = 2 if moe.router == "noisy_topk" else 1  # noisy top-k computes a noise-scale gate too
    flops = gates * 2 * moe.dim * moe.num_experts
    if moe.num_shared_experts and moe.shared_gate:
        flops += 2 * moe.dim
    return flops


def flops_per_token(config: ModelConfig, seq_len: int) -> FlopCount:
    """Forward FLOPs per token of the decoder-only model at context length `seq_len`."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid: expected a positive integer")
    D, H, G, K = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
    projections = 2 * D * (H * K + 2 * G * K) + 2 * H * K * D  # q, k, v in; o out
    scores = 2 * 2 * H * K * seq_len  # QK^T and AV against seq_len keys
    ffn = router = 0
    for i in range(config.n_layers):
        if config.is_moe_layer(i):
            ffn += moe_ffn_flops(config.moe)
            router += moe_router_flops(config.moe)
        else:
            matrices = DENSE_FFN_MATRICES if config.ffn_activation in ("swiglu", "geglu") else 2
            ffn += 2 * matrices * D * config.ffn_hidden_dim
    return FlopCount(
        attention=config.n_layers * (projections + scores),
        ffn=ffn,
        router=router,
        lm_head=2 * D * config.vocab_size,
    )


def dense_baseline(config: ModelConfig) -> ModelConfig:
    """A dense config (moe=None) whose SwiGLU FFNs spend the MoE model's FFN FLOPs per token.

    Every layer gets the same hidden size: the MoE model's FFN FLOPs (experts + shared, and its
    dense layers) spread over n_layers SwiGLU FFNs. For GLU experts in every layer that is
    top_k * hidden_dim + shared hidden; it is rounded to an integer when the division is not exact
    (non-GLU experts, mixed layers of other widths), so FLOPs then match to within a rounding.
    Attention, LM head and the router-free rest are unchanged; only the router FLOPs are gone.
    """
    per_layer = 2 * DENSE_FFN_MATRICES * config.dim * config.n_layers
    hidden = round(flops_per_token(config, 1).ffn / per_layer)
    return dataclasses.replace(config, moe=None, moe_every=1, n_dense_first=0, ffn_hidden_dim=max(1, hidden))
