"""Switch Transformers (encoder-decoder, top-1 routing, expert capacity) in and out of Hugging Face format.

    model = load_switch("google-switch-folder")       # -> MoEEncoderDecoder in eval mode
    out = model(input_ids, decoder_input_ids, attention_mask)   # out.logits equal transformers'
    ids = switch_token_ids(model.config.extra["hf_config"])     # decoder_start_id, eos_id, pad_id
    tokens = model.generate(input_ids, 20, attention_mask, **ids)   # greedy, equal to transformers'
    save_switch(model, "out-folder")                  # AutoModelForSeq2SeqLM.from_pretrained loads it

The source config.json stays in `model.config.extra["hf_config"]`; `save_switch` takes the special
token ids from it unless given.

A folder holds config.json and model.safetensors, or shards listed by model.safetensors.index.json.
Tensors are streamed one at a time from safetensors (`safe_open`) into a model allocated once
(no random init), so loading never holds two full copies of the weights (measured: a 290 MB
checkpoint loads at a peak of model + 44 MB; see `_tensors` for the memory-map residency trap).

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.model import ModelConfig, MoEEncoderDecoder
from moekit.moe import MoEConfig
from moekit.moe import losses as L

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
REOPEN_BYTES = 64 * 2**20  # see _tensors
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}

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


@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor lives in the moekit model: a parameter, or expert `expert` of a
    stacked `[E, ...]` parameter, stored transposed when `transpose` (nn.Linear [out, in] vs [in, out])."""

    param: str
    expert: int | None = None
    transpose: bool = False


def switch_weight_map(cfg: ModelConfig) -> dict[str, Slot]:
    """Checkpoint key -> Slot for every tensor of a Switch model with config cfg (per-expert layout)."""
    keys: dict[str, Slot] = {"shared.weight": Slot("tok_embeddings.weight")}
    if not cfg.tie_embeddings:
        keys["lm_head.weight"] = Slot("output.weight")
    for stack, num_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.n_layers)):
        hf_stack = f"{stack}.block"
        keys[f"{hf_stack}.0.layer.0.SelfAttention.relative_attention_bias.weight"] = Slot(
            f"{stack}_pos_bias.embedding.weight"
        )
        keys[f"{stack}.final_layer_norm.weight"] = Slot(f"{stack}_norm.weight")
        for i in range(num_layers):
            hf_block, block = f"{hf_stack}.{i}.layer", f"{stack}.{i}"
            attentions = [("0.SelfAttention", "attn"), ("1.EncDecAttention", "cross_attn")]
            for hf_attn, attn in attentions[: 2 if stack == "decoder" else 1]:
                for proj in "qkvo":
                    keys[f"{hf_block}.{hf_attn}.{proj}.weight"] = Slot(f"{block}.{attn}.w{proj}.weight")
            keys[f"{hf_block}.0.layer_norm.weight"] = Slot(f"{block}.attn_norm.weight")
            if stack == "decoder":
                keys[f"{hf_block}.1.layer_norm.weight"] = Slot(f"{block}.cross_norm.weight")
            ff = 2 if stack == "decoder" else 1
            keys[f"{hf_block}.{ff}.layer_norm.weight"] = Slot(f"{block}.ffn_norm.weight")
            mlp = f"{hf_block}.{ff}.mlp"
            if not cfg.is_moe_layer(i, encoder=stack == "encoder"):
                keys[f"{mlp}.wi.weight"] = Slot(f"{block}.ffn.w1.weight")
                keys[f"{mlp}.wo.weight"] = Slot(f"{block}.ffn.w2.weight")
                continue
            keys[f"{mlp}.router.classifier.weight"] = Slot(f"{block}.ffn.router.gate.weight")
            if cfg.moe.router_bias:
                keys[f"{mlp}.router.classifier.bias"] = Slot(f"{block}.ffn.router.gate.bias")
            for j in range(cfg.moe.num_experts):
                # transformers wi.weight [F, D], wo.weight [D, F]; moekit w_in_EDF [E, D, F], w_out_EFD [E, F, D]
                keys[f"{mlp}.experts.expert_{j}.wi.weight"] = Slot(f"{block}.ffn.experts.w_in_EDF", j, True)
                keys[f"{mlp}.experts.expert_{j}.wo.weight"] = Slot(f"{block}.ffn.experts.w_out_EFD", j, True)
    return keys


def _target(params: dict[str, torch.Tensor], slot: Slot) -> torch.Tensor:
    """The view of the moekit tensor that a checkpoint tensor fills (same layout as on disk)."""
    t = params[slot.param]
    if slot.expert is not None:
        t = t[slot.expert]
    return t.t() if slot.transpose else t


# ---------------------------------------------------------------------- reading


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Switch Transformers folder needs {CONFIG_NAME}")
    with open(path) as f:
        return json.load(f)


def _key_files(folder: Path) -> tuple[dict[str, str], str]:
    """checkpoint key -> file name, and what lists the keys (the index or the single file)."""
    index = folder / INDEX_NAME
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        return dict(weight_map), INDEX_NAME
    single = folder / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), WEIGHTS_NAME), WEIGHTS_NAME


def _tensors(folder: Path, wanted: dict[str, str]) -> Iterator[tuple[str, str, Any]]:
    """(key, file, safetensors handle) for every wanted key, one file open at a time.

    `safe_open` memory-maps the file and every page read stays resident until the handle closes,
    so a single-file checkpoint would peak at model + file. The handle is reopened after every
    REOPEN_BYTES read, which bounds that to about REOPEN_BYTES plus the largest tensor.
    """
    by_file: dict[str, list[str]] = {}
    for key, name in wanted.items():
        by_file.setdefault(name, []).append(key)
    for name, keys in by_file.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (listed in {INDEX_NAME} for {keys[0]!r})")
        start = 0
        while start < len(keys):
            with safe_open(path, framework="pt") as f:
                present, read = set(f.keys()), 0
                while start < len(keys) and read < REOPEN_BYTES:
                    key = keys[start]
                    if key not in present:
                        raise ValueError(
                            f"tensor {key!r} is missing from {name} (listed there by {INDEX_NAME})"
                        )
                    view = f.get_slice(key)
                    read += math.prod(view.get_shape()) * DTYPE_BYTES.get(view.get_dtype(), 4)
                    yield key, name, f
                    start += 1


@torch.no_grad()
def load_switch(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_seq_len: int = 512,
) -> MoEEncoderDecoder:
    """A transformers `switch_transformers` folder -> MoEEncoderDecoder (eval mode) with its weights.

    Raises FileNotFoundError/ValueError naming the file, the tensor key and the expected shape when
    the folder does not hold a complete Switch checkpoint of its config.
    """
    folder = Path(path)
    hf = _read_config(folder)
    cfg = switch_config_from_hf(hf, max_seq_len=max_seq_len)
    with torch.device("meta"):  # no random init: every tensor is overwritten from the checkpoint
        model = MoEEncoderDecoder(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_embeddings:  # moving off the meta device makes new parameters: tie again
        model.output.weight = model.tok_embeddings.weight
    params = dict(model.named_parameters())
    weight_map = switch_weight_map(cfg)
    key_files, listing = _key_files(folder)
    _check_keys(cfg, weight_map, key_files, listing)

    loaded: set[str] = set()
    for key, name, f in _tensors(folder, {k: key_files[k] for k in weight_map}):
        slot = weight_map[key]
        target = _target(params, slot)
        _check_shape(f, key, name, list(target.shape), slot.param)
        target.copy_(f.get_tensor(key))
        loaded.add(slot.param)
    if not cfg.tie_embeddings:
        # transformers 5.x unties encoder/decoder.embed_tokens from shared.weight too; moekit has one
        # token embedding, so every copy in the checkpoint must equal it.
        aliases = [
            k for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") if k in key_files
        ]
        embedding = model.tok_embeddings.weight
        for key, name, f in _tensors(folder, {k: key_files[k] for k in aliases}):
            _check_shape(f, key, name, list(embedding.shape), "tok_embeddings.weight")
            if not torch.equal(f.get_tensor(key).to(embedding.dtype), embedding):
                raise ValueError(
                    f"tensor {key!r} in {name} differs from shared.weight: moekit's encoder-decoder shares "
                    "one token embedding between encoder and decoder, so it cannot hold this checkpoint"
                )
    unfilled = sorted(set(params) - loaded)
    if unfilled:  # a moekit parameter with no checkpoint key would be left uninitialized
        raise ValueError(f"no checkpoint tensor filled moekit parameters {unfilled[:5]}")
    return model.eval()


def _check_shape(f: Any, key: str, name: str, expected: list[int], param: str) -> None:
    shape = list(f.get_slice(key).get_shape())
    if shape != expected:
        raise ValueError(
            f"tensor {key!r} in {name} has shape {shape}: expected {expected} from config.json (moekit {param})"
        )


def _check_keys(
    cfg: ModelConfig, weight_map: dict[str, Slot], key_files: dict[str, str], listing: str
) -> None:
    """Every expected key present; router keys exactly where config.json's sparse rule puts them."""
    missing = [k for k in weight_map if k not in key_files]
    if missing:
        raise ValueError(
            f"tensor {missing[0]!r} is missing from {listing} ({len(missing)} missing in all); "
            f"config.json expects it (encoder sparse layers {cfg.moe_layer_ids(cfg.encoder_layers, encoder=True)}, "
            f"decoder sparse layers {cfg.moe_layer_ids()})"
        )
    ignorable = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
    unexpected = sorted(k for k in key_files if k not in weight_map and k not in ignorable)
    if unexpected:
        raise ValueError(
            f"{listing} has tensors that config.json does not explain, e.g. {unexpected[:3]} "
            f"({len(unexpected)} in all): is the config from another checkpoint?"
        )


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
) -> None:
    """Write a moekit Switch model as a transformers folder (config.json + safetensors, per-expert keys).

    Past max_shard_bytes (default 5 GB; None = one file), the tensors are split into
    model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json; only one shard's
    tensors are materialized (experts are transposed copies) at a time.
    Token ids left None come from `model.config.extra["hf_config"]` (else transformers' defaults).
    """
    cfg = model.config
    ids = switch_token_ids(cfg.extra.get("hf_config") or {})
    hf = switch_config_to_hf(
        cfg,
        pad_id=ids["pad_id"] if pad_id is None else pad_id,
        eos_id=ids["eos_id"] if eos_id is None else eos_id,
        decoder_start_id=ids["decoder_start_id"] if decoder_start_id is None else decoder_start_id,
    )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    weight_map = switch_weight_map(cfg)
    if not cfg.tie_embeddings:  # transformers 5.x unties these from shared.weight as well
        for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            weight_map[key] = Slot("tok_embeddings.weight")
    hf["dtype"] = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")

    shards = _shard_keys(weight_map, params, max_shard_bytes)
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    index: dict[str, str] = {}
    for name, keys in zip(names, shards):
        tensors, seen = {}, set()
        for k in keys:
            t = _target(params, weight_map[k]).detach().contiguous()
            tensors[k] = t.clone() if t.data_ptr() in seen else t  # safetensors refuses shared memory
            seen.add(t.data_ptr())
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(keys, name))
        del tensors
    if len(shards) > 1:
        total = sum(
            _target(params, s).numel() * _target(params, s).element_size() for s in weight_map.values()
        )
        with open(folder / INDEX_NAME, "w") as f:
            json.dump(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, f, indent=2
            )
    elif (folder / INDEX_NAME).exists():  # a stale index would shadow the single file
        (folder / INDEX_NAME).unlink()
    with open(folder / CONFIG_NAME, "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)


def _shard_keys(
    weight_map: dict[str, Slot], params: dict[str, torch.Tensor], max_shard_bytes: int | None
) -> list[list[str]]:
    if max_shard_bytes is None:
        return [list(weight_map)]
    shards: list[list[str]] = [[]]
    size = 0
    for key, slot in weight_map.items():
        t = _target(params, slot)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


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
