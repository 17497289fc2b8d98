"""Hugging Face checkpoints in and out: decoder MoE families as moekit models.

    model = moekit.from_pretrained("path/to/folder")       # Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS
    model(input_ids, attention_mask=mask).logits             # equal to transformers' AutoModelForCausalLM
    model.generate(prompt, 20, temperature=0)                 # KV-cached decoding
    model.save_pretrained("out")                              # transformers loads it back

A folder is `config.json` plus `model.safetensors` or shards with `model.safetensors.index.json`;
both on-disk expert layouts load (per-expert keys, and fused keys from
`save_pretrained(save_original_format=False)`). Loading streams one tensor at a time into a model
allocated once (io.py); every key, shape and shard is checked before any weight is copied, and
nothing half-loaded is ever returned. transformers itself is never imported.

Each family module (mixtral.py, qwen2_moe.py, ...) maps config.json to a `ModelConfig` and back and
gives a tensor plan (plan.py); the pure functions `convert_from_hf` / `convert_to_hf` apply the
same plans to in-memory state dicts. Every family is expressed with moekit's own components:
routers "topk" / "topk_then_softmax" / "sigmoid_bias", activation "gpt_oss", shared experts with
`shared_gate`, and the attention options of ModelConfig (sinks, windows, qk norms, MLA).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from moekit.hf import deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from moekit.hf.common import check_round_trip, is_fused
from moekit.hf.io import (
    CONFIG_NAME,
    CheckpointFormatError,
    DictReader,
    SafetensorsReader,
    parse_size,
    read_config,
    write_folder,
    write_sharded,
)
from moekit.hf.plan import HFTensor, assemble, check_plan, check_source, load_plan, nbytes
from moekit.model import ModelConfig, MoEEncoderDecoder, MoETransformer, Rotary

FAMILIES: dict[str, ModuleType] = {
    m.MODEL_TYPE: m for m in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss)
}
SWITCH = "switch_transformers"  # encoder-decoder: moekit.hf.switch, dispatched from here
SUPPORTED_MODEL_TYPES = (*FAMILIES, SWITCH)
AUX_LOSS_MODES = {"moekit": "per_layer", "transformers": "transformers"}
FLOAT32_SUFFIXES = ("e_score_correction_bias",)  # transformers keeps DeepSeek's router bias in float32

__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointFormatError",
    "config_from_hf",
    "config_to_hf",
    "convert_from_hf",
    "convert_to_hf",
    "from_pretrained",
    "save_pretrained",
]


def family(model_type: str | None) -> ModuleType:
    """The decoder family module of a config.json `model_type`."""
    if model_type == SWITCH:
        raise CheckpointFormatError(
            f"{SWITCH} is an encoder-decoder: load it with moekit.from_pretrained or moekit.hf.switch.load_switch"
        )
    if model_type not in FAMILIES:
        raise CheckpointFormatError(
            f"model_type {model_type!r} is not supported; supported decoder families: {list(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def config_from_hf(hf_config: dict[str, Any], aux_loss: str = "moekit") -> ModelConfig:
    """The moekit ModelConfig of a transformers config.json dict.

    aux_loss="moekit": moekit's per-layer balance loss with transformers' coefficient;
    "transformers": the pooled `load_balancing_loss_func`, added only when the config says
    `output_router_logits` (as transformers adds it only then), for exact fine-tuning parity."""
    if aux_loss not in AUX_LOSS_MODES:
        raise ValueError(f"aux_loss={aux_loss!r} is invalid: expected one of {list(AUX_LOSS_MODES)}")
    cfg = family(hf_config.get("model_type")).config_from_hf(hf_config)
    if aux_loss == "transformers" and cfg.moe is not None:
        coef = cfg.moe.load_balance_coef if hf_config.get("output_router_logits") else 0.0
        cfg = dataclasses.replace(
            cfg, aux_loss_mode="transformers", moe=dataclasses.replace(cfg.moe, load_balance_coef=coef)
        )
    return cfg


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The transformers config.json dict of a moekit config; raises ValueError when the family cannot
    express the model (every difference is named)."""
    model_type = model_type or (cfg.extra.get("hf_config") or {}).get("model_type")
    if model_type is None:
        raise ValueError(
            f"this model was not imported from Hugging Face: pass model_type= one of {list(SUPPORTED_MODEL_TYPES)}"
        )
    fam = family(model_type)
    hf = fam.config_to_hf(cfg)
    check_round_trip(cfg, fam.config_from_hf(hf), model_type)
    return hf


# ---------------------------------------------------------------------- loading
def plan_for(cfg: ModelConfig, fam: ModuleType, keys: list[str]) -> list[HFTensor]:
    """The family's tensor plan for the expert layout the checkpoint keys show."""
    return fam.tensor_plan(cfg, is_fused(keys))


def moekit_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the MoETransformer state dict (the tied LM head left out), from a meta-device model."""
    with torch.device("meta"):
        state = MoETransformer(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if not (cfg.tie_embeddings and k == "output.weight")}


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> MoETransformer:
    """A MoETransformer with uninitialized weights in `dtype`, allocated once (no random init)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    persistent = set(model.state_dict())
    stray = [n for n, _ in model.named_buffers() if n not in persistent and not n.startswith("rope.")]
    if stray:
        raise AssertionError(f"non-persistent buffers {stray} would be left uninitialized")
    model = model.to(dtype).to_empty(device=device)
    model.rope = Rotary(cfg.rope_head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling).to(device)
    for moe in model.moe_layers:  # the aux-loss-free bias stays float32, as transformers keeps it
        if isinstance(getattr(moe.router, "expert_bias", None), torch.Tensor):
            moe.router.expert_bias = moe.router.expert_bias.float()
    if cfg.tie_embeddings:  # to_empty gives every module its own new parameter
        model.output.weight = model.tok_embeddings.weight
    return model


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    aux_loss: str = "moekit",
) -> MoETransformer | MoEEncoderDecoder:
    """Load a transformers decoder MoE folder as a MoETransformer in eval mode
    (a `switch_transformers` folder as a MoEEncoderDecoder, through moekit.hf.switch).

    dtype None keeps the checkpoint's dtype. aux_loss: see `config_from_hf`. The source config
    stays in `model.config.extra["hf_config"]`, so `model.save_pretrained` writes the same family.
    """
    folder = Path(path)
    hf = read_config(folder)
    if hf.get("model_type") == SWITCH:
        if aux_loss not in AUX_LOSS_MODES:
            raise ValueError(f"aux_loss={aux_loss!r} is invalid: expected one of {list(AUX_LOSS_MODES)}")
        if aux_loss != "moekit":
            raise ValueError(
                f"aux_loss={aux_loss!r} applies to the decoder families; {SWITCH} already computes "
                "transformers' per-sequence balance loss and z-loss (see moekit.hf.switch)"
            )
        from moekit.hf.switch import load_switch

        return load_switch(folder, dtype=dtype, device=device)
    cfg = config_from_hf(hf, aux_loss)
    fam = family(hf.get("model_type"))
    reader = SafetensorsReader(folder)
    plan = plan_for(cfg, fam, reader.keys())
    check_source(
        plan, reader, lambda k: fam.ignored(k, cfg), f"{fam.MODEL_TYPE} checkpoint {str(reader.listing)!r}"
    )
    check_plan(plan, moekit_shapes(cfg))
    model = empty_model(cfg, dtype or reader.dtype(plan[0].key), device)
    load_plan(plan, reader, dict(model.state_dict()))
    return model.eval()


def convert_from_hf(
    hf_state: dict[str, torch.Tensor], hf_config: dict[str, Any], aux_loss: str = "moekit"
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Pure conversion: a transformers state dict and config.json dict -> moekit state dict and config."""
    cfg = config_from_hf(hf_config, aux_loss)
    fam = family(hf_config.get("model_type"))
    source = DictReader(hf_state)
    plan = plan_for(cfg, fam, source.keys())
    check_source(plan, source, lambda k: fam.ignored(k, cfg), f"{fam.MODEL_TYPE} state dict")
    shapes = moekit_shapes(cfg)
    check_plan(plan, shapes)
    dtype = hf_state[plan[0].key].dtype
    state = {k: torch.empty(s, dtype=dtype) for k, s in shapes.items()}
    load_plan(plan, source, state)
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state, cfg


# ---------------------------------------------------------------------- saving
def convert_to_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig, model_type: str | None = None, fused: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pure conversion: a moekit state dict and config -> transformers state dict and config.json dict.

    fused=False writes per-expert keys (hub layout), True the fused ones (GPT-OSS has only fused)."""
    hf = config_to_hf(cfg, model_type)
    plan = family(hf["model_type"]).tensor_plan(cfg, fused)
    check_plan(plan, moekit_shapes(cfg))
    return {t.key: assemble(t, state) for t in plan}, hf


def save_pretrained(
    model: MoETransformer | MoEEncoderDecoder,
    path: str | Path,
    model_type: str | None = None,
    fused: bool = False,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` as a transformers folder: config.json and (sharded) safetensors.

    model_type: the family (default: the one the model was imported from). fused: expert layout
    on disk (default per-expert, as hub checkpoints). dtype: of the written tensors (default the
    model's). One shard's tensors are built at a time. The folder is replaced atomically
    (`io.write_folder`): a failed save leaves it as it was, and no weight file of an earlier save
    survives; other files in it (a tokenizer, ...) are kept."""
    if not isinstance(model, MoETransformer):  # the encoder-decoder: Switch Transformers (one layout)
        if model_type not in (None, SWITCH):
            raise ValueError(
                f"an encoder-decoder model saves only as {SWITCH!r}, not model_type={model_type!r}"
            )
        from moekit.hf.switch import save_switch

        return save_switch(model, path, max_shard_bytes=parse_size(max_shard_size), dtype=dtype)
    cfg = model.config
    hf = config_to_hf(cfg, model_type)
    fam = family(hf["model_type"])
    plan = fam.tensor_plan(cfg, fused)
    params = dict(model.state_dict())
    check_plan(
        plan,
        {k: tuple(v.shape) for k, v in params.items() if not (cfg.tie_embeddings and k == "output.weight")},
    )
    dtype = dtype or model.tok_embeddings.weight.dtype
    hf["dtype"] = str(dtype).removeprefix("torch.")
    folder = Path(path)
    items = []
    for t in plan:
        t_dtype = torch.float32 if t.key.endswith(FLOAT32_SUFFIXES) else dtype
        items.append((t.key, nbytes(t, t_dtype), lambda t=t, d=t_dtype: assemble(t, params, d)))

    def write(tmp: Path) -> None:
        write_sharded(tmp, items, parse_size(max_shard_size))
        (tmp / CONFIG_NAME).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return write_folder(folder, write)
