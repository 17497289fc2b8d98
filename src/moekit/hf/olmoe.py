"""OLMoE (transformers `olmoe`) <-> moekit.

attention   GQA; `attention_bias` on q, k, v and o; q and k RMS-normalized over the WHOLE
            projection (q_norm has hidden_size weights, k_norm (hidden_size // heads) * kv_heads),
            before the split into heads and before rotary: qk_norm with scope "full";
            then `clip_qkv` clamps q, k and v
MoE         every layer; softmax router, top-k, renormalized with `norm_topk_prob`
head dim    always hidden_size // num_attention_heads (OlmoeConfig has no head_dim)
"""

from __future__ import annotations

from typing import Any

from moekit.hf import common as C
from moekit.hf.plan import HFTensor
from moekit.hf.qwen2_moe import moe_block_plan
from moekit.model import ModelConfig

MODEL_TYPE = "olmoe"
ARCHITECTURE = "OlmoeForCausalLM"
DEFAULT_THETA = 10000.0
DEFAULTS: dict[str, Any] = {  # OlmoeConfig, transformers 5.23
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": None,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "clip_qkv": None,
    "num_experts_per_tok": 8,
    "num_experts": 64,
    "router_aux_loss_coef": 0.01,
    "norm_topk_prob": False,
}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = C.with_defaults(hf, DEFAULTS)
    C.check_silu(hf, MODEL_TYPE)
    moe = C.topk_moe_fields(hf, hf["intermediate_size"], C.pick(hf, "num_experts", "num_local_experts"))
    fields = C.llama_fields({**hf, "head_dim": None}, DEFAULT_THETA)  # OLMoE ignores any head_dim
    bias = bool(hf["attention_bias"])
    return ModelConfig(
        **fields,
        ffn_hidden_dim=hf["intermediate_size"],
        qkv_bias=bias,
        attn_out_bias=bias,
        qk_norm=True,
        qk_norm_scope="full",
        clip_qkv=hf["clip_qkv"],
        moe=moe,
        extra={"hf_config": hf},
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = C.topk_moe_config_to_hf(cfg, MODEL_TYPE, ARCHITECTURE)
    hf.pop("head_dim")
    hf.update(intermediate_size=cfg.moe.hidden_dim, attention_bias=cfg.qkv_bias, clip_qkv=cfg.clip_qkv)
    return hf


def tensor_plan(cfg: ModelConfig, fused: bool) -> list[HFTensor]:
    layers = [
        C.norms_plan(cfg, i) + C.gqa_plan(cfg, i) + moe_block_plan(cfg, i, fused, shared=False)
        for i in range(cfg.n_layers)
    ]
    return C.lm_plan(cfg, layers)


ignored = C.llama_ignored
