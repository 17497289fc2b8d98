"""The whole MoE layer against the naive per-token reference in moe_reference.py."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.moe import LocalDispatcher
from tests.moe_reference import reference_expert_choice, reference_moe

D, HID, E = 12, 16, 6


def _grads(moe, x):
    named = {"x": x.grad.clone()}
    for name, p in moe.named_parameters():
        if p.grad is not None:
            named[name] = p.grad.clone()
    return named


def _zero(moe, x):
    x.grad = None
    for p in moe.parameters():
        p.grad = None


def _compare(moe, x, mask=None, atol=1e-5, **ref_kw):
    """Forward and backward of moekit and of the reference: outputs and every gradient agree."""
    torch.manual_seed(123)
    probe = torch.randn(x.shape)
    out = moe(x, mask=mask).output
    (out * probe).sum().backward()
    fast = _grads(moe, x)
    _zero(moe, x)
    ref, info = reference_moe(moe, x, mask, **ref_kw)
    (ref * probe).sum().backward()
    slow = _grads(moe, x)
    _zero(moe, x)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=atol, rtol=1e-4, msg=f"gradient of {name}")
    return out, info


ROUTER_CASES = [
    dict(router="topk", top_k=2),
    dict(router="topk", top_k=3, norm_topk_prob=False),
    dict(router="topk", top_k=1),
    dict(router="topk_then_softmax", top_k=2, router_bias=True),
    dict(router="switch", top_k=1),
    dict(router="gshard", top_k=2),
    dict(router="noisy_topk", top_k=2),
    dict(router="sigmoid_bias", top_k=2),
    dict(router="sigmoid_bias", top_k=2, n_group=3, topk_group=2, routed_scaling_factor=2.5),
]


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("capacity_factor", [None, 0.75, 1.25])
def test_layer_matches_reference_eval(case, capacity_factor):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, hidden_dim=HID, num_experts=E, capacity_factor=capacity_factor, **case)).eval()
    if case["router"] == "sigmoid_bias":
        moe.router.expert_bias.copy_(torch.randn(E) * 0.05)
    with torch.no_grad():
        moe.router.gate.weight.mul_(4.0)  # sharper routing so capacity actually binds
    x = torch.randn(3, 7, D, requires_grad=True)
    _compare(moe, x)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu", "gelu", "silu", "gpt_oss"])
@pytest.mark.parametrize("bias", [False, True])
def test_activations_and_biases(activation, bias):
    torch.manual_seed(1)
    moe = MoE(D, HID, E, 2, activation=activation, expert_bias=bias, capacity_factor=1.0).eval()
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(0, 0.5)  # biases non-zero too
    x = torch.randn(20, D, requires_grad=True)
    _compare(moe, x)


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_drop_policies(policy):
    torch.manual_seed(2)
    moe = MoE(D, HID, E, 2, capacity_factor=0.5, drop_policy=policy).eval()
    with torch.no_grad():
        moe.router.gate.weight.mul_(5.0)
    x = torch.randn(40, D, requires_grad=True)
    out, info = _compare(moe, x)
    stats = moe(x).stats
    kept = len(info["assignments"])
    assert stats.tokens_per_expert.sum().item() == kept
    assert stats.dropped_fraction.item() == pytest.approx(1 - kept / 80)
    assert stats.dropped_fraction.item() > 0.2  # capacity 0.5 must drop


def test_probability_policy_keeps_confident_assignments():
    """With batch-priority routing the dropped assignments are the least confident ones."""
    torch.manual_seed(3)
    moe = MoE(D, HID, 2, 1, capacity_factor=0.5, drop_policy="probability").eval()
    x = torch.randn(16, D)
    routing = moe.router(x)
    _, info = reference_moe(moe, x)
    kept_tokens = {a[0] for a in info["assignments"]}
    for e in range(2):
        mine = [t for t in range(16) if routing.expert_idx_A[t] == e]
        if len(mine) > 4:
            w = routing.weight_A[mine]
            kept_w = [routing.weight_A[t] for t in mine if t in kept_tokens]
            assert min(kept_w) >= torch.sort(w, descending=True).values[3]


def test_training_mode_stochastic_routers_match_reference():
    """Switch jitter, GShard random routing and noisy gating, with the reference fed the same draws."""
    torch.manual_seed(4)
    x = torch.randn(2, 9, D, requires_grad=True)
    T = 18
    # Switch: jitter U(1-eps, 1+eps) drawn as torch.empty(T, D).uniform_ right at the router.
    moe = MoE(D, HID, E, 1, router="switch", jitter_eps=0.1, capacity_factor=1.0).train()
    x_before = x.detach().clone()
    torch.manual_seed(10)
    jitter = torch.empty(T, D).uniform_(0.9, 1.1)
    torch.manual_seed(10)
    out = moe(x).output
    assert torch.equal(x.detach(), x_before), "the caller's tensor must not be mutated"
    ref, _ = reference_moe(moe, x, jitter=jitter)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # GShard: second expert kept with probability min(1, 2 g2); uniforms drawn as torch.rand(T).
    moe = MoE(D, HID, E, 2, router="gshard").train()
    torch.manual_seed(11)
    uniform = torch.rand(T)
    torch.manual_seed(11)
    out = moe(x)
    ref, info = reference_moe(moe, x, uniform=uniform)
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=1e-5)
    assert out.stats.routed_per_expert.sum().item() == len(info["assignments"]) < 2 * T
    # Noisy top-k: standard normal noise drawn as torch.randn(T, E).
    moe = MoE(D, HID, E, 2, router="noisy_topk").train()
    with torch.no_grad():
        moe.router.noise.weight.normal_(0, 0.5)
    torch.manual_seed(12)
    noise = torch.randn(T, E)
    torch.manual_seed(12)
    out = moe(x).output
    ref, _ = reference_moe(moe, x, noise=noise)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_eval_capacity_factor_differs_from_train():
    torch.manual_seed(5)
    moe = MoE(D, HID, E, 2, capacity_factor=0.5, eval_capacity_factor=4.0)
    with torch.no_grad():
        moe.router.gate.weight.mul_(5.0)
    x = torch.randn(30, D)
    assert moe.train()(x).stats.dropped_fraction.item() > 0
    assert moe.eval()(x).stats.dropped_fraction.item() == 0


def test_padding_mask_excludes_tokens():
    """Masked tokens take no capacity and no loss mass; real tokens match the unpadded call."""
    torch.manual_seed(6)
    moe = MoE(
        D, HID, E, 2, capacity_factor=1.0, seq_balance_coef=1.0, importance_coef=1.0, load_coef=1.0
    ).eval()
    real = torch.randn(1, 5, D)
    padded = torch.cat([real, torch.randn(1, 3, D) * 100], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    a = moe(real)
    b = moe(padded, mask=mask)
    torch.testing.assert_close(b.output[:, :5], a.output, atol=1e-6, rtol=1e-6)
    for name in a.losses:
        torch.testing.assert_close(b.losses[name], a.losses[name], msg=name)
    torch.testing.assert_close(b.stats.tokens_per_expert, a.stats.tokens_per_expert)
    torch.testing.assert_close(b.stats.router_entropy, a.stats.router_entropy)
    x = padded.clone().requires_grad_(True)
    _compare(moe, x, mask=mask)


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts(gate):
    torch.manual_seed(7)
    moe = MoE(D, HID, E, 2, num_shared_experts=2, shared_gate=gate).eval()
    assert moe.shared.bank.hidden_dim == 2 * HID
    _compare(moe, torch.randn(11, D, requires_grad=True))


def test_hierarchical_moe():
    """Every outer expert is an MoE; the reference routes twice, token by token."""
    torch.manual_seed(8)
    inner = MoEConfig(dim=D, hidden_dim=8, num_experts=3, top_k=1)
    moe = MoE(D, HID, 4, 2, inner=inner).eval()
    x = torch.randn(15, D, requires_grad=True)
    probe = torch.randn(15, D)
    out = moe(x)
    (out.output * probe).sum().backward()
    fast = x.grad.clone()
    x.grad = None
    routing = moe.router(x)
    ref = []
    for t in range(15):
        acc = torch.zeros(D)
        for a in range(2):
            e = int(routing.expert_idx_A[t * 2 + a])
            w = routing.weight_A[t * 2 + a]
            inner_layer = moe.experts.layers[e]
            inner_out, _ = reference_moe(inner_layer, x[t : t + 1])
            acc = acc + w * inner_out[0]
        ref.append(acc)
    ref = torch.stack(ref)
    (ref * probe).sum().backward()
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, x.grad, atol=1e-5, rtol=1e-4)
    assert out.aux_loss.item() > 0  # inner layers' balance losses are included


@pytest.mark.parametrize("use_mask", [False, True])
def test_expert_choice(use_mask):
    torch.manual_seed(9)
    moe = MoE(D, HID, E, 2, router="expert_choice", capacity_factor=1.5).eval()
    x = torch.randn(2, 8, D, requires_grad=True)
    mask = torch.rand(2, 8) > 0.3 if use_mask else None
    out = moe(x, mask=mask)
    ref, _, C = reference_expert_choice(moe, x, mask)
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=1e-5)
    probe = torch.randn(x.shape)
    (out.output * probe).sum().backward()
    fast = x.grad.clone()
    x.grad = None
    (ref * probe).sum().backward()
    torch.testing.assert_close(fast, x.grad, atol=1e-5, rtol=1e-4)
    if mask is None:
        assert out.stats.tokens_per_expert.tolist() == [C] * E  # balanced by construction


def test_expert_choice_refused_in_causal_models():
    with pytest.raises(ValueError, match="leaks future tokens"):
        MoE(D, HID, E, 2, router="expert_choice", causal=True)
    MoE(D, HID, E, 2, router="expert_choice", causal=True, allow_causal_expert_choice=True)


def test_router_runs_in_float32_for_low_precision_experts():
    torch.manual_seed(10)
    moe = MoE(D, HID, E, 2).to(torch.bfloat16)
    x = torch.randn(4, D, dtype=torch.bfloat16)
    routing = moe.router(x)
    assert routing.logits_TE.dtype == torch.float32 and routing.weight_A.dtype == torch.float32
    out = moe(x)
    assert out.output.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32


def test_small_router_init():
    torch.manual_seed(11)
    a = MoE(64, HID, E, 2).router.gate.weight.std().item()
    b = MoE(64, HID, E, 2, router_init_scale=0.1).router.gate.weight.std().item()
    assert b == pytest.approx(0.1 * a, rel=0.2)


def test_float64_gradcheck():
    torch.manual_seed(12)
    moe = MoE(4, 6, 3, 2, capacity_factor=1.0, num_shared_experts=1, importance_coef=0.5).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        out = moe(x)
        return out.output, out.aux_loss, out.z_loss

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)
    # and with respect to the router and expert weights
    names = ["experts.w_in_EDF", "experts.w_out_EFD", "router.gate.weight"]
    params = tuple(dict(moe.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    def g(*ps):
        return torch.func.functional_call(moe, dict(zip(names, ps)), (x.detach(),)).output

    assert torch.autograd.gradcheck(g, params, eps=1e-6, atol=1e-5)


def test_same_seed_same_result():
    def run():
        torch.manual_seed(13)
        moe = MoE(D, HID, E, 2, router="noisy_topk").train()
        x = torch.randn(10, D)
        return moe(x).output

    assert torch.equal(run(), run())


def test_router_gets_gradient_through_combine_weights():
    torch.manual_seed(14)
    moe = MoE(D, HID, E, 2, load_balance_coef=0.0, z_loss_coef=0.0)
    moe(torch.randn(10, D)).output.sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_aux_free_bias_update():
    moe = MoE(D, HID, 4, 1, router="sigmoid_bias", bias_update_rate=0.01)
    moe.update_bias(torch.tensor([10.0, 2.0, 4.0, 0.0]))  # mean 4
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    assert not moe.router.expert_bias.requires_grad
    MoE(D, HID, 4, 1).update_bias(torch.ones(4))  # a no-op for routers without a bias


def test_bias_steers_selection_but_not_weights():
    torch.manual_seed(15)
    moe = MoE(D, HID, 4, 1, router="sigmoid_bias", norm_topk_prob=False).eval()
    x = torch.randn(50, D)
    moe.router.expert_bias.copy_(torch.tensor([100.0, 0, 0, 0]))
    routing = moe.router(x)
    assert (routing.expert_idx_A == 0).all()
    torch.testing.assert_close(routing.weight_A, torch.sigmoid(moe.router.gate(x)[:, 0]))


def test_switch_jitter_only_in_training():
    torch.manual_seed(16)
    moe = MoE(D, HID, E, 1, router="switch", jitter_eps=0.2)
    x = torch.randn(10, D)
    moe.eval()
    assert torch.equal(moe(x).output, moe(x).output)
    moe.train()
    torch.manual_seed(0)
    a = moe.router(x).logits_TE
    torch.manual_seed(1)
    b = moe.router(x).logits_TE
    assert not torch.equal(a, b)


def test_empty_input():
    moe = MoE(D, HID, E, 2, capacity_factor=1.0)
    out = moe(torch.randn(0, D))
    assert out.output.shape == (0, D)
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)


def test_router_stays_float32_under_autocast():
    """bf16 autocast (the GPU training mode) must not lower the router's precision."""
    torch.manual_seed(17)
    moe = MoE(D, HID, E, 2, router="noisy_topk").train()
    x = torch.randn(6, D)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        routing = moe.router(x)
    assert routing.logits_TE.dtype == torch.float32
    torch.testing.assert_close(routing.logits_TE, x @ moe.router.gate.weight.T, atol=1e-5, rtol=1e-5)


FUSED_CASES = [
    dict(),
    dict(capacity_factor=0.75),
    dict(router="expert_choice", capacity_factor=1.5),
    dict(router="switch", top_k=1, expert_bias=True),
    dict(num_shared_experts=1, shared_gate=True),
    dict(activation="geglu", top_k=3),
]


class _ComposedDispatcher(LocalDispatcher):
    """A LocalDispatcher subclass: the layer then takes the composed dispatch -> bank -> combine path."""


@pytest.mark.parametrize(
    "case", FUSED_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default"
)
@pytest.mark.parametrize("use_mask", [False, True])
def test_fused_local_path_matches_composed_path(case, use_mask):
    """On one process the layer fuses gather, experts and combine; it matches the composed path
    (what other dispatchers use) in outputs, stats and gradients, with and without autograd."""
    torch.manual_seed(17)
    moe = MoE(D, HID, E, **(dict(top_k=2) | case)).eval()
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(0, 0.5)
    composed = copy.deepcopy(moe)
    composed.dispatcher = _ComposedDispatcher()
    x = torch.randn(2, 9, D)
    mask = torch.rand(2, 9) > 0.3 if use_mask else None
    probe = torch.randn(2, 9, D)
    results = []
    for layer in (moe, composed):
        xg = x.clone().requires_grad_(True)
        out = layer(xg, mask=mask)
        (out.output * probe).sum().backward()
        grads = [xg.grad] + [p.grad for p in layer.parameters()]
        results.append((out, grads))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast.output, slow.output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.aux_loss, slow.aux_loss)
    torch.testing.assert_close(fast.stats.tokens_per_expert, slow.stats.tokens_per_expert)
    for a, b in zip(fast_grads, slow_grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, mask=mask).output, slow.output.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_mask", [False, True])
def test_inference_losses_and_stats_are_computed_when_read_with_the_same_values(use_mask):
    """Without autograd the losses and derived stats wait until read; their values do not change."""
    moe = MoE(D, HID, E, 2, importance_coef=0.3, load_coef=0.2, seq_balance_coef=0.1).eval()
    torch.manual_seed(5)
    x = torch.randn(3, 7, D)
    mask = torch.rand(3, 7) > 0.3 if use_mask else None
    eager = moe(x, mask=mask)  # autograd on: everything computed in the call
    assert eager.aux_loss.requires_grad
    with torch.no_grad():
        lazy = moe(x, mask=mask)
    assert lazy._losses is None and lazy.stats._entropy is None  # nothing computed yet
    assert set(lazy.losses) == set(eager.losses)
    for name in eager.losses:
        torch.testing.assert_close(lazy.losses[name], eager.losses[name].detach(), rtol=0, atol=0)
    torch.testing.assert_close(lazy.aux_loss, eager.aux_loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(lazy.z_loss, eager.z_loss.detach(), rtol=0, atol=0)
    assert not lazy.aux_loss.requires_grad
    # the derived stats against float64 math from the router's own probabilities
    probs = torch.softmax(moe.router.gate(x.reshape(-1, D)).double(), dim=-1)
    m = torch.ones(21, dtype=torch.bool) if mask is None else mask.reshape(-1)
    entropy = (-(probs * probs.log()).sum(-1))[m].mean()
    assert abs(float(lazy.stats.router_entropy) - float(entropy)) < 1e-5
    load = lazy.stats.routed_per_expert.double()
    assert abs(float(lazy.stats.max_load_violation) - float(load.max() / load.mean() - 1)) < 1e-6
    assert float(lazy.stats.dropped_fraction) == 0.0
    out, aux, z, stats, losses, logits = lazy  # still unpacks like a tuple
    assert out is lazy.output and aux is lazy.aux_loss and logits is lazy.router_logits


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gpt_oss", True), ("gelu", True)])
def test_one_token_inference_matches_reference(case, activation, bias):
    """A decode step (one token, no autograd) takes ExpertBank.forward_one_token: same outputs as
    the per-token reference, and the same routed counts and losses as the general path."""
    torch.manual_seed(3)
    cfg = MoEConfig(
        dim=D,
        hidden_dim=HID,
        num_experts=E,
        activation=activation,
        expert_bias=bias,
        num_shared_experts=1,
        **case,
    )
    moe = MoE(cfg).eval()
    if case["router"] == "sigmoid_bias":
        moe.router.expert_bias.copy_(torch.randn(E) * 0.05)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(0, 0.5)  # biases non-zero too
    calls = []
    one_token = moe.experts.forward_one_token
    moe.experts.forward_one_token = lambda *a: calls.append(1) or one_token(*a)
    for seed in range(4):
        x = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            fast = moe(x)
            ref, _ = reference_moe(moe, x)
        general = moe(x)  # autograd on: the general dispatch path
        torch.testing.assert_close(fast.output, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.output, general.output.detach(), atol=1e-5, rtol=1e-5)
        assert torch.equal(fast.stats.routed_per_expert, general.stats.routed_per_expert)
        assert torch.equal(fast.stats.tokens_per_expert, general.stats.tokens_per_expert)
        torch.testing.assert_close(fast.aux_loss, general.aux_loss.detach())
        torch.testing.assert_close(fast.z_loss, general.z_loss.detach())
    assert len(calls) == 4  # the one-token path ran (and only without autograd)
