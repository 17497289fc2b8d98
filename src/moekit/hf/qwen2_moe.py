"""Qwen2-MoE (transformers `qwen2_moe`) <-> moekit.

attention   GQA with q/k/v biases (`qkv_bias`), no output bias; sliding windows on the layers
            `layer_types` marks "sliding_attention" (5.23 derives them from use_sliding_window
            and max_window_layers: even layers below max_window_layers)
MoE         layer i is sparse iff i not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0;
            dense layers are SwiGLU MLPs of `intermediate_size`, experts of `moe_intermediate_size`
            softmax router, top-k, renormalized only with `norm_topk_prob` (default False)
            one shared expert of `shared_expert_intermediate_size`, scaled by
            sigmoid(x W_gate): moekit's shared experts with `shared_gate`
on disk     `mlp.gate`, `mlp.experts.{j}.{gate,up,down}_proj` or fused, `mlp.shared_expert.*`,
            `mlp.shared_expert_gate`
"""

from __future__ import annotations

from typing import Any

from moekit.hf import common as C
from moekit.hf.io import CheckpointFormatError
from moekit.hf.plan import HFTensor, whole
from moekit.model import ModelConfig

MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"
DEFAULT_THETA = 10000.0
DEFAULTS: dict[str, Any] = {  # Qwen2MoeConfig, transformers 5.23
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
    "mlp_only_layers": [],
    "qkv_bias": True,
}


def layer_types(hf: dict[str, Any]) -> list[str]:
    """`layer_types` as given, else as Qwen2MoeConfig derives it."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    sliding = hf.get("use_sliding_window", False)
    return [
        "sliding_attention" if (i + 1) % 2 and i < hf["max_window_layers"] and sliding else "full_attention"
        for i in range(hf["num_hidden_layers"])
    ]


def windows_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """sliding_window / sliding_window_layers of a config with per-layer `layer_types`."""
    types = layer_types(hf)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding or not hf.get("sliding_window"):
        return {"sliding_window": None, "sliding_window_layers": None}
    layers = None if len(sliding) == len(types) else sliding
    return {"sliding_window": hf["sliding_window"], "sliding_window_layers": layers}


def windows_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    types = [
        "full_attention" if cfg.layer_window(i) is None else "sliding_attention" for i in range(cfg.n_layers)
    ]
    sliding = cfg.sliding_window is not None and "sliding_attention" in types
    return {
        "layer_types": types,
        "use_sliding_window": sliding,
        "sliding_window": cfg.sliding_window if sliding else 0,
    }


def sparse_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """moe_every / sparse_layers of the `mlp_only_layers` + `decoder_sparse_step` rule."""
    step, dense = hf["decoder_sparse_step"], set(hf.get("mlp_only_layers") or [])
    n = hf["num_hidden_layers"]
    if not any(i not in dense and (i + 1) % step == 0 for i in range(n)):
        raise CheckpointFormatError(
            f"{hf['model_type']} config.json makes no layer sparse (num_hidden_layers={n}, "
            f"decoder_sparse_step={step}, mlp_only_layers={sorted(dense)}): moekit imports MoE models only"
        )
    if not dense:
        return {"moe_every": step}
    return {
        "sparse_layers": [i for i in range(hf["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]
    }


def sparse_to_hf(cfg: ModelConfig, base_step: int) -> dict[str, Any]:
    """decoder_sparse_step and mlp_only_layers giving cfg's MoE layers (the source's step if it can)."""
    sparse = set(cfg.moe_layer_ids())
    for step in (base_step, 1):
        rule = {i for i in range(cfg.n_layers) if (i + 1) % step == 0}
        if sparse <= rule:
            return {"decoder_sparse_step": step, "mlp_only_layers": sorted(rule - sparse)}
    raise AssertionError("step 1 covers every layer")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = C.with_defaults(hf, DEFAULTS)
    C.check_silu(hf, MODEL_TYPE)
    moe = C.topk_moe_fields(
        hf,
        hf["moe_intermediate_size"],
        C.pick(hf, "num_experts", "num_local_experts"),
        num_shared_experts=1,
        shared_hidden_dim=hf["shared_expert_intermediate_size"],
        shared_gate=True,
    )
    return ModelConfig(
        **C.llama_fields(hf, DEFAULT_THETA),
        ffn_hidden_dim=hf["intermediate_size"],
        qkv_bias=bool(hf["qkv_bias"]),
        moe=moe,
        **sparse_from_hf(hf),
        **windows_from_hf(hf),
        extra={"hf_config": hf},
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = C.topk_moe_config_to_hf(cfg, MODEL_TYPE, ARCHITECTURE)
    moe = cfg.moe
    hf.update(
        intermediate_size=cfg.ffn_hidden_dim,
        moe_intermediate_size=moe.hidden_dim,
        shared_expert_intermediate_size=moe.shared_hidden_dim or moe.hidden_dim * moe.num_shared_experts,
        qkv_bias=cfg.qkv_bias,
        **sparse_to_hf(cfg, hf.get("decoder_sparse_step", 1)),
        **windows_to_hf(cfg),
    )
    return hf


def moe_block_plan(cfg: ModelConfig, i: int, fused: bool, shared: bool) -> list[HFTensor]:
    """Router, experts (and the gated shared expert) of a Qwen-style sparse block."""
    moe, hf, me = cfg.moe, f"model.layers.{i}.mlp", f"layers.{i}.ffn"
    plan = [whole(f"{hf}.gate.weight", (moe.num_experts, cfg.dim), f"{me}.router.gate.weight")]
    names = ("gate_proj", "up_proj", "down_proj")
    plan += C.glu_bank_plan(
        f"{me}.experts", f"{hf}.experts", moe.num_experts, cfg.dim, moe.hidden_dim, fused, names
    )
    if shared:
        plan += C.shared_expert_plan(
            f"{me}.shared.bank", f"{hf}.shared_expert", cfg.dim, moe.shared_hidden_dim
        )
        plan.append(whole(f"{hf}.shared_expert_gate.weight", (1, cfg.dim), f"{me}.shared.gate.weight"))
    return plan


def qwen_tensor_plan(cfg: ModelConfig, fused: bool, shared: bool) -> list[HFTensor]:
    """Every tensor of a Qwen-style model (Qwen2-MoE with its shared expert, Qwen3-MoE without)."""
    layers = []
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            mlp = moe_block_plan(cfg, i, fused, shared=shared)
        else:
            mlp = C.dense_mlp_plan(cfg, i, f"model.layers.{i}.mlp")
        layers.append(C.norms_plan(cfg, i) + C.gqa_plan(cfg, i) + mlp)
    return C.lm_plan(cfg, layers)


def tensor_plan(cfg: ModelConfig, fused: bool) -> list[HFTensor]:
    return qwen_tensor_plan(cfg, fused, shared=True)


ignored = C.llama_ignored
