"""Whole models built from MoE layers: the decoder-only LM, the encoder-decoder, their config,
their dense pieces, and parameter/FLOP counting."""

from moekit.model.config import ModelConfig
from moekit.model.decoder import ModelOutput, MoETransformer, sample_next_token
from moekit.model.encdec import EncDecOutput, MoEEncoderDecoder
from moekit.model.flops import FlopCount, ParamCount, count_params, dense_baseline, flops_per_token
from moekit.model.layers import (
    Attention,
    AttentionMask,
    Block,
    FeedForward,
    KVCache,
    RelativePositionBias,
    RMSNorm,
    Rotary,
    apply_rope,
    build_attention_mask,
    relative_position_bucket,
    rope_tables,
    with_position_bias,
)

__all__ = [
    "Attention",
    "AttentionMask",
    "Block",
    "EncDecOutput",
    "FeedForward",
    "FlopCount",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "MoEEncoderDecoder",
    "MoETransformer",
    "ParamCount",
    "RMSNorm",
    "RelativePositionBias",
    "Rotary",
    "apply_rope",
    "build_attention_mask",
    "count_params",
    "dense_baseline",
    "flops_per_token",
    "relative_position_bucket",
    "rope_tables",
    "sample_next_token",
    "with_position_bias",
]
