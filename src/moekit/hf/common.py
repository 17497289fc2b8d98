"""Pieces the decoder families share: config fields, rotary parameters, Llama-style tensor plans,
and the round-trip check that refuses to save a model a family cannot express.

Every decoder family here is a Llama-style stack (`model.embed_tokens`, `model.layers.{i}` with
`input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`, then `model.norm`, `lm_head`);
the family modules differ in attention options, the MoE block and config names.

Expert banks on disk come in two layouts (transformers 5.23):
  per-expert  `{prefix}.experts.{j}.{gate,up,down}_proj.weight`  [F, D], [F, D], [D, F]
              (hub checkpoints and `save_pretrained()`; Mixtral names them w1, w3, w2)
  fused       `{prefix}.experts.gate_up_proj` [E, 2F, D] (gate rows first), `.down_proj` [E, D, F]
              (`save_pretrained(save_original_format=False)`, the in-memory layout)
moekit holds `w_in_EDF` [E, D, 2F] (gate columns first) and `w_out_EFD` [E, F, D]: transposes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moekit.hf.io import CheckpointFormatError
from moekit.hf.plan import ALL, HFTensor, Piece, whole
from moekit.model import ModelConfig
from moekit.moe import MoEConfig

SILU_NAMES = ("silu", "swish")
# keys transformers drops when it builds the model; older exports carry them
ROTARY_BUFFER_SUFFIX = "rotary_emb.inv_freq"


# ---------------------------------------------------------------------- config helpers
def with_defaults(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The config dict with the family's transformers defaults filled in where keys are absent
    (an explicit null stays null: DeepSeek's q_lora_rank=None means no query bottleneck)."""
    return {**defaults, **hf}


def pick(hf: dict[str, Any], *names: str) -> Any:
    """The first of `names` present and not None (config-name variants: num_experts / num_local_experts)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise CheckpointFormatError(f"config.json has none of {list(names)}")


def check_silu(hf: dict[str, Any], model_type: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act not in SILU_NAMES:
        raise CheckpointFormatError(
            f"{model_type} config.json hidden_act={act!r} is not supported: expected one of {list(SILU_NAMES)}"
        )


def rope_from_hf(hf: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointFormatError(f"per-layer-type rope_parameters {sorted(params)} are not supported")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", default_theta)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    scaling = {"rope_type": kind, **params}
    if kind == "yarn":  # transformers fills this in from max_position_embeddings
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, scaling


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.rope_scaling is None:
        return {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    return {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}


def llama_fields(hf: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """ModelConfig fields every Llama-style family reads the same way."""
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling = rope_from_hf(hf, default_theta)
    return dict(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or dim // heads,
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf["rms_norm_eps"]),
        dropout=float(hf.get("attention_dropout") or 0.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def llama_fields_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters=rope_to_hf(cfg),
        rms_norm_eps=cfg.norm_eps,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
    )


def moe_fields(hf: dict[str, Any], **kw: Any) -> MoEConfig:
    """The MoEConfig of a softmax-routed family: no z-loss (transformers has none), balance loss
    coefficient from router_aux_loss_coef."""
    fields = dict(
        activation="swiglu", load_balance_coef=float(hf.get("router_aux_loss_coef") or 0.0), z_loss_coef=0.0
    )
    return MoEConfig(dim=hf["hidden_size"], **{**fields, **kw})


def topk_moe_fields(hf: dict[str, Any], hidden_dim: int, num_experts: int, **kw: Any) -> MoEConfig:
    """moe_fields of a softmax top-k family (Mixtral, Qwen2/3-MoE, OLMoE): k from num_experts_per_tok,
    renormalized top-k weights as the config's norm_topk_prob says unless `kw` sets it."""
    kw.setdefault("norm_topk_prob", bool(hf.get("norm_topk_prob")))
    return moe_fields(
        hf,
        hidden_dim=hidden_dim,
        num_experts=num_experts,
        top_k=hf["num_experts_per_tok"],
        router="topk",
        **kw,
    )


def topk_moe_config_to_hf(
    cfg: ModelConfig,
    model_type: str,
    architecture: str,
    experts_key: str = "num_experts",
    norm_topk_prob: bool = True,
) -> dict[str, Any]:
    """The start of a top-k family's config.json: the base, the Llama-style fields, the expert count
    under `experts_key` (the other spelling dropped), k, the balance-loss coefficient and, unless the
    family has none, norm_topk_prob."""
    hf = base_config(cfg, model_type, architecture)
    hf.pop("num_local_experts" if experts_key == "num_experts" else "num_experts", None)
    hf.update(llama_fields_to_hf(cfg))
    moe = cfg.moe
    hf.update({experts_key: moe.num_experts, "num_experts_per_tok": moe.top_k})
    hf["router_aux_loss_coef"] = moe.load_balance_coef
    if norm_topk_prob:
        hf["norm_topk_prob"] = moe.norm_topk_prob
    return hf


def llama_ignored(key: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors a Llama-style family may carry that the model does not load: rotary
    buffers, and lm_head.weight (the plan names it when it is a tensor of its own)."""
    return ignore_rotary_buffers(key) or key == "lm_head.weight"


def base_config(cfg: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    """The source config (cfg.extra["hf_config"]) minus what a save rewrites: the start of a new config.json."""
    hf = dict(cfg.extra.get("hf_config") or {})
    if hf.get("model_type", model_type) != model_type:
        hf = {}  # a model converted from another family keeps nothing of its old config
    for key in ("rope_scaling", "rope_theta", "quantization_config", "transformers_version", "torch_dtype"):
        hf.pop(key, None)
    hf["model_type"] = model_type
    hf["architectures"] = [architecture]
    return hf


# ---------------------------------------------------------------------- round trip
def behaviour(cfg: ModelConfig) -> dict[str, Any]:
    """What decides a model's tensors and outputs, flattened: two configs with equal behaviour
    compute the same function (loss coefficients, dropout, metadata and cache sizes aside)."""
    n = cfg.n_layers
    moe_layers = [cfg.is_moe_layer(i) for i in range(n)]
    b: dict[str, Any] = {
        name: getattr(cfg, name)
        for name in (
            "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "norm_eps", "tie_embeddings",
            "qkv_bias", "qk_norm", "attn_out_bias", "clip_qkv", "attention_sinks", "position_encoding",
            "attn_scale", "output_scale",
        )
    }  # fmt: skip
    b["rope_theta"] = float(cfg.rope_theta)
    b["rope_scaling"] = _floats(cfg.rope_scaling)
    b["windows"] = [cfg.layer_window(i) for i in range(n)]
    b["moe_layers"] = moe_layers
    if cfg.qk_norm:
        b["qk_norm_scope"] = cfg.qk_norm_scope
    if cfg.mla is None:
        b["head_dim"] = cfg.head_dim
    else:
        b["mla"] = dataclasses.asdict(cfg.mla)
    if not all(moe_layers):
        b["ffn_hidden_dim"], b["ffn_activation"] = cfg.ffn_hidden_dim, cfg.ffn_activation
    moe = cfg.moe
    if moe is not None and any(moe_layers):
        for name in (
            "hidden_dim",
            "num_experts",
            "top_k",
            "router",
            "router_bias",
            "activation",
            "expert_bias",
        ):
            b[f"moe.{name}"] = getattr(moe, name)
        b["moe.capacity"] = (moe.capacity_factor, getattr(moe, "expert_capacity", None), moe.inner)
        if moe.router in ("topk", "sigmoid_bias"):
            b["moe.norm_topk_prob"] = moe.norm_topk_prob
        if moe.router == "sigmoid_bias":
            b["moe.groups"] = (moe.n_group, moe.topk_group, float(moe.routed_scaling_factor))
        shared = moe.shared_hidden_dim or moe.hidden_dim * moe.num_shared_experts
        b["moe.shared"] = (shared if moe.num_shared_experts else 0, moe.shared_gate)
    return b


def _floats(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in d.items()
    }


def check_round_trip(cfg: ModelConfig, back: ModelConfig, model_type: str) -> None:
    """Raise ValueError naming every difference when `back` (cfg written as `model_type` and read
    again) would not compute the same function as cfg."""
    want, got = behaviour(cfg), behaviour(back)
    diffs = [
        f"{k}: model has {want.get(k)!r}, {model_type} gives {got.get(k)!r}"
        for k in sorted(set(want) | set(got))
        if not _same(want.get(k), got.get(k))
    ]
    if diffs:
        raise ValueError(f"this model cannot be saved as {model_type}: " + "; ".join(diffs))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


# ---------------------------------------------------------------------- tensor plans
def lm_plan(cfg: ModelConfig, layer_plans: list[list[HFTensor]]) -> list[HFTensor]:
    """Embedding, the layers' plans, final norm and (untied) LM head."""
    plan = [whole("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim), "tok_embeddings.weight")]
    for layer in layer_plans:
        plan += layer
    plan.append(whole("model.norm.weight", (cfg.dim,), "norm.weight"))
    if not cfg.tie_embeddings:
        plan.append(whole("lm_head.weight", (cfg.vocab_size, cfg.dim), "output.weight"))
    return plan


def norms_plan(cfg: ModelConfig, i: int) -> list[HFTensor]:
    return [
        whole(f"model.layers.{i}.input_layernorm.weight", (cfg.dim,), f"layers.{i}.attn_norm.weight"),
        whole(f"model.layers.{i}.post_attention_layernorm.weight", (cfg.dim,), f"layers.{i}.ffn_norm.weight"),
    ]


def gqa_plan(cfg: ModelConfig, i: int) -> list[HFTensor]:
    """q/k/v/o projections (with the biases and norms the config asks for) and attention sinks."""
    hf, me = f"model.layers.{i}.self_attn", f"layers.{i}.attn"
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    plan = []
    for hf_name, name, out in (("q_proj", "wq", q_out), ("k_proj", "wk", kv_out), ("v_proj", "wv", kv_out)):
        plan.append(whole(f"{hf}.{hf_name}.weight", (out, cfg.dim), f"{me}.{name}.weight"))
        if cfg.qkv_bias:
            plan.append(whole(f"{hf}.{hf_name}.bias", (out,), f"{me}.{name}.bias"))
    plan.append(whole(f"{hf}.o_proj.weight", (cfg.dim, q_out), f"{me}.wo.weight"))
    if cfg.attn_out_bias:
        plan.append(whole(f"{hf}.o_proj.bias", (cfg.dim,), f"{me}.wo.bias"))
    if cfg.qk_norm:
        full = cfg.qk_norm_scope == "full"
        plan.append(whole(f"{hf}.q_norm.weight", (q_out if full else cfg.head_dim,), f"{me}.q_norm.weight"))
        plan.append(whole(f"{hf}.k_norm.weight", (kv_out if full else cfg.head_dim,), f"{me}.k_norm.weight"))
    if cfg.attention_sinks:
        plan.append(whole(f"{hf}.sinks", (cfg.n_heads,), f"{me}.sinks"))
    return plan


def dense_mlp_plan(cfg: ModelConfig, i: int, hf: str) -> list[HFTensor]:
    """A dense SwiGLU layer: gate_proj -> w1, up_proj -> w3, down_proj -> w2."""
    me, d, f = f"layers.{i}.ffn", cfg.dim, cfg.ffn_hidden_dim
    return [
        whole(f"{hf}.gate_proj.weight", (f, d), f"{me}.w1.weight"),
        whole(f"{hf}.up_proj.weight", (f, d), f"{me}.w3.weight"),
        whole(f"{hf}.down_proj.weight", (d, f), f"{me}.w2.weight"),
    ]


def glu_bank_plan(
    bank: str, hf: str, num_experts: int, dim: int, hidden: int, fused: bool, names: tuple[str, str, str]
) -> list[HFTensor]:
    """A GLU expert bank `bank` (moekit prefix, e.g. layers.3.ffn.experts) from transformers' layout.

    Per-expert: `{hf}.{j}.{gate|up|down}.weight` with names = (gate, up, down); fused:
    `{hf}.gate_up_proj` [E, 2F, D] and `{hf}.down_proj` [E, D, F]."""
    w_in, w_out = f"{bank}.w_in_EDF", f"{bank}.w_out_EFD"
    if fused:
        return [
            HFTensor(f"{hf}.gate_up_proj", (num_experts, 2 * hidden, dim), (Piece(w_in, transpose=True),)),
            HFTensor(f"{hf}.down_proj", (num_experts, dim, hidden), (Piece(w_out, transpose=True),)),
        ]
    gate, up, down = names
    plan = []
    for j in range(num_experts):
        plan += [
            HFTensor(f"{hf}.{j}.{gate}.weight", (hidden, dim), (Piece(w_in, (j, ALL, slice(0, hidden)), transpose=True),)),
            HFTensor(f"{hf}.{j}.{up}.weight", (hidden, dim), (Piece(w_in, (j, ALL, slice(hidden, 2 * hidden)), transpose=True),)),
            HFTensor(f"{hf}.{j}.{down}.weight", (dim, hidden), (Piece(w_out, (j,), transpose=True),)),
        ]  # fmt: skip
    return plan


def shared_expert_plan(bank: str, hf: str, dim: int, hidden: int) -> list[HFTensor]:
    """An always-on SwiGLU MLP (gate_proj, up_proj, down_proj) as moekit's one-expert shared bank."""
    w_in, w_out = f"{bank}.w_in_EDF", f"{bank}.w_out_EFD"
    return [
        HFTensor(f"{hf}.gate_proj.weight", (hidden, dim), (Piece(w_in, (0, ALL, slice(0, hidden)), transpose=True),)),
        HFTensor(f"{hf}.up_proj.weight", (hidden, dim), (Piece(w_in, (0, ALL, slice(hidden, 2 * hidden)), transpose=True),)),
        HFTensor(f"{hf}.down_proj.weight", (dim, hidden), (Piece(w_out, (0,), transpose=True),)),
    ]  # fmt: skip


def is_fused(keys: list[str]) -> bool:
    """Whether a checkpoint holds fused expert tensors (save_original_format=False)."""
    return any(k.endswith("experts.gate_up_proj") for k in keys)


def ignore_rotary_buffers(key: str) -> bool:
    return key.endswith(ROTARY_BUFFER_SUFFIX)
