"""Every router's decisions (experts and weights per token) against the per-token loop reference."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from tests.moe_reference import route_token

CASES = [
    dict(router="topk", top_k=2),
    dict(router="topk", top_k=2, norm_topk_prob=False),
    dict(router="topk_then_softmax", top_k=3, router_bias=True),
    dict(router="switch", top_k=1),
    dict(router="gshard", top_k=2),
    dict(router="noisy_topk", top_k=2),
    dict(router="sigmoid_bias", top_k=2),
    dict(
        router="sigmoid_bias",
        top_k=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_router_matches_loop(case):
    torch.manual_seed(0)
    D, E, T = 10, 8, 25
    moe = MoE(D, 4, E, **case).eval()
    if moe.router.gate.bias is not None:
        torch.nn.init.normal_(moe.router.gate.bias)
    if case["router"] == "sigmoid_bias":
        moe.router.expert_bias.copy_(torch.randn(E) * 0.1)
    x = torch.randn(T, D)
    routing = moe.router(x)
    k = routing.top_k
    assert routing.expert_idx_A.shape == (T * k,) and routing.weight_A.shape == (T * k,)
    for t in range(T):
        logits, probs, chosen, _ = route_token(moe, x[t])
        got_e = routing.expert_idx_A[t * k : (t + 1) * k].tolist()
        got_w = routing.weight_A[t * k : (t + 1) * k]
        assert got_e == [e for e, _ in chosen], f"token {t}"
        torch.testing.assert_close(
            got_w, torch.stack([torch.as_tensor(w) for _, w in chosen]).float(), atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(
            routing.logits_TE[t],
            torch.stack([torch.as_tensor(v) for v in logits]).float(),
            atol=1e-6,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            routing.probs_TE[t],
            torch.stack([torch.as_tensor(v) for v in probs]).float(),
            atol=1e-6,
            rtol=1e-5,
        )


def test_expert_choice_each_expert_takes_its_top_tokens():
    torch.manual_seed(1)
    D, E, T = 6, 4, 10
    moe = MoE(D, 4, E, 2, router="expert_choice", capacity_factor=2.0)
    x = torch.randn(T, D)
    routing = moe.router(x)
    C = 5  # ceil(2.0 * 10 / 4)
    probs = (x @ moe.router.gate.weight.T).softmax(-1)
    for e in range(E):
        tokens = routing.token_idx_A[routing.expert_idx_A == e].tolist()
        want = sorted(range(T), key=lambda t: -float(probs[t, e]))[:C]
        assert tokens == want
        torch.testing.assert_close(routing.weight_A[routing.expert_idx_A == e], probs[want, e])


@pytest.mark.parametrize("bias", [False, True])
def test_gate_over_many_experts_matches_float64_both_ways(bias, monkeypatch):
    """Many tokens over 64+ experts: the router's gate takes moekit's GEMM (native.linear, where the
    kernels are built) with its own backward. Logits and the gradients of the input, the gate weight
    and its bias equal float64 autograd of x W^T + b; the routing equals the float64 one's."""
    from moekit.moe import MoEConfig, native
    from moekit.moe.router import build_router

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    torch.manual_seed(0)
    router = build_router(MoEConfig(dim=64, hidden_dim=32, num_experts=96, top_k=4, router_bias=bias))
    if bias:
        torch.nn.init.normal_(router.gate.bias)
    x = torch.randn(50, 64, requires_grad=True)
    calls = []
    gemm = native.gemm
    monkeypatch.setattr(native, "gemm", lambda *a, **k: calls.append(1) or gemm(*a, **k))
    routing = router(x)
    grad = torch.randn(50, 96)
    routing.logits_TE.backward(grad)
    if native.library() is not None:
        assert len(calls) == 3  # the forward product and the backward's two
    x64 = x.detach().double().requires_grad_(True)
    w64 = router.gate.weight.detach().double().requires_grad_(True)
    b64 = router.gate.bias.detach().double().requires_grad_(True) if bias else None
    logits64 = torch.nn.functional.linear(x64, w64, b64)
    logits64.backward(grad.double())
    torch.testing.assert_close(routing.logits_TE.detach().double(), logits64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(router.gate.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(router.gate.bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-4)
    top64 = logits64.detach().softmax(-1).topk(4, dim=-1).indices.reshape(-1)
    assert torch.equal(routing.expert_idx_A, top64)
