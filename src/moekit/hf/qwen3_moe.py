"""Qwen3-MoE (transformers `qwen3_moe`) <-> moekit.

attention   GQA; `attention_bias` puts biases on q, k, v AND o; RMSNorm over each head of q and
            k before rotary (qk_norm, scope "head"); with `use_sliding_window` every layer
            uses `sliding_window`
MoE         the Qwen2-MoE layer rule (`mlp_only_layers`, `decoder_sparse_step`), no shared expert;
            softmax router, top-k, renormalized with `norm_topk_prob`
config      5.23 saves the expert count as `num_local_experts`, hub configs as `num_experts`;
            both are read, `num_experts` is written (5.23 maps it, 4.x reads only it)
"""

from __future__ import annotations

from typing import Any

from moekit.hf import common as C
from moekit.hf.plan import HFTensor
from moekit.hf.qwen2_moe import qwen_tensor_plan, sparse_from_hf, sparse_to_hf
from moekit.model import ModelConfig

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
DEFAULT_THETA = 10000.0
DEFAULTS: dict[str, Any] = {  # Qwen3MoeConfig, transformers 5.23
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 768,
    "num_experts_per_tok": 8,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
    "mlp_only_layers": [],
}
DEFAULT_EXPERTS = 128


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = C.with_defaults(hf, DEFAULTS)
    C.check_silu(hf, MODEL_TYPE)
    experts = hf.get("num_experts") or hf.get("num_local_experts") or DEFAULT_EXPERTS
    moe = C.topk_moe_fields(hf, hf["moe_intermediate_size"], experts)
    bias = bool(hf["attention_bias"])
    return ModelConfig(
        **C.llama_fields(hf, DEFAULT_THETA),
        ffn_hidden_dim=hf["intermediate_size"],
        qkv_bias=bias,
        attn_out_bias=bias,
        qk_norm=True,
        qk_norm_scope="head",
        sliding_window=hf["sliding_window"] if hf["use_sliding_window"] else None,
        moe=moe,
        **sparse_from_hf(hf),
        extra={"hf_config": hf},
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = C.topk_moe_config_to_hf(cfg, MODEL_TYPE, ARCHITECTURE)
    hf.update(
        intermediate_size=cfg.ffn_hidden_dim,
        moe_intermediate_size=cfg.moe.hidden_dim,
        attention_bias=cfg.qkv_bias,
        use_sliding_window=cfg.sliding_window is not None,
        sliding_window=cfg.sliding_window,
        **sparse_to_hf(cfg, hf.get("decoder_sparse_step", 1)),
    )
    return hf


def tensor_plan(cfg: ModelConfig, fused: bool) -> list[HFTensor]:
    return qwen_tensor_plan(cfg, fused, shared=False)


ignored = C.llama_ignored
