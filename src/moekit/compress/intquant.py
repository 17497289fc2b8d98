"""Weight-only integer formats for expert matrices [E, K, N] (K inputs, N outputs per expert).

int8  symmetric, one float32 scale per output column: s = max_k |w| / 127, q = round(w / s) in
      [-127, 127]; |w - q s| <= s / 2.
int4  asymmetric, per group of G consecutive inputs and output column (GPTQ/AWQ style): the range
      is widened to include 0, s = (max(hi, 0) - min(lo, 0)) / 15 rounded *up* to float16,
      z = round(-min(lo, 0) / s) in [0, 15] (a 4-bit zero point), q = clamp(round(w / s) + z, 0, 15);
      w ~ (q - z) s with |w - (q - z) s| <= s / 2. Two 4-bit values share a byte along K.
Bits per weight: int8 8 + 32/K; int4 4 + (16 + 8)/G (float16 scale, uint8-stored zero point).
"""

from __future__ import annotations

import torch
from torch import Tensor


def int8_quantize(w_EKN: Tensor) -> dict[str, Tensor]:
    scale_E1N = w_EKN.abs().amax(dim=1, keepdim=True).float() / 127.0
    scale_E1N = torch.where(scale_E1N > 0, scale_E1N, torch.ones_like(scale_E1N))
    q = torch.round(w_EKN.float() / scale_E1N).clamp(-127, 127).to(torch.int8)
    return {"q": q, "scale": scale_E1N}


def int8_dequantize(t: dict[str, Tensor], e: int) -> Tensor:
    return t["q"][e].float() * t["scale"][e]  # [K, N]


def _fp16_at_least(x: Tensor) -> Tensor:
    """The smallest float16 >= x (elementwise, x >= 0), so a rounded scale never shrinks the range."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def int4_quantize(w_EKN: Tensor, group_size: int) -> dict[str, Tensor]:
    E, K, N = w_EKN.shape
    if group_size < 2 or group_size % 2 or K % group_size:
        raise ValueError(
            f"--group-size={group_size} is invalid for an input dimension of {K}: expected an even "
            f"divisor of {K}"
        )
    w = w_EKN.float().view(E, K // group_size, group_size, N)
    lo = w.amin(dim=2).clamp(max=0)  # [E, G, N]
    hi = w.amax(dim=2).clamp(min=0)
    scale = _fp16_at_least((hi - lo) / 15.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale.float()).clamp(0, 15)
    q = (torch.round(w / scale.float()[:, :, None]) + zero[:, :, None]).clamp(0, 15).to(torch.uint8)
    q = q.view(E, K // 2, 2, N)
    packed = q[:, :, 0] | (q[:, :, 1] << 4)  # [E, K/2, N]: even k low nibble, odd k high nibble
    return {"q": packed, "scale": scale, "zero": zero.to(torch.uint8)}


def int4_dequantize(t: dict[str, Tensor], e: int) -> Tensor:
    packed = t["q"][e]  # [K/2, N]
    q = torch.stack([packed & 15, packed >> 4], dim=1).view(-1, packed.shape[1]).float()  # [K, N]
    scale, zero = t["scale"][e].float(), t["zero"][e].float()  # [G, N]
    groups = scale.shape[0]
    w = (q.view(groups, -1, q.shape[1]) - zero[:, None]) * scale[:, None]
    return w.view(q.shape)
