"""MoEConfig.router_dtype: float32 by default; "bfloat16" rounds the router's math through bf16."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from moekit.moe import MoEConfig
from moekit.train import load_config


def _is_bf16_exact(t: torch.Tensor) -> bool:
    return torch.equal(t, t.to(torch.bfloat16).to(t.dtype))


def test_default_router_is_float32_and_unrounded():
    assert MoEConfig(dim=8, hidden_dim=4, num_experts=4).router_dtype == "float32"
    torch.manual_seed(0)
    moe = MoE(16, 8, 8, top_k=2)
    routing = moe.router(torch.randn(64, 16))
    assert routing.logits_TE.dtype == torch.float32
    assert not _is_bf16_exact(routing.probs_TE)  # float32 values with more than bf16's 8 bits


@pytest.mark.parametrize("router", ["topk", "switch", "sigmoid_bias"])
def test_bfloat16_router_rounds_logits_probs_and_weights(router):
    torch.manual_seed(0)
    kw = dict(router=router, top_k=1 if router == "switch" else 2, jitter_eps=0.0)
    exact = MoE(16, 8, 8, **kw).eval()
    low = MoE(16, 8, 8, router_dtype="bfloat16", **kw).eval()
    low.load_state_dict(exact.state_dict())
    x = torch.randn(64, 16)
    r32, r16 = exact.router(x), low.router(x)
    for t in (r16.logits_TE, r16.probs_TE, r16.weight_A):
        assert t.dtype == torch.float32 and _is_bf16_exact(t)
    # Same decisions up to bf16 rounding: values agree to bf16 precision (8 mantissa bits).
    torch.testing.assert_close(r16.logits_TE, r32.logits_TE, atol=0.02, rtol=0.02)
    torch.testing.assert_close(r16.probs_TE, r32.probs_TE, atol=0.01, rtol=0.02)


def test_bfloat16_router_trains_end_to_end():
    torch.manual_seed(0)
    moe = MoE(16, 8, 4, top_k=2, router_dtype="bfloat16")
    out = moe(torch.randn(2, 10, 16))
    (out.output.square().mean() + out.aux_loss + out.z_loss).backward()
    grad = moe.router.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_router_dtype_is_validated_and_settable_from_the_cli():
    with pytest.raises(ValueError, match="router_dtype"):
        MoEConfig(dim=8, hidden_dim=4, num_experts=4, router_dtype="float16")
    cfg = load_config(None, ["moe.router_dtype=bfloat16"])
    assert cfg.model_config(vocab_size=64).moe.router_dtype == "bfloat16"
