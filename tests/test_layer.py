"""The whole MoE layer against the naive per-token reference in moe_reference.py."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from moekit import MoE, MoEConfig
from moekit.moe import LocalDispatcher, native
from tests.moe_reference import ROUTER_CASES, expert_forward, reference_expert_choice, reference_moe

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


def _compare(moe, x, mask=None, atol=1e-5, seed=None, reference=reference_moe, **ref_kw):
    """Forward and backward of moekit and of the reference: outputs and every gradient agree.

    `seed` seeds torch right before moekit's forward, so a stochastic router draws what the test
    drew after the same seed and passed to the reference (jitter, uniform, noise in ref_kw).
    """
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(123))
    if seed is not None:
        torch.manual_seed(seed)
    out = moe(x, mask=mask).output
    (out * probe).sum().backward()
    fast = _grads(moe, x)
    _zero(moe, x)
    ref, info = reference(moe, x, mask, **ref_kw)
    (ref * probe).sum().backward()
    slow = _grads(moe, x)
    _zero(moe, x)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=atol, rtol=1e-4, msg=f"gradient of {name}")
    info["compared_gradients"] = sorted(fast)
    return out, info


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
    kept_tokens = {a[0] for a in info["assignments"]}
    dropped_tokens = [t for t in range(40) if t not in kept_tokens]
    assert dropped_tokens  # a token whose assignments were all dropped gets exactly zero
    assert torch.equal(out[dropped_tokens], torch.zeros(len(dropped_tokens), D))
    stats = moe(x).stats
    kept = len(info["assignments"])
    assert stats.tokens_per_expert.sum().item() == kept
    assert stats.dropped_fraction.item() == pytest.approx(1 - kept / 80)
    assert stats.dropped_fraction.item() > 0.2  # capacity 0.5 must drop


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 12),
    num_experts=st.integers(1, 6),
    k_frac=st.floats(0, 1),
    cf=st.one_of(st.none(), st.floats(0.2, 2.0)),
    min_capacity=st.integers(0, 3),
    policy=st.sampled_from(["position", "probability"]),
    seed=st.integers(0, 10_000),
)
def test_layer_property_against_reference(T, num_experts, k_frac, cf, min_capacity, policy, seed):
    """Over random T, E, k and capacity: the layer's output is the reference's, every assignment
    the capacity rule keeps ran once (tokens per expert = the reference's kept assignments)."""
    k = max(1, min(num_experts, 1 + int(k_frac * num_experts)))
    torch.manual_seed(seed)
    cfg = dict(capacity_factor=cf, min_capacity=min_capacity, drop_policy=policy)
    moe = MoE(4, 6, num_experts, k, **cfg).eval()
    with torch.no_grad():
        moe.router.gate.weight.mul_(3.0)
    x = torch.randn(T, 4)
    with torch.no_grad():
        out = moe(x)
        ref, info = reference_moe(moe, x)
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=1e-5)
    kept = [0] * num_experts
    for _, e, _, _ in info["assignments"]:
        kept[e] += 1
    assert out.stats.tokens_per_expert.tolist() == kept


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_drop_policy_decides_which_tokens_an_expert_keeps(policy):
    """Top-1, C = ceil(0.5 * 16 / 2) = 4: each expert keeps its first 4 tokens ("position") or its
    4 most confident ones ("probability", batch priority); the others come out exactly zero."""
    torch.manual_seed(3)
    moe = MoE(D, HID, 2, 1, capacity_factor=0.5, drop_policy=policy).eval()
    x = torch.randn(16, D)
    out = moe(x).output
    _, info = reference_moe(moe, x)  # only its per-token routing (expert, weight) is used
    want_kept = set()
    for e in range(2):
        mine = [
            (t, float(info["per_token"][t][2][0][1])) for t in range(16) if info["per_token"][t][2][0][0] == e
        ]
        if policy == "probability":
            mine.sort(key=lambda tw: -tw[1])
        want_kept.update(t for t, _ in mine[:4])
    assert len(want_kept) < 16  # the rule dropped something
    got_kept = {t for t in range(16) if out[t].abs().sum() > 0}
    assert got_kept == want_kept
    dropped = sorted(set(range(16)) - want_kept)
    assert torch.equal(out[dropped], torch.zeros(len(dropped), D))


def test_training_mode_stochastic_routers_match_reference():
    """Switch jitter, GShard random routing and noisy gating, with the reference fed the same draws:
    outputs and the gradients of input, router (noise weights included) and experts agree."""
    torch.manual_seed(4)
    x = torch.randn(2, 9, D, requires_grad=True)
    T = 18
    # Switch: jitter U(1-eps, 1+eps) drawn as torch.empty(T, D).uniform_ right at the router.
    moe = MoE(D, HID, E, 1, router="switch", jitter_eps=0.1, capacity_factor=1.0).train()
    x_before = x.detach().clone()
    torch.manual_seed(10)
    jitter = torch.empty(T, D).uniform_(0.9, 1.1)
    _compare(moe, x, seed=10, jitter=jitter)
    assert torch.equal(x.detach(), x_before), "the caller's tensor must not be mutated"
    # GShard: second expert kept with probability min(1, 2 g2); uniforms drawn as torch.rand(T).
    moe = MoE(D, HID, E, 2, router="gshard").train()
    torch.manual_seed(11)
    uniform = torch.rand(T)
    _, info = _compare(moe, x, seed=11, uniform=uniform)
    torch.manual_seed(11)
    assert moe(x).stats.routed_per_expert.sum().item() == len(info["assignments"]) < 2 * T
    # Noisy top-k: standard normal noise drawn as torch.randn(T, E).
    moe = MoE(D, HID, E, 2, router="noisy_topk").train()
    with torch.no_grad():
        moe.router.noise.weight.normal_(0, 0.5)
    torch.manual_seed(12)
    noise = torch.randn(T, E)
    _, info = _compare(moe, x, seed=12, noise=noise)
    assert "router.noise.weight" in info["compared_gradients"]  # the learned noise scale trains


@pytest.mark.parametrize("train_cf,eval_cf", [(0.5, 4.0), (None, 0.5)])
def test_separate_train_and_eval_capacity_factors(train_cf, eval_cf):
    """capacity_factor while training, eval_capacity_factor in evaluation; both against the reference."""
    torch.manual_seed(5)
    moe = MoE(D, HID, E, 2, capacity_factor=train_cf, eval_capacity_factor=eval_cf)
    with torch.no_grad():
        moe.router.gate.weight.mul_(5.0)
    x = torch.randn(30, D, requires_grad=True)
    for training, cf in ((True, train_cf), (False, eval_cf)):
        moe.train(training)
        _, info = _compare(moe, x)
        dropped = moe(x).stats.dropped_fraction.item()
        assert dropped == pytest.approx(1 - len(info["assignments"]) / 60)
        assert (dropped > 0) == (cf is not None and cf < 1), (training, dropped)


def test_min_capacity_floors_the_slots_per_expert():
    """C = max(min_capacity, ceil(CF * k * T / E)) = max(5, ceil(0.25 * 80 / 6) = 4) = 5."""
    torch.manual_seed(5)
    moe = MoE(D, HID, E, 2, capacity_factor=0.25, min_capacity=5).eval()
    x = torch.randn(40, D, requires_grad=True)
    _, info = _compare(moe, x)
    routed = [0] * E
    for t in range(40):
        for e, _ in info["per_token"][t][2]:
            routed[e] += 1
    assert moe(x).stats.tokens_per_expert.tolist() == [min(r, 5) for r in routed]
    assert max(routed) > 5  # the floor, not the routing, limits some expert


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


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_hierarchical_moe(capacity_factor):
    """Every outer expert is an MoE; the reference routes twice, token by token. Outputs, every
    gradient (outer and inner routers and experts) and the losses, which add the mean of the inner
    layers' losses (over the inner layers that got tokens) to the outer ones."""
    torch.manual_seed(8)
    inner = MoEConfig(dim=D, hidden_dim=8, num_experts=3, top_k=1)
    moe = MoE(D, HID, 4, 2, inner=inner, capacity_factor=capacity_factor).eval()
    with torch.no_grad():
        moe.router.gate.weight.mul_(3.0)
    x = torch.randn(15, D, requires_grad=True)
    _, info = _compare(moe, x)
    assert {
        "router.gate.weight",
        "experts.layers.0.router.gate.weight",
        "experts.layers.0.experts.w_in_EDF",
    } <= set(info["compared_gradients"])
    inner_losses = []
    for e in range(4):
        tokens = sorted(t for t, expert, _, _ in info["assignments"] if expert == e)
        if tokens:
            inner_losses.append(reference_moe(moe.experts.layers[e], x[tokens])[1]["losses"])
    outer, cfg = info["losses"], moe.config
    want_aux = cfg.load_balance_coef * (
        outer["load_balance"] + sum(i["load_balance"] for i in inner_losses) / len(inner_losses)
    )
    want_z = cfg.z_loss_coef * (outer["z"] + sum(i["z"] for i in inner_losses) / len(inner_losses))
    out = moe(x)
    assert out.aux_loss.item() == pytest.approx(want_aux, rel=1e-5)
    assert out.z_loss.item() == pytest.approx(want_z, rel=1e-5)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("eval_capacity_factor", [None, 0.5])
def test_expert_choice(use_mask, eval_capacity_factor):
    """Outputs and every gradient against the per-expert loop; C from eval_capacity_factor in evaluation."""
    torch.manual_seed(9)
    cfg = dict(capacity_factor=1.5, eval_capacity_factor=eval_capacity_factor)
    moe = MoE(D, HID, E, 2, router="expert_choice", **cfg).eval()
    x = torch.randn(2, 8, D, requires_grad=True)
    mask = torch.rand(2, 8) > 0.3 if use_mask else None
    _, info = _compare(moe, x, mask, reference=reference_expert_choice)
    capacity = info["capacity"]
    assert capacity == (4 if eval_capacity_factor is None else 2)  # ceil(1.5 * 16 / 6), ceil(0.5 * 16 / 6)
    if mask is None:
        assert moe(x).stats.tokens_per_expert.tolist() == [capacity] * E  # balanced by construction


def test_expert_dropout_on_hidden_activations_in_training_only():
    """expert_dropout drops the experts' activated hidden units (inverted dropout, rate p) while
    training; the output equals a per-assignment loop applying the same mask; evaluation has none."""
    torch.manual_seed(18)
    p, T, k = 0.5, 10, 2
    moe = MoE(D, HID, E, k, expert_dropout=p).train()
    captured = {}
    moe.experts.dropout.register_forward_hook(lambda m, inp, out: captured.update(a=inp[0], dropped=out))
    x = torch.randn(T, D, requires_grad=True)
    out = moe(x).output
    a_NF, dropped_NF = captured["a"], captured["dropped"]
    keep_NF = dropped_NF != 0
    torch.testing.assert_close(dropped_NF[keep_NF], a_NF[keep_NF] / (1 - p))
    assert abs(1 - keep_NF.float().mean().item() - p) < 0.1  # 320 units: the rate's std is about 0.03
    # rows are the assignments sorted by expert, then by token (dropless: every assignment runs)
    _, info = reference_moe(moe, x)
    rows = sorted((e, t, w) for t, e, w, _ in info["assignments"])
    ref = [x.new_zeros(D) for _ in range(T)]
    for n, (e, t, w) in enumerate(rows):
        scale_F = keep_NF[n].to(x.dtype) / (1 - p)
        ref[t] = ref[t] + w * expert_forward(moe, e, x[t], hidden_scale=scale_F)
    torch.testing.assert_close(out, torch.stack(ref), atol=1e-5, rtol=1e-5)
    moe.eval()
    _compare(moe, x)  # no dropout in evaluation: the plain reference


def _flops_and_largest_tensor(moe, x):
    """FLOPs of forward + backward (torch's counter, plus the two products it has no formula for)
    and the most elements of any tensor an op produced."""
    aten = torch.ops.aten
    mapping = {
        aten.mv: lambda mat, vec, *a, out_shape=None, **kw: 2 * mat[0] * mat[1],
        aten._grouped_mm: lambda a, b, *r, out_shape=None, **kw: 2 * math.prod(out_shape) * b[-2],
    }

    class LargestTensor(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor):
                    LargestTensor.numel = max(LargestTensor.numel, t.numel())
            return result

    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, LargestTensor():
        out = moe(x)
        out.output.sum().backward()
    return counter.get_total_flops(), LargestTensor.numel, out


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_experts_compute_only_their_kept_rows(monkeypatch, capacity_factor):
    """The default path multiplies each kept assignment by its own expert only: FLOPs are the
    router's plus 3x (forward, input and weight gradients) 2 N (D 2F + F D) for N kept assignments,
    never all experts on all tokens, and no tensor has anywhere near T E C entries (no one-hot dispatch).
    (The torch path: torch's FLOP counter does not see inside the native kernels, whose loops run
    over the kept rows' groups only.)"""
    monkeypatch.setattr(native, "ENABLED", False)
    torch.manual_seed(19)
    T, num_experts, k, dim, hidden = 256, 16, 2, 8, 8
    moe = MoE(dim, hidden, num_experts, k, capacity_factor=capacity_factor).train()
    x = torch.randn(T, dim, requires_grad=True)
    flops, largest, out = _flops_and_largest_tensor(moe, x)
    kept = int(out.stats.tokens_per_expert.sum())
    assert kept == T * k if capacity_factor is None else kept < T * k
    router = 3 * 2 * T * dim * num_experts
    experts = 3 * 2 * kept * (dim * 2 * hidden + hidden * dim)
    assert flops == router + experts
    capacity = math.ceil(k * T / num_experts)  # 32 slots per expert at capacity factor 1
    assert largest <= T * k * 2 * hidden < T * num_experts * capacity // 8  # [N, 2F] hidden at most


def test_readme_layer_example_runs():
    """The README's example of constructing the layer and reading its losses runs as written."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## The MoE layer") :]
    code = section[
        section.index("```python") + len("```python") : section.index("```", section.index("```python") + 9)
    ]
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "README.md: The MoE layer", "exec"), namespace)
    out = namespace["out"]
    assert out.output.shape == (4, 128, 512)
    assert out.aux_loss.item() > 0 and out.z_loss.item() > 0


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
    """Router weights ~ N(0, (scale / sqrt(dim))^2): 1/8 by default at dim 64, 0.1/8 with scale 0.1."""
    torch.manual_seed(11)
    a = MoE(64, HID, E, 2).router.gate.weight.std().item()
    b = MoE(64, HID, E, 2, router_init_scale=0.1).router.gate.weight.std().item()
    assert a == pytest.approx(1 / 8, rel=0.15)  # 384 samples: the std's relative error is about 4%
    assert b == pytest.approx(0.1 / 8, rel=0.15)


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
    # (at these sizes the inference call routes in the native kernel, native.topk_layer: its logits
    # differ from the autograd call's torch product by float32 rounding)
    for name in eager.losses:
        torch.testing.assert_close(lazy.losses[name], eager.losses[name].detach(), rtol=2e-6, atol=0)
    torch.testing.assert_close(lazy.aux_loss, eager.aux_loss.detach(), rtol=2e-6, atol=0)
    torch.testing.assert_close(lazy.z_loss, eager.z_loss.detach(), rtol=2e-6, atol=0)
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
@pytest.mark.parametrize("threads", [1, 2])  # 2: experts go in pairs (bmm), an odd one alone (mv)
@pytest.mark.parametrize("kernel", [True, False], ids=["native", "torch"])
def test_one_token_inference_matches_reference(case, activation, bias, threads, kernel, monkeypatch):
    """A decode step (one token, no autograd) takes ExpertBank.forward_routed (the native kernel, or
    its own torch path): same outputs as the per-token reference, and the same routed counts and
    losses as the general path."""
    from moekit.moe import native

    monkeypatch.setattr(native, "ENABLED", kernel and native.ENABLED)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the pairing decision reads
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
    calls = []  # the calls of the one-token path: straight from the routing, or routing included
    one_token, with_router = moe.experts.forward_routed, moe._native_inference
    moe.experts.forward_routed = lambda *a: calls.append(1) or one_token(*a)

    def counted_native(*args):
        result = with_router(*args)
        if result is not None:
            calls.append(1)
        return result

    moe._native_inference = counted_native
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


@pytest.mark.parametrize(
    "case",
    [dict(top_k=2), dict(top_k=1, num_experts=9), dict(top_k=3, expert_bias=True), dict(top_k=2, activation="gelu"),
     dict(top_k=2, num_shared_experts=1, shared_gate=True)],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)  # fmt: skip
@pytest.mark.parametrize("one_shot", [False, True], ids=["cpu-gathers", "gpu-gathers"])
def test_gpu_path_matches_reference_when_run_on_the_cpu(case, one_shot, monkeypatch):
    """The GPU's dropless path (sort, torch._grouped_mm over device-side group ends, batched
    combine; ExpertBank.forward_device serves it on CUDA only) forced on the CPU in float32:
    outputs, every gradient and the load statistics match the naive reference, with empty experts
    (9 experts at top-1 leave some without tokens) and biases, and without autograd too; with the
    dispatcher's gathers as the CPU runs them (K at a time) and as a GPU does (all at once)."""
    from moekit.moe import dispatch
    from moekit.moe import experts as experts_module

    monkeypatch.setattr(dispatch, "_one_shot", lambda t: one_shot)  # the GPU's gathers, or the CPU's
    calls = []

    def on_any_device(bank, x_TD, expert_idx_A, weight_A, top_k):
        calls.append(x_TD.shape[0])
        return experts_module.experts_on_device(bank, x_TD, expert_idx_A, weight_A, top_k)

    monkeypatch.setattr(experts_module.ExpertBank, "forward_device", on_any_device)
    torch.manual_seed(23)
    cfg = dict(num_experts=E) | case
    moe = MoE(MoEConfig(dim=D, hidden_dim=HID, **cfg))
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 7, D, requires_grad=True)
    _, info = _compare(moe, x)
    assert calls == [14]
    load = [0.0] * moe.config.num_experts
    for _, e, _, _ in info["assignments"]:
        load[e] += 1
    torch.testing.assert_close(moe(x).stats.tokens_per_expert, torch.tensor(load))
    assert 0.0 in load or case.get("num_experts") != 9
    with torch.no_grad():
        torch.testing.assert_close(
            moe(x[:, :1]).output, reference_moe(moe, x[:, :1])[0], atol=1e-5, rtol=1e-5
        )
    assert calls == [14, 14, 2]
    assert "experts.w_in_EDF" in info["compared_gradients"]
    empty = moe(torch.randn(0, D, requires_grad=True))  # no tokens: the host-planned path's zeros
    assert empty.output.shape == (0, D) and calls == [14, 14, 2, 0]
