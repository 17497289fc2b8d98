"""Expert activations: the functions, and their forward/backward on preallocated row blocks.

An expert's hidden activation is either a GLU, `act(gate) * up` with the hidden layout
[gate | up] along the last dim (SwiGLU, GeGLU, GPT-OSS's clamped SwiGLU), or a plain function
of the hidden (ReLU, GELU, SiLU). `apply_activation` is the reference composition that autograd
differentiates; `activation_into` and `activation_backward` are what the fused expert function
(fused.py) runs on one row block, writing into buffers it reuses from block to block. SwiGLU, the
common case, has a hand-written backward; the others differentiate `apply_activation` on the block
with autograd, which is exact and only a little slower.

Shape legend: R rows of a block, F hidden dim, H = 2F for GLU (gate | up) else F.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


def glu_activation(name: str, gate: Tensor, up: Tensor) -> Tensor:
    """act(gate) * up for the GLU family."""
    if name == "swiglu":
        return F.silu(gate) * up
    if name == "geglu":
        return F.gelu(gate, approximate="tanh") * up
    if name == "gpt_oss":  # clamped SwiGLU of GPT-OSS: (up + 1) * g * sigmoid(1.702 g)
        gate = gate.clamp(max=GPT_OSS_LIMIT)
        up = up.clamp(-GPT_OSS_LIMIT, GPT_OSS_LIMIT)
        return (up + 1) * gate * torch.sigmoid(GPT_OSS_ALPHA * gate)
    raise ValueError(f"unknown GLU activation {name!r}: expected swiglu, geglu or gpt_oss")


def ffn_activation(name: str, h: Tensor) -> Tensor:
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "silu":
        return F.silu(h)
    raise ValueError(f"unknown FFN activation {name!r}: expected relu, gelu or silu")


def apply_activation(name: str, h_NF: Tensor, is_glu: bool) -> Tensor:
    """Hidden activation of either family; GLU hidden is [gate | up] along the last dim."""
    if is_glu:
        gate, up = h_NF.chunk(2, dim=-1)
        return glu_activation(name, gate, up)
    return ffn_activation(name, h_NF)


def activation_into(name: str, is_glu: bool, h_RH: Tensor, out_RF: Tensor) -> Tensor:
    """out = act(h) without autograd, written into a preallocated block buffer."""
    if name == "swiglu":
        hidden = out_RF.shape[-1]
        torch.ops.aten.silu.out(h_RH[:, :hidden], out=out_RF)  # [R, F] silu(gate)
        return out_RF.mul_(h_RH[:, hidden:])  # * up
    return out_RF.copy_(apply_activation(name, h_RH, is_glu))


def activation_backward(
    name: str, is_glu: bool, h_RH: Tensor, grad_a_RF: Tensor, a_RF: Tensor, grad_h_RH: Tensor, work_RF: Tensor
) -> None:
    """Given dL/da, write a = act(h) into `a_RF` and dL/dh into `grad_h_RH`.

    `work_RF` is scratch of a's shape. Nothing here is autograd-tracked; `h_RH` is only read, so
    a graph kept with retain_graph=True can be differentiated again.
    """
    if name == "swiglu":
        hidden = a_RF.shape[-1]
        gate_RF, up_RF = h_RH[:, :hidden], h_RH[:, hidden:]
        silu_RF = torch.ops.aten.silu.out(gate_RF, out=work_RF)  # [R, F]
        torch.mul(silu_RF, up_RF, out=a_RF)  # a = silu(gate) * up
        torch.mul(grad_a_RF, silu_RF, out=grad_h_RH[:, hidden:])  # dL/dup = dL/da * silu(gate)
        torch.mul(grad_a_RF, up_RF, out=work_RF)  # dL/dsilu = dL/da * up
        torch.ops.aten.silu_backward.grad_input(work_RF, gate_RF, grad_input=grad_h_RH[:, :hidden])
        return
    with torch.enable_grad():
        leaf_RH = h_RH.detach().requires_grad_(True)
        act_RF = apply_activation(name, leaf_RH, is_glu)
        (grad_RH,) = torch.autograd.grad(act_RF, leaf_RH, grad_a_RF)
    a_RF.copy_(act_RF.detach())
    grad_h_RH.copy_(grad_RH)
