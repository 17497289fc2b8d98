"""DeepSeek-V3 (transformers `deepseek_v3`) <-> moekit.

attention   multi-head latent attention (ModelConfig.mla, mla.py): q through `q_a_proj`,
            `q_a_layernorm`, `q_b_proj` (or one `q_proj` when q_lora_rank is null); keys and
            values from `kv_a_proj_with_mqa` -> `kv_a_layernorm` -> `kv_b_proj`; the latent
            RMSNorms use eps 1e-6 whatever rms_norm_eps says (transformers' default argument).
            Softmax scale 1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN.
rotary      `rope_interleave` (default true) pairs dims (0, 1), (2, 3), ...; moekit pairs (j, j + R/2).
            Loading permutes the rotary rows of q_b_proj / q_proj and kv_a_proj_with_mqa
            (even dims first), saving permutes them back: identical attention scores.
MoE         layer i is sparse iff i >= first_k_dense_replace (n_dense_first); dense layers are
            SwiGLU MLPs of `intermediate_size`. Router "sigmoid_bias": sigmoid scores plus
            `e_score_correction_bias` choose, group-limited (n_group groups scored by their top-2,
            topk_group kept, the rest masked with -inf, as in 5.23), weights are the unbiased
            scores, normalized with norm_topk_prob, times routed_scaling_factor. Shared experts:
            one SwiGLU MLP of n_shared_experts * moe_intermediate_size, ungated.
losses      transformers has no balance loss for DeepSeek-V3: both coefficients are 0.
extra keys  multi-token-prediction layers (model.layers.{n_layers..}) are ignored.
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.hf import common as C
from moekit.hf.io import CheckpointFormatError
from moekit.hf.plan import ALL, HFTensor, Piece, whole
from moekit.model import ModelConfig
from moekit.model.config import MLAConfig
from moekit.model.rope import rope_type, yarn_mscale
from moekit.moe import MoEConfig

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"
DEFAULT_THETA = 10000.0
DEFAULTS: dict[str, Any] = {  # DeepseekV3Config, transformers 5.23
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "attention_bias": False,
}
MLA_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, used for q_a_layernorm and kv_a_layernorm


def softmax_scale(hf: dict[str, Any], qk_head_dim: int, theta_scaling: dict[str, Any] | None) -> float | None:
    """DeepSeek's YaRN correction of the softmax scale (None = plain 1/sqrt(qk_head_dim))."""
    if rope_type(theta_scaling) == "default" or not (theta_scaling or {}).get("mscale_all_dim"):
        return None
    mscale = yarn_mscale(theta_scaling["factor"], theta_scaling["mscale_all_dim"])
    return qk_head_dim**-0.5 * mscale * mscale


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = C.with_defaults(hf, DEFAULTS)
    C.check_silu(hf, MODEL_TYPE)
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise CheckpointFormatError(
            f"deepseek_v3 scoring_func={hf['scoring_func']!r} is not supported: expected 'sigmoid'"
        )
    heads = hf["num_attention_heads"]
    if (hf.get("num_key_value_heads") or heads) != heads:
        raise CheckpointFormatError(
            f"deepseek_v3 num_key_value_heads={hf['num_key_value_heads']} must equal num_attention_heads={heads} "
            "(MLA expands keys and values per head)"
        )
    if not hf.get("n_shared_experts"):
        raise CheckpointFormatError(
            "deepseek_v3 without shared experts (n_shared_experts=0) is not supported"
        )
    if hf["first_k_dense_replace"] >= hf["num_hidden_layers"]:
        raise CheckpointFormatError(
            f"deepseek_v3 config.json makes no layer sparse (first_k_dense_replace={hf['first_k_dense_replace']}, "
            f"num_hidden_layers={hf['num_hidden_layers']}): moekit imports MoE models only"
        )
    fields = C.llama_fields({**hf, "head_dim": None}, DEFAULT_THETA)
    mla = MLAConfig(
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        q_lora_rank=hf["q_lora_rank"],
        latent_norm_eps=MLA_NORM_EPS,
        softmax_scale=softmax_scale(
            hf, hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"], fields["rope_scaling"]
        ),
    )
    moe = MoEConfig(
        dim=hf["hidden_size"],
        hidden_dim=hf["moe_intermediate_size"],
        num_experts=C.pick(hf, "n_routed_experts", "num_local_experts"),
        top_k=hf["num_experts_per_tok"],
        router="sigmoid_bias",
        norm_topk_prob=bool(hf["norm_topk_prob"]),
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=float(hf["routed_scaling_factor"]),
        activation="swiglu",
        num_shared_experts=hf["n_shared_experts"],
        shared_hidden_dim=hf["n_shared_experts"] * hf["moe_intermediate_size"],
        load_balance_coef=0.0,
        z_loss_coef=0.0,
    )
    bias = bool(hf["attention_bias"])
    fields["head_dim"] = mla.qk_head_dim
    return ModelConfig(
        **fields,
        ffn_hidden_dim=hf["intermediate_size"],
        qkv_bias=bias,
        attn_out_bias=bias,
        mla=mla,
        moe=moe,
        n_dense_first=hf["first_k_dense_replace"],
        extra={"hf_config": hf},
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = C.base_config(cfg, MODEL_TYPE, ARCHITECTURE)
    hf.pop("num_local_experts", None)
    hf.update(C.llama_fields_to_hf(cfg))
    moe, mla = cfg.moe, cfg.mla
    if mla is None:
        raise ValueError(
            "this model cannot be saved as deepseek_v3: it has no multi-head latent attention (mla)"
        )
    shared = moe.shared_hidden_dim or moe.hidden_dim * moe.num_shared_experts
    hf.update(
        head_dim=mla.qk_rope_head_dim,  # what DeepseekV3Config sets it to anyway
        intermediate_size=cfg.ffn_hidden_dim,
        moe_intermediate_size=moe.hidden_dim,
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        n_group=moe.n_group,
        topk_group=moe.topk_group,
        routed_scaling_factor=moe.routed_scaling_factor,
        norm_topk_prob=moe.norm_topk_prob,
        n_shared_experts=max(1, shared // moe.hidden_dim),
        first_k_dense_replace=next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), cfg.n_layers),
        kv_lora_rank=mla.kv_lora_rank,
        q_lora_rank=mla.q_lora_rank,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        v_head_dim=mla.v_head_dim,
        attention_bias=cfg.qkv_bias,
        rope_interleave=interleaved(cfg),
    )
    return hf


def interleaved(cfg: ModelConfig) -> bool:
    return bool((cfg.extra.get("hf_config") or {}).get("rope_interleave", True))


def rotary_rows(head_rows: int, nope: int, rope: int, heads: int, interleave: bool) -> tuple[Any, ...]:
    """src index giving moekit's row order: within each head's rotary part, even dims then odd ones."""
    if not interleave:
        return ()
    within = (
        list(range(nope))
        + [nope + 2 * j for j in range(rope // 2)]
        + [nope + 2 * j + 1 for j in range(rope // 2)]
    )
    return (torch.tensor([h * head_rows + r for h in range(heads) for r in within]),)


def mla_plan(cfg: ModelConfig, i: int) -> list[HFTensor]:
    mla, hf, me, d, h = cfg.mla, f"model.layers.{i}.self_attn", f"layers.{i}.attn", cfg.dim, cfg.n_heads
    qk, inter = mla.qk_head_dim, interleaved(cfg)
    q_rows = rotary_rows(qk, mla.qk_nope_head_dim, mla.qk_rope_head_dim, h, inter)
    plan = []
    if mla.q_lora_rank is None:
        plan.append(HFTensor(f"{hf}.q_proj.weight", (h * qk, d), (Piece(f"{me}.wq.weight", src=q_rows),)))
    else:
        r = mla.q_lora_rank
        plan.append(whole(f"{hf}.q_a_proj.weight", (r, d), f"{me}.wq_a.weight"))
        if cfg.qkv_bias:
            plan.append(whole(f"{hf}.q_a_proj.bias", (r,), f"{me}.wq_a.bias"))
        plan.append(whole(f"{hf}.q_a_layernorm.weight", (r,), f"{me}.q_norm.weight"))
        plan.append(HFTensor(f"{hf}.q_b_proj.weight", (h * qk, r), (Piece(f"{me}.wq_b.weight", src=q_rows),)))
    c, rope = mla.kv_lora_rank, mla.qk_rope_head_dim
    kv_rows = rotary_rows(c + rope, c, rope, 1, inter)
    plan.append(
        HFTensor(
            f"{hf}.kv_a_proj_with_mqa.weight", (c + rope, d), (Piece(f"{me}.wkv_a.weight", src=kv_rows),)
        )
    )
    if cfg.qkv_bias:
        plan.append(
            HFTensor(f"{hf}.kv_a_proj_with_mqa.bias", (c + rope,), (Piece(f"{me}.wkv_a.bias", src=kv_rows),))
        )
    plan.append(whole(f"{hf}.kv_a_layernorm.weight", (c,), f"{me}.kv_norm.weight"))
    kv_b = (h * (mla.qk_nope_head_dim + mla.v_head_dim), c)
    plan.append(whole(f"{hf}.kv_b_proj.weight", kv_b, f"{me}.wkv_b.weight"))
    plan.append(whole(f"{hf}.o_proj.weight", (d, h * mla.v_head_dim), f"{me}.wo.weight"))
    if cfg.attn_out_bias:
        plan.append(whole(f"{hf}.o_proj.bias", (d,), f"{me}.wo.bias"))
    return plan


def moe_plan(cfg: ModelConfig, i: int, fused: bool) -> list[HFTensor]:
    moe, hf, me, e = cfg.moe, f"model.layers.{i}.mlp", f"layers.{i}.ffn", cfg.moe.num_experts
    shared = moe.shared_hidden_dim or moe.hidden_dim * moe.num_shared_experts
    names = ("gate_proj", "up_proj", "down_proj")
    return [
        whole(f"{hf}.gate.weight", (e, cfg.dim), f"{me}.router.gate.weight"),
        HFTensor(f"{hf}.gate.e_score_correction_bias", (e,), (Piece(f"{me}.router.expert_bias", (ALL,)),)),
        *C.glu_bank_plan(f"{me}.experts", f"{hf}.experts", e, cfg.dim, moe.hidden_dim, fused, names),
        *C.shared_expert_plan(f"{me}.shared.bank", f"{hf}.shared_experts", cfg.dim, shared),
    ]


def tensor_plan(cfg: ModelConfig, fused: bool) -> list[HFTensor]:
    layers = []
    for i in range(cfg.n_layers):
        mlp = (
            moe_plan(cfg, i, fused)
            if cfg.is_moe_layer(i)
            else C.dense_mlp_plan(cfg, i, f"model.layers.{i}.mlp")
        )
        layers.append(C.norms_plan(cfg, i) + mla_plan(cfg, i) + mlp)
    return C.lm_plan(cfg, layers)


def ignored(key: str, cfg: ModelConfig) -> bool:
    """Rotary buffers, a tied lm_head, and the multi-token-prediction layers past n_layers."""
    if C.llama_ignored(key, cfg):
        return True
    parts = key.split(".")
    return (
        len(parts) > 2
        and parts[:2] == ["model", "layers"]
        and parts[2].isdigit()
        and int(parts[2]) >= cfg.n_layers
    )
