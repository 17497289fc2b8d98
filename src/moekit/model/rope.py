"""Rotary frequencies, plain or scaled for long context (linear interpolation, YaRN).

`rope_frequencies(head_dim, theta, scaling, max_seq_len)` returns the inverse frequency of every
rotated pair and the factor that multiplies cos and sin (YaRN's "attention factor"). `scaling` is
the Hugging Face `rope_parameters` dict without `rope_theta` (None = plain rotary):

    {"rope_type": "linear", "factor": 4.0}
    {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}          # GPT-OSS
    {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, ...}  # DeepSeek-V3

The YaRN arithmetic follows transformers 5.23 `_compute_yarn_parameters` step by step (in float64;
transformers uses float32, a difference far below 1e-6 at the positions of any test).
"""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "yarn")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def check_rope_scaling(scaling: Any) -> None:
    """Raise ValueError unless `scaling` is None or a dict this module can compute."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={scaling!r} is invalid: expected None or a dict")
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling rope_type={kind!r} is not supported: expected one of {list(ROPE_TYPES)}"
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_scaling partial_rotary_factor != 1 is not supported")
    if kind == "linear" and not isinstance(scaling.get("factor"), (int, float)):
        raise ValueError(f"rope_scaling {scaling!r}: linear scaling needs a numeric 'factor'")
    if kind == "yarn" and "original_max_position_embeddings" not in scaling:
        raise ValueError(f"rope_scaling {scaling!r}: yarn needs 'original_max_position_embeddings'")


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None, max_seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float64, attention_factor) for plain, linear or YaRN rotary.

    max_seq_len stands in for transformers' `max_position_embeddings` where YaRN derives a missing
    factor from it.
    """
    check_rope_scaling(scaling)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim  # [K/2]
    inv_freq = 1.0 / theta**exponents
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq, 1.0
    assert scaling is not None
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    return _yarn(inv_freq, head_dim, theta, scaling, max_seq_len)


def _yarn(
    inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict[str, Any], max_seq_len: int | None
) -> tuple[torch.Tensor, float]:
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        if max_seq_len is None:
            raise ValueError("yarn rope_scaling without 'factor' needs max_seq_len")
        factor = max_seq_len / original
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # the dimension whose wavelength fits num_rotations times into the original context
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 = keep the original frequency (fast dims), 0 = interpolate
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)
