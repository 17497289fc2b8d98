"""GPT-OSS (transformers `gpt_oss`) <-> moekit.

attention   GQA with biases on q, k, v and o (`attention_bias`), a learned sink logit per head
            (`sinks`, attention_sinks), sliding windows on the layers `layer_types` marks
            "sliding_attention" (by default the even ones), YaRN rotary (the config default)
MoE         every layer; router with bias, top-k of the logits then softmax over the k
            (router "topk_then_softmax", router_bias); experts with biases and the clamped
            activation (up + 1) * g * sigmoid(1.702 g), g = gate.clamp(max=7), up.clamp(-7, 7)
            (activation "gpt_oss"; swiglu_alpha and swiglu_limit must be 1.702 and 7)
on disk     one layout only (transformers has no per-expert form for GPT-OSS):
            `mlp.router.{weight,bias}`, `mlp.experts.gate_up_proj` [E, D, 2F] with gate in the
            EVEN columns and up in the odd ones, `gate_up_proj_bias` [E, 2F], `down_proj`
            [E, F, D], `down_proj_bias` [E, D]. moekit's w_in_EDF holds [gate | up] halves, so
            the columns are de-interleaved on load and interleaved again on save.
            MXFP4-quantized hub checkpoints (`*_blocks`, `*_scales`) are refused: dequantize
            them with transformers first.
"""

from __future__ import annotations

from typing import Any

from moekit.hf import common as C
from moekit.hf.io import CheckpointFormatError
from moekit.hf.plan import ALL, HFTensor, Piece, whole
from moekit.hf.qwen2_moe import layer_types
from moekit.model import ModelConfig
from moekit.moe.activations import GPT_OSS_ALPHA, GPT_OSS_LIMIT

MODEL_TYPE = "gpt_oss"
ARCHITECTURE = "GptOssForCausalLM"
DEFAULT_THETA = 150000.0
DEFAULT_ROPE = {  # GptOssConfig.__post_init__ when rope_parameters is None
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
DEFAULTS: dict[str, Any] = {  # GptOssConfig, transformers 5.23
    "num_hidden_layers": 36,
    "num_local_experts": 128,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "num_experts_per_tok": 4,
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "router_aux_loss_coef": 0.001,
    "attention_bias": True,
    "max_window_layers": 0,  # layer_types' fallback: GPT-OSS's rule is "every even layer"
}


def _layer_types(hf: dict[str, Any]) -> list[str]:
    if hf.get("layer_types"):
        return layer_types(hf)
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(hf["num_hidden_layers"])]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = C.with_defaults(hf, DEFAULTS)
    if hf.get("quantization_config"):
        raise CheckpointFormatError(
            f"gpt_oss with quantization_config {hf['quantization_config'].get('quant_method')!r} is not "
            "supported: dequantize in transformers (Mxfp4Config(dequantize=True)) and save it first"
        )
    for name, value in (("swiglu_alpha", GPT_OSS_ALPHA), ("swiglu_limit", GPT_OSS_LIMIT)):
        if float(hf[name]) != value:
            raise CheckpointFormatError(
                f"gpt_oss {name}={hf[name]} is not supported: moekit's gpt_oss activation uses {value}"
            )
    if not hf.get("rope_parameters") and not hf.get("rope_scaling"):
        hf["rope_parameters"] = {**DEFAULT_ROPE, "rope_theta": hf.get("rope_theta", DEFAULT_THETA)}
    types = _layer_types(hf)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    window = hf["sliding_window"] if sliding else None
    moe = C.moe_fields(
        hf,
        hidden_dim=hf["intermediate_size"],
        num_experts=C.pick(hf, "num_local_experts", "num_experts"),
        top_k=hf["num_experts_per_tok"],
        router="topk_then_softmax",
        router_bias=True,
        expert_bias=True,
        activation="gpt_oss",
    )
    bias = bool(hf["attention_bias"])
    return ModelConfig(
        **C.llama_fields(hf, DEFAULT_THETA),
        ffn_hidden_dim=hf["intermediate_size"],
        qkv_bias=bias,
        attn_out_bias=bias,
        attention_sinks=True,
        sliding_window=window,
        sliding_window_layers=None if window is None or len(sliding) == len(types) else sliding,
        moe=moe,
        extra={"hf_config": hf},
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = C.base_config(cfg, MODEL_TYPE, ARCHITECTURE)
    hf.pop("num_experts", None)
    hf.update(C.llama_fields_to_hf(cfg))
    moe = cfg.moe
    types = [
        "full_attention" if cfg.layer_window(i) is None else "sliding_attention" for i in range(cfg.n_layers)
    ]
    hf.update(
        intermediate_size=moe.hidden_dim,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.load_balance_coef,
        attention_bias=cfg.qkv_bias,
        sliding_window=cfg.sliding_window
        if cfg.sliding_window is not None
        else hf.get("sliding_window", 128),
        layer_types=types,
        swiglu_alpha=GPT_OSS_ALPHA,
        swiglu_limit=GPT_OSS_LIMIT,
    )
    return hf


def experts_plan(cfg: ModelConfig, i: int) -> list[HFTensor]:
    moe, hf, me = cfg.moe, f"model.layers.{i}.mlp", f"layers.{i}.ffn"
    e, d, f = moe.num_experts, cfg.dim, moe.hidden_dim
    gate, up = slice(0, 2 * f, 2), slice(1, 2 * f, 2)  # interleaved columns on disk
    w_in, b_in = f"{me}.experts.w_in_EDF", f"{me}.experts.b_in_EF"
    return [
        whole(f"{hf}.router.weight", (e, d), f"{me}.router.gate.weight"),
        whole(f"{hf}.router.bias", (e,), f"{me}.router.gate.bias"),
        HFTensor(
            f"{hf}.experts.gate_up_proj",
            (e, d, 2 * f),
            (Piece(w_in, (ALL, ALL, slice(0, f)), (ALL, ALL, gate)), Piece(w_in, (ALL, ALL, slice(f, 2 * f)), (ALL, ALL, up))),
        ),
        HFTensor(
            f"{hf}.experts.gate_up_proj_bias",
            (e, 2 * f),
            (Piece(b_in, (ALL, slice(0, f)), (ALL, gate)), Piece(b_in, (ALL, slice(f, 2 * f)), (ALL, up))),
        ),
        whole(f"{hf}.experts.down_proj", (e, f, d), f"{me}.experts.w_out_EFD"),
        whole(f"{hf}.experts.down_proj_bias", (e, d), f"{me}.experts.b_out_ED"),
    ]  # fmt: skip


def tensor_plan(cfg: ModelConfig, fused: bool) -> list[HFTensor]:
    del fused  # one layout only
    layers = [C.norms_plan(cfg, i) + C.gqa_plan(cfg, i) + experts_plan(cfg, i) for i in range(cfg.n_layers)]
    return C.lm_plan(cfg, layers)


def ignored(key: str, cfg: ModelConfig) -> bool:
    if key.endswith(("_blocks", "_scales")):
        raise CheckpointFormatError(
            f"{key!r} is an MXFP4-quantized expert tensor: dequantize in transformers "
            "(Mxfp4Config(dequantize=True)) and save the model before loading it into moekit"
        )
    return C.llama_ignored(key, cfg)
