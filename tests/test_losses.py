"""Router losses and statistics against hand-computed values, loops and float64 math."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoE
from moekit.moe import losses as L
from tests.moe_reference import ROUTER_CASES, naive_cv_squared, naive_switch_loss, reference_moe


def test_switch_loss_is_exactly_one_at_perfect_balance():
    """Hand-built perfect balance: uniform probabilities and equal counts give exactly 1.0."""
    E, T, k = 4, 8, 2
    probs = torch.full((T, E), 1.0 / E)
    expert_idx = torch.tensor([t * k + j for t in range(T) for j in range(k)]) % E  # 4 assignments each
    counts = L.expert_counts(expert_idx, None, E)
    assert counts.tolist() == [4.0, 4.0, 4.0, 4.0]
    assert L.switch_load_balance_loss(probs, counts).item() == 1.0
    assert L.switch_load_balance_loss(probs, counts, torch.ones(T, dtype=torch.bool)).item() == 1.0


def test_switch_loss_hand_example():
    # E=2, both tokens to expert 0: f = [1, 0], P = [(0.9+0.7)/2, (0.1+0.3)/2] = [0.8, 0.2] -> 2 * 0.8
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    counts = L.expert_counts(torch.tensor([0, 0]), None, 2)
    assert L.switch_load_balance_loss(probs, counts).item() == pytest.approx(1.6)


def test_switch_loss_against_loop_with_mask():
    torch.manual_seed(0)
    T, E, k = 13, 5, 2
    probs = torch.randn(T, E).softmax(-1)
    idx = probs.topk(k).indices
    mask = torch.rand(T) > 0.3
    real_A = mask.repeat_interleave(k)
    counts = L.expert_counts(idx.reshape(-1), real_A, E)
    got = L.switch_load_balance_loss(probs, counts, mask).item()
    want = naive_switch_loss(probs.tolist(), idx.tolist(), mask.tolist())
    assert got == pytest.approx(want, rel=1e-6)


def test_z_loss_against_float64_math():
    torch.manual_seed(1)
    logits = torch.randn(9, 7) * 5
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    total, n = 0.0, 0
    for t, row in enumerate(logits.double().tolist()):
        if mask[t]:
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            total += lse * lse
            n += 1
    assert L.router_z_loss(logits, mask).item() == pytest.approx(total / n, rel=1e-6)


def test_importance_and_load_cv2_against_loop():
    torch.manual_seed(2)
    T, E, k = 11, 4, 2
    idx = torch.randint(0, E, (T * k,))
    w = torch.rand(T * k)
    imp = [0.0] * E
    load = [0.0] * E
    for a in range(T * k):
        imp[int(idx[a])] += float(w[a])
        load[int(idx[a])] += 1
    assert L.importance_loss(w, idx, None, E).item() == pytest.approx(naive_cv_squared(imp), rel=1e-5)
    assert L.load_loss(L.expert_counts(idx, None, E)).item() == pytest.approx(
        naive_cv_squared(load), rel=1e-5
    )


def test_noisy_topk_smooth_load_against_loop():
    """Shazeer's P(x, i) = Phi((clean_i - kth_excluding_i(H)) / std_i) computed token by token, and
    its gradients to the gate and the learned noise weights (what the load loss trains) by autograd."""
    torch.manual_seed(3)
    D, E, k, T = 6, 5, 2, 7
    moe = MoE(D, 8, E, k, router="noisy_topk").train()
    with torch.no_grad():
        moe.router.noise.weight.normal_(0, 0.5)
    x = torch.randn(T, D)
    torch.manual_seed(5)
    noise = torch.randn(T, E)
    torch.manual_seed(5)
    routing = moe.router(x)
    gate_w, noise_w = moe.router.gate.weight, moe.router.noise.weight
    probe = torch.randn(E)
    got = torch.autograd.grad((routing.load_E * probe).sum(), (gate_w, noise_w))
    load = [torch.zeros((), dtype=torch.float64) for _ in range(E)]
    x64 = x.double()
    for t in range(T):
        clean = [gate_w[j].double() @ x64[t] for j in range(E)]
        std = [
            torch.nn.functional.softplus(noise_w[j].double() @ x64[t]) + moe.config.noise_eps
            for j in range(E)
        ]
        H = [clean[j] + float(noise[t, j]) * std[j] for j in range(E)]
        for i in range(E):
            others = sorted((H[j] for j in range(E) if j != i), key=float, reverse=True)
            z = (clean[i] - others[k - 1]) / std[i]  # others[k - 1]: the k-th largest H excluding i
            load[i] = load[i] + 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    load = torch.stack(load)
    want = torch.autograd.grad((load * probe.double()).sum(), (gate_w, noise_w))
    torch.testing.assert_close(routing.load_E, load.float(), atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=1e-4)


def test_sequence_balance_against_loop():
    torch.manual_seed(4)
    B, S, E, k = 3, 6, 4, 2
    probs = torch.randn(B * S, E).softmax(-1)
    idx = probs.topk(k).indices
    mask = torch.rand(B * S) > 0.25
    mask[S : 2 * S] = False  # a sequence of padding only does not count
    token_idx = torch.arange(B * S).repeat_interleave(k)
    got = L.sequence_balance_loss(probs, idx.reshape(-1), token_idx, B, mask).item()
    per_seq = []
    for b in range(B):
        rows = range(b * S, (b + 1) * S)
        if not any(mask[t] for t in rows):
            continue
        sub_probs = [probs[t].tolist() for t in rows]
        sub_idx = [idx[t].tolist() for t in rows]
        per_seq.append(naive_switch_loss(sub_probs, sub_idx, [bool(mask[t]) for t in rows]))
    assert got == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-6)


COEFS = dict(
    load_balance_coef=0.3, z_loss_coef=0.2, importance_coef=0.7, load_coef=0.5, seq_balance_coef=0.11
)


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_layer_losses_match_reference_for_every_router(case):
    """Every loss of a padded call, for every router, against float64 loops over the per-token
    routing of the reference; aux_loss and z_loss are the reference's losses times their coefficients."""
    torch.manual_seed(5)
    moe = MoE(8, 8, 6, **case, **COEFS).eval()
    if moe.router.gate.bias is not None:
        torch.nn.init.normal_(moe.router.gate.bias)
    if case["router"] == "sigmoid_bias":
        moe.router.expert_bias.copy_(torch.randn(6) * 0.1)
    x = torch.randn(3, 7, 8) * 2
    mask = torch.rand(3, 7) > 0.3
    mask[0, 0], mask[1] = True, False  # a sequence of padding only drops out of the sequence mean
    out = moe(x, mask=mask)
    _, info = reference_moe(moe, x, mask)
    want = info["losses"]
    assert set(out.losses) == set(want)
    for name, value in want.items():
        assert out.losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-7), name
    want_aux = sum(
        COEFS[f"{name}_coef"] * want[name] for name in ("load_balance", "importance", "load", "seq_balance")
    )
    assert out.aux_loss.item() == pytest.approx(want_aux, rel=1e-5)
    assert out.z_loss.item() == pytest.approx(COEFS["z_loss_coef"] * want["z"], rel=1e-5)


def test_stats_against_direct_counts():
    torch.manual_seed(6)
    E = 4
    moe = MoE(8, 8, E, 1, capacity_factor=1.0).eval()
    with torch.no_grad():
        moe.router.gate.weight.mul_(6)
    x = torch.randn(24, 8)
    out = moe(x)
    probs = moe.router(x).probs_TE
    chosen = probs.argmax(-1).tolist()
    routed = [chosen.count(e) for e in range(E)]
    kept = [min(c, 6) for c in routed]  # C = ceil(1.0 * 24 / 4) = 6
    assert out.stats.routed_per_expert.tolist() == routed
    assert out.stats.tokens_per_expert.tolist() == kept
    assert out.stats.dropped_fraction.item() == pytest.approx(1 - sum(kept) / 24)
    assert out.stats.max_load_violation.item() == pytest.approx(max(routed) / (24 / E) - 1)
    ent = sum(-sum(p * math.log(p) for p in row) for row in probs.tolist()) / 24
    assert out.stats.router_entropy.item() == pytest.approx(ent, rel=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_counts_by_scatter_match_a_loop(weighted):
    """The sync-free counts used off the CPU (a scatter-add) and the CPU's bincount both equal a
    plain loop, with and without weights, empty bins included."""
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 7, (50,), generator=g)
    index[index == 4] = 5  # bin 4 stays empty
    weights = torch.rand(50, generator=g) if weighted else None
    expected = [0.0] * 9
    for i, v in enumerate(index.tolist()):
        expected[v] += 1.0 if weights is None else float(weights[i])
    for got in (L.scatter_counts(index, weights, 9), L.counts(index, weights, 9)):
        assert got.dtype == torch.float32 and got.shape == (9,)
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-6)
