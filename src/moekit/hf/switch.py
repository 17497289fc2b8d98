"""Switch Transformers (encoder-decoder, top-1 routing, expert capacity) in and out of Hugging Face format.

    model = moekit.from_pretrained("google-switch-folder")   # -> MoEEncoderDecoder in eval mode (load_switch)
    out = model(input_ids, decoder_input_ids, attention_mask)   # out.logits equal transformers'
    ids = switch_token_ids(model.config.extra["hf_config"])     # decoder_start_id, eos_id, pad_id
    tokens = model.generate(input_ids, 20, attention_mask, **ids)   # greedy, equal to transformers'
    model.save_pretrained("out-folder")   # (save_switch) AutoModelForSeq2SeqLM.from_pretrained loads it

The source config.json stays in `model.config.extra["hf_config"]`; `save_switch` takes the special
token ids from it unless given.

A folder holds config.json and model.safetensors, or shards listed by model.safetensors.index.json.
Reading and writing go through the decoder families' machinery: a tensor plan (plan.py) checked
against the folder before any weight is read, `io.SafetensorsReader` streaming one tensor at a
time into a model allocated once (no random init, never two copies of the weights), and
`io.write_folder` saving atomically.

How transformers 5.23 (`modeling_switch_transformers.py`) maps onto moekit options:
  * T5 relative position bias, owned by block 0 of each stack and shared by its layers:
    `position_encoding="relative_bias"`; no rotary; scores not scaled (`attn_scale=1.0`).
  * T5 layer norm (RMS, no mean, no bias, float32 variance): moekit's RMSNorm with
    `norm_eps=layer_norm_epsilon`.
  * Dense and expert FFNs are `wo(act(wi x))` with `dense_act_fn` (relu in Switch, not GLU):
    `ffn_activation` and `MoEConfig.activation`; experts and dense layers share `d_ff`.
  * Sparse layers: `i % step == 1 or step == 1` with step = layers // num_sparse_layers (a step
    of 0 means none; num_sparse = 0 gives step = layers, which still makes layer 1 sparse): as the
    explicit lists `encoder_sparse_layers` / `sparse_layers`, checked against the router tensors.
  * Router: float32 linear (optional bias), softmax, argmax; the weight is p_max, not renormalized;
    multiplicative jitter in training only (moekit's copy never mutates the input; transformers'
    does). `router_dtype="bfloat16"` maps onto moekit's bf16-rounding router (equal logits in the
    tests); "float16" is refused.
  * Capacity: `expert_capacity` slots per expert in EVERY SEQUENCE (the router runs on [B, S, E]
    and takes a cumulative sum along S), first tokens of the sequence win (position priority),
    in training and in evaluation alike: `MoEConfig(expert_capacity=C, capacity_group="sequence")`.
    A dropped token gets exactly zero from the MoE layer and keeps its residual (5.23 behaviour;
    transformers 4.x passed it through scaled by p_max instead).
    transformers also routes padding, which then takes capacity; moekit leaves padding out. The
    logits agree exactly with right padding (T5's convention: padding follows every real token of
    its sequence, so it never takes a slot a real token wanted) and whenever nothing is dropped.
  * Tied embeddings: the decoder output is scaled by d_model**-0.5 before the LM head
    (`output_scale`). Untied: transformers 5.23 gives the encoder and decoder their own
    `embed_tokens`; moekit shares one matrix, so they must be equal (else loading refuses).
  * Losses: transformers computes the balance loss per sequence ("group") and pools all sparse
    layers of a stack by concatenating them along the sequence; moekit computes it per layer with
    `seq_balance_coef` (the same per-sequence Switch loss) and sums layers. The two agree for one
    sparse layer per stack; `hf_switch_router_losses` reproduces the pooled form exactly.
    transformers' losses are silently 0 when every layer of a stack is sparse (it checks
    `sparse_step > 1`), and they count padding tokens; moekit does neither.
  * Dropout (training only) sits where moekit puts it: attention probabilities and residual
    branches; transformers also drops the embeddings, the FFN hidden and the final hidden state.
  * Only the per-expert layout exists on disk: transformers keeps Switch experts as separate
    modules, so `save_pretrained(save_original_format=False)` writes the same keys.

Shape legend: E experts, D model dim, F expert hidden dim, B batch, L sparse layers, S sequence, V vocab.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moekit.hf.io import (
    CONFIG_NAME,
    CheckpointFormatError,
    SafetensorsReader,
    read_config,
    write_folder,
    write_sharded,
)
from moekit.hf.plan import HFTensor, Piece, assemble, check_plan, check_source, load_plan, nbytes, whole
from moekit.model import ModelConfig, MoEEncoderDecoder
from moekit.moe import MoEConfig
from moekit.moe import losses as L

# SwitchTransformersConfig defaults (transformers 5.23): save_pretrained may leave defaults out.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 2048,
    "expert_capacity": 64,
    "num_layers": 12,
    "num_sparse_encoder_layers": 3,
    "num_decoder_layers": 12,  # 12 unless given, NOT num_layers (only an explicit null means num_layers)
    "num_sparse_decoder_layers": 3,
    "num_heads": 12,
    "num_experts": 8,
    "router_bias": False,
    "router_jitter_noise": 0.01,
    "router_dtype": "float32",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "router_z_loss_coef": 0.001,
    "router_aux_loss_coef": 0.001,
    "dense_act_fn": "relu",
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
# transformers' ACT2FN names that moekit computes identically
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu"}


# ---------------------------------------------------------------------- config


def switch_sparse_layers(num_layers: int, num_sparse: int) -> list[int]:
    """The sparse layers transformers builds: `i % step == 1 or step == 1`, step = layers // sparse."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    if step <= 0:  # more sparse layers asked for than layers: transformers builds none
        return []
    return [i for i in range(num_layers) if i % step == 1 or step == 1]


def _hf_get(hf: dict[str, Any], name: str) -> Any:
    return hf.get(name, HF_DEFAULTS[name])


def _router_dtype(name: str) -> str:
    if name not in ("float32", "bfloat16"):
        raise ValueError(
            f"config.json router_dtype={name!r} is not supported: expected 'float32' or 'bfloat16'"
        )
    return name


def switch_config_from_hf(hf: dict[str, Any], max_seq_len: int = 512) -> ModelConfig:
    """The moekit ModelConfig of a transformers `switch_transformers` config.json dict.

    max_seq_len only sizes default KV caches (the relative position bias has no length limit).
    """
    model_type = hf.get("model_type", "switch_transformers")
    if model_type != "switch_transformers":
        raise ValueError(f"config.json has model_type={model_type!r}: expected 'switch_transformers'")
    act = _hf_get(hf, "dense_act_fn")
    if act not in ACTIVATIONS:
        raise ValueError(
            f"config.json dense_act_fn={act!r} is not supported: expected one of {sorted(ACTIVATIONS)}"
        )
    num_layers = _hf_get(hf, "num_layers")
    num_decoder_layers = _hf_get(hf, "num_decoder_layers")
    num_decoder_layers = num_layers if num_decoder_layers is None else num_decoder_layers
    d_model, d_ff = _hf_get(hf, "d_model"), _hf_get(hf, "d_ff")
    encoder_sparse = switch_sparse_layers(num_layers, _hf_get(hf, "num_sparse_encoder_layers"))
    decoder_sparse = switch_sparse_layers(num_decoder_layers, _hf_get(hf, "num_sparse_decoder_layers"))
    moe = None
    if encoder_sparse or decoder_sparse:
        moe = MoEConfig(
            dim=d_model,
            hidden_dim=d_ff,
            num_experts=_hf_get(hf, "num_experts"),
            top_k=1,
            router="switch",
            router_bias=_hf_get(hf, "router_bias"),
            router_dtype=_router_dtype(_hf_get(hf, "router_dtype")),
            jitter_eps=float(_hf_get(hf, "router_jitter_noise")),
            expert_capacity=_hf_get(hf, "expert_capacity"),
            capacity_group="sequence",
            activation=ACTIVATIONS[act],
            load_balance_coef=0.0,  # transformers' balance loss is per sequence: seq_balance
            seq_balance_coef=_hf_get(hf, "router_aux_loss_coef"),
            z_loss_coef=_hf_get(hf, "router_z_loss_coef"),
        )
    tied = bool(_hf_get(hf, "tie_word_embeddings"))
    return ModelConfig(
        vocab_size=_hf_get(hf, "vocab_size"),
        dim=d_model,
        n_layers=num_decoder_layers,
        n_encoder_layers=num_layers,
        n_heads=_hf_get(hf, "num_heads"),
        head_dim=_hf_get(hf, "d_kv"),
        ffn_hidden_dim=d_ff,
        max_seq_len=max_seq_len,
        norm_eps=float(_hf_get(hf, "layer_norm_epsilon")),
        dropout=float(_hf_get(hf, "dropout_rate")),
        tie_embeddings=tied,
        moe=moe,
        sparse_layers=decoder_sparse,
        encoder_sparse_layers=encoder_sparse,
        position_encoding="relative_bias",
        rel_pos_buckets=_hf_get(hf, "relative_attention_num_buckets"),
        rel_pos_max_distance=_hf_get(hf, "relative_attention_max_distance"),
        attn_scale=1.0,
        ffn_activation=ACTIVATIONS[act],
        output_scale=d_model**-0.5 if tied else 1.0,
        extra={"hf_config": dict(hf)},
    )


def _sparse_count(sparse: list[int], num_layers: int, field: str) -> int:
    """num_sparse_*_layers whose transformers rule gives exactly `sparse`; raises when none does."""
    for n in range(1, num_layers + 1):
        if switch_sparse_layers(num_layers, n) == sparse:
            return n
    if not sparse:
        return num_layers + 1  # step 0: transformers builds no sparse layer
    raise ValueError(
        f"ModelConfig.{field}={sparse} cannot be written as a Switch config: transformers places sparse "
        f"layers at i % step == 1 (or every layer), e.g. {switch_sparse_layers(num_layers, 1)} or "
        f"{switch_sparse_layers(num_layers, max(1, num_layers // 2))}"
    )


def switch_token_ids(hf: dict[str, Any]) -> dict[str, int | None]:
    """`decoder_start_id`, `eos_id`, `pad_id` of a config.json dict, as `MoEEncoderDecoder.generate`
    takes them (a list of eos ids keeps its first)."""
    eos = _hf_get(hf, "eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    start = _hf_get(hf, "decoder_start_token_id")
    pad = _hf_get(hf, "pad_token_id")
    return {"decoder_start_id": pad if start is None else start, "eos_id": eos, "pad_id": pad}


def switch_config_to_hf(
    cfg: ModelConfig, *, pad_id: int = 0, eos_id: int = 1, decoder_start_id: int = 0
) -> dict[str, Any]:
    """The transformers config.json dict of a moekit Switch model; raises when cfg has no Switch form."""
    moe = cfg.moe

    def need(ok: bool, field: str, value: Any, expected: str) -> None:
        if not ok:
            raise ValueError(f"{field}={value!r} cannot be saved as Switch Transformers: expected {expected}")

    need(
        cfg.position_encoding == "relative_bias",
        "ModelConfig.position_encoding",
        cfg.position_encoding,
        "'relative_bias'",
    )
    need(cfg.attn_scale == 1.0, "ModelConfig.attn_scale", cfg.attn_scale, "1.0")
    need(
        cfg.ffn_activation in ("relu", "gelu", "silu"),
        "ModelConfig.ffn_activation",
        cfg.ffn_activation,
        "relu, gelu or silu",
    )
    need(cfg.n_kv_heads == cfg.n_heads, "ModelConfig.n_kv_heads", cfg.n_kv_heads, f"n_heads={cfg.n_heads}")
    need(
        not cfg.qkv_bias and not cfg.qk_norm,
        "ModelConfig.qkv_bias/qk_norm",
        (cfg.qkv_bias, cfg.qk_norm),
        "False",
    )
    expected_scale = cfg.dim**-0.5 if cfg.tie_embeddings else 1.0
    need(
        math.isclose(cfg.output_scale, expected_scale, rel_tol=1e-6),
        "ModelConfig.output_scale",
        cfg.output_scale,
        f"{expected_scale} (dim**-0.5 when tied, else 1.0)",
    )
    decoder_sparse = cfg.moe_layer_ids()
    encoder_sparse = cfg.moe_layer_ids(cfg.encoder_layers, encoder=True)
    hf: dict[str, Any] = {
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "model_type": "switch_transformers",
        "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.dim,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.ffn_hidden_dim,
        "num_layers": cfg.encoder_layers,
        "num_decoder_layers": cfg.n_layers,
        "num_sparse_encoder_layers": _sparse_count(
            encoder_sparse, cfg.encoder_layers, "encoder_sparse_layers"
        ),
        "num_sparse_decoder_layers": _sparse_count(decoder_sparse, cfg.n_layers, "sparse_layers"),
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.rel_pos_buckets,
        "relative_attention_max_distance": cfg.rel_pos_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "dense_act_fn": cfg.ffn_activation,
        "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "decoder_start_token_id": decoder_start_id,
        "dtype": "float32",
    }
    if moe is None:
        return hf
    need(moe.router == "switch" and moe.top_k == 1, "MoEConfig.router", moe.router, "'switch' (top-1)")
    need(
        moe.expert_capacity is not None,
        "MoEConfig.expert_capacity",
        moe.expert_capacity,
        "an integer (slots per sequence)",
    )
    need(moe.capacity_group == "sequence", "MoEConfig.capacity_group", moe.capacity_group, "'sequence'")
    need(
        moe.activation == cfg.ffn_activation,
        "MoEConfig.activation",
        moe.activation,
        f"ffn_activation={cfg.ffn_activation!r}",
    )
    need(
        moe.hidden_dim == cfg.ffn_hidden_dim,
        "MoEConfig.hidden_dim",
        moe.hidden_dim,
        f"ffn_hidden_dim={cfg.ffn_hidden_dim}",
    )
    need(moe.drop_policy == "position", "MoEConfig.drop_policy", moe.drop_policy, "'position'")
    need(
        moe.num_shared_experts == 0 and moe.inner is None and not moe.expert_bias,
        "MoEConfig.num_shared_experts/inner/expert_bias",
        (moe.num_shared_experts, moe.inner, moe.expert_bias),
        "(0, None, False)",
    )
    hf.update(
        num_experts=moe.num_experts,
        expert_capacity=moe.expert_capacity,
        router_bias=moe.router_bias,
        router_jitter_noise=moe.jitter_eps,
        router_dtype=moe.router_dtype,
        router_z_loss_coef=moe.z_loss_coef,
        router_aux_loss_coef=moe.seq_balance_coef,
    )
    return hf


# ---------------------------------------------------------------------- weight names
# transformers 5.x unties these from shared.weight when tie_word_embeddings is false; moekit has one
EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def switch_moekit_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the MoEEncoderDecoder state dict (the tied LM head left out), from a meta-device model."""
    with torch.device("meta"):
        state = MoEEncoderDecoder(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not (cfg.tie_embeddings and k == "output.weight")}


def switch_tensor_plan(cfg: ModelConfig) -> list[HFTensor]:
    """Every checkpoint tensor of a Switch model with config cfg (per-expert layout) and where it
    lives in moekit (plan.py): expert j's wi.weight [F, D] is w_in_EDF[j] [D, F] transposed,
    wo.weight [D, F] is w_out_EFD[j] [F, D] transposed; everything else is a moekit tensor as it is."""
    shapes = switch_moekit_shapes(cfg)
    plan = []

    def add(key: str, param: str, expert: int | None = None) -> None:
        if expert is None:
            plan.append(whole(key, shapes[param], param))
        else:
            d, f = shapes[param][1:]
            plan.append(HFTensor(key, (f, d), (Piece(param, (expert,), transpose=True),)))

    add("shared.weight", "tok_embeddings.weight")
    if not cfg.tie_embeddings:
        add("lm_head.weight", "output.weight")
    for stack, num_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.n_layers)):
        hf_stack = f"{stack}.block"
        add(
            f"{hf_stack}.0.layer.0.SelfAttention.relative_attention_bias.weight",
            f"{stack}_pos_bias.embedding.weight",
        )
        add(f"{stack}.final_layer_norm.weight", f"{stack}_norm.weight")
        for i in range(num_layers):
            hf_block, block = f"{hf_stack}.{i}.layer", f"{stack}.{i}"
            attentions = [("0.SelfAttention", "attn"), ("1.EncDecAttention", "cross_attn")]
            for hf_attn, attn in attentions[: 2 if stack == "decoder" else 1]:
                for proj in "qkvo":
                    add(f"{hf_block}.{hf_attn}.{proj}.weight", f"{block}.{attn}.w{proj}.weight")
            add(f"{hf_block}.0.layer_norm.weight", f"{block}.attn_norm.weight")
            if stack == "decoder":
                add(f"{hf_block}.1.layer_norm.weight", f"{block}.cross_norm.weight")
            ff = 2 if stack == "decoder" else 1
            add(f"{hf_block}.{ff}.layer_norm.weight", f"{block}.ffn_norm.weight")
            mlp = f"{hf_block}.{ff}.mlp"
            if not cfg.is_moe_layer(i, encoder=stack == "encoder"):
                add(f"{mlp}.wi.weight", f"{block}.ffn.w1.weight")
                add(f"{mlp}.wo.weight", f"{block}.ffn.w2.weight")
                continue
            add(f"{mlp}.router.classifier.weight", f"{block}.ffn.router.gate.weight")
            if cfg.moe.router_bias:
                add(f"{mlp}.router.classifier.bias", f"{block}.ffn.router.gate.bias")
            for j in range(cfg.moe.num_experts):
                add(f"{mlp}.experts.expert_{j}.wi.weight", f"{block}.ffn.experts.w_in_EDF", j)
                add(f"{mlp}.experts.expert_{j}.wo.weight", f"{block}.ffn.experts.w_out_EFD", j)
    return plan  # fmt: skip


# ---------------------------------------------------------------------- reading


@torch.no_grad()
def load_switch(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_seq_len: int = 512,
) -> MoEEncoderDecoder:
    """A transformers `switch_transformers` folder -> MoEEncoderDecoder (eval mode) with its weights.

    dtype None keeps the checkpoint's. Tensors stream one at a time from the safetensors files
    (io.SafetensorsReader) into a model allocated once, without random init. Raises
    CheckpointFormatError naming the file, the tensor key and both shapes when the folder does not
    hold a complete Switch checkpoint of its config; every key and shape is checked before any
    weight is read.
    """
    folder = Path(path)
    cfg = switch_config_from_hf(read_config(folder), max_seq_len=max_seq_len)
    reader = SafetensorsReader(folder)
    plan = switch_tensor_plan(cfg)
    sparse = (
        f" (config.json's encoder sparse layers {cfg.moe_layer_ids(cfg.encoder_layers, encoder=True)}, "
        f"decoder sparse layers {cfg.moe_layer_ids()})"
    )
    ignored = EMBEDDING_ALIASES + (("lm_head.weight",) if cfg.tie_embeddings else ())
    context = f"switch_transformers checkpoint {str(reader.listing)!r}"
    check_source(plan, reader, lambda k: k in ignored, context, sparse)
    shapes = switch_moekit_shapes(cfg)
    check_plan(plan, shapes)
    aliases = [k for k in EMBEDDING_ALIASES if k in reader and not cfg.tie_embeddings]
    for key in aliases:
        if reader.shape(key) != shapes["tok_embeddings.weight"]:
            raise CheckpointFormatError(
                f"{context}: tensor {reader.describe(key)} has shape {reader.shape(key)} but config.json "
                f"implies {shapes['tok_embeddings.weight']}"
            )
    with torch.device("meta"):
        model = MoEEncoderDecoder(cfg)
    model = model.to(dtype or reader.dtype("shared.weight")).to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives every module its own new parameter: tie again
        model.output.weight = model.tok_embeddings.weight
    load_plan(plan, reader, dict(model.state_dict()))
    embedding = model.tok_embeddings.weight
    for key in aliases:  # moekit shares one token embedding: every copy must equal shared.weight
        if not torch.equal(reader.read(key).to(device=embedding.device, dtype=embedding.dtype), embedding):
            raise CheckpointFormatError(
                f"{context}: tensor {reader.describe(key)} differs from shared.weight: moekit's "
                "encoder-decoder shares one token embedding between encoder and decoder, so it cannot "
                "hold this checkpoint"
            )
    return model.eval()


# ---------------------------------------------------------------------- writing


@torch.no_grad()
def save_switch(
    model: MoEEncoderDecoder,
    path: str | os.PathLike[str],
    *,
    pad_id: int | None = None,
    eos_id: int | None = None,
    decoder_start_id: int | None = None,
    max_shard_bytes: int | None = 5 * 10**9,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a moekit Switch model as a transformers folder (config.json + safetensors, per-expert keys).

    Past max_shard_bytes (default 5 GB; None = one file), the tensors are split into
    model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json; only one shard's
    tensors are built at a time. dtype: of the written tensors (default the model's). The folder
    is replaced atomically (io.write_folder). Token ids left None come from
    `model.config.extra["hf_config"]` (else transformers' defaults).
    """
    cfg = model.config
    ids = switch_token_ids(cfg.extra.get("hf_config") or {})
    hf = switch_config_to_hf(
        cfg,
        pad_id=ids["pad_id"] if pad_id is None else pad_id,
        eos_id=ids["eos_id"] if eos_id is None else eos_id,
        decoder_start_id=ids["decoder_start_id"] if decoder_start_id is None else decoder_start_id,
    )
    params = dict(model.state_dict())
    plan = switch_tensor_plan(cfg)
    check_plan(
        plan,
        {k: tuple(v.shape) for k, v in params.items() if not (cfg.tie_embeddings and k == "output.weight")},
    )
    if not cfg.tie_embeddings:  # transformers 5.x unties these from shared.weight as well
        plan += [whole(key, plan[0].shape, "tok_embeddings.weight") for key in EMBEDDING_ALIASES]
    dtype = dtype or model.tok_embeddings.weight.dtype
    hf["dtype"] = str(dtype).removeprefix("torch.")
    items = [(t.key, nbytes(t, dtype), lambda t=t: assemble(t, params, dtype)) for t in plan]

    def write(tmp: Path) -> None:
        write_sharded(
            tmp, items, max_shard_bytes if max_shard_bytes is not None else sum(i[1] for i in items)
        )
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return write_folder(path, write)


# ---------------------------------------------------------------------- losses


def hf_switch_router_losses(router_logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_loss, balance loss) of one stack exactly as transformers' Switch computes them, unweighted.

    router_logits: one [B, S, E] tensor per sparse layer. transformers concatenates the layers along
    the sequence, then takes the z-loss over every token and the Switch balance loss per sequence
    (averaged over the batch), with f from the argmax before capacity. moekit's `router_z_loss`
    and `sequence_balance_loss` compute the same quantities on that pooled [B, L*S, E] tensor.
    """
    logits_BLE = torch.cat(list(router_logits), dim=1).float()  # [B, L*S, E]
    B, LS, E = logits_BLE.shape
    logits_TE = logits_BLE.reshape(B * LS, E)
    z = L.router_z_loss(logits_TE)
    token_A = torch.arange(B * LS, device=logits_TE.device)
    aux = L.sequence_balance_loss(logits_TE.softmax(dim=-1), logits_TE.argmax(dim=-1), token_A, B)
    return z, aux
