"""Mixtral (transformers `mixtral`) <-> moekit.

    attention   GQA, no biases, optional `sliding_window` on every layer
    MoE         every layer; softmax router, top-k renormalized (router="topk", norm_topk_prob);
                SwiGLU experts of `intermediate_size`
    on disk     per-expert `block_sparse_moe.experts.{j}.w1/w3/w2` + `block_sparse_moe.gate`,
                fused `mlp.experts.gate_up_proj/down_proj` + `mlp.gate`
    losses      transformers' `load_balancing_loss_func` with `router_aux_loss_coef`

`router_jitter_noise` (training-only input jitter, which transformers applies in place) has no
moekit counterpart for the top-k router; it is ignored with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

from moekit.hf import common as C
from moekit.hf.plan import HFTensor, whole
from moekit.model import ModelConfig

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"
DEFAULT_THETA = 1e6
DEFAULTS: dict[str, Any] = {  # MixtralConfig, transformers 5.23
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = C.with_defaults(hf, DEFAULTS)
    C.check_silu(hf, MODEL_TYPE)
    if hf.get("router_jitter_noise"):
        warnings.warn("mixtral router_jitter_noise is not reproduced by moekit's top-k router", stacklevel=3)
    moe = C.topk_moe_fields(
        hf, hf["intermediate_size"], C.pick(hf, "num_local_experts", "num_experts"), norm_topk_prob=True
    )
    return ModelConfig(
        **C.llama_fields(hf, DEFAULT_THETA),
        ffn_hidden_dim=hf["intermediate_size"],
        sliding_window=hf.get("sliding_window"),
        moe=moe,
        extra={"hf_config": hf},
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = C.topk_moe_config_to_hf(cfg, MODEL_TYPE, ARCHITECTURE, "num_local_experts", norm_topk_prob=False)
    hf.update(intermediate_size=cfg.moe.hidden_dim, sliding_window=cfg.sliding_window)
    return hf


def tensor_plan(cfg: ModelConfig, fused: bool) -> list[HFTensor]:
    moe, layers = cfg.moe, []
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}.{'mlp' if fused else 'block_sparse_moe'}"
        router = whole(f"{hf}.gate.weight", (moe.num_experts, cfg.dim), f"layers.{i}.ffn.router.gate.weight")
        bank = C.glu_bank_plan(
            f"layers.{i}.ffn.experts",
            f"{hf}.experts",
            moe.num_experts,
            cfg.dim,
            moe.hidden_dim,
            fused,
            ("w1", "w3", "w2"),
        )
        layers.append(C.norms_plan(cfg, i) + C.gqa_plan(cfg, i) + [router] + bank)
    return C.lm_plan(cfg, layers)


ignored = C.llama_ignored
