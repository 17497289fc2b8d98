"""Property tests of slot assignment, dispatch and combine over random T, E, k and capacity factors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.moe import LocalDispatcher, MoEConfig, assign_slots, grouped_mm, priority_order
from moekit.moe.router import Routing


def _routing(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    probs = logits.softmax(-1)
    w, idx = probs.topk(k)
    return Routing(logits, probs, idx.reshape(-1), w.reshape(-1), k)


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 40),
    E=st.integers(1, 9),
    k_frac=st.floats(0, 1),
    cf=st.one_of(st.none(), st.floats(0.1, 3.0)),
    min_capacity=st.integers(0, 6),
    policy=st.sampled_from(["position", "probability"]),
    seed=st.integers(0, 10_000),
)
def test_slot_assignment_properties(T, E, k_frac, cf, min_capacity, policy, seed):
    k = max(1, min(E, 1 + int(k_frac * E)))
    routing = _routing(T, E, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    valid = torch.rand(T * k, generator=g) > 0.2
    cfg = MoEConfig(
        dim=1, hidden_dim=1, num_experts=E, top_k=k, capacity_factor=cf, min_capacity=min_capacity
    )
    capacity = cfg.capacity(T * k, True)
    order = priority_order(routing, policy) if capacity is not None else None
    slots = assign_slots(routing.expert_idx_A, valid, E, capacity, order)
    perm = slots.perm_N.tolist()

    # every kept assignment is computed exactly once, and only valid ones are kept
    assert len(perm) == len(set(perm))
    assert all(bool(valid[a]) for a in perm)
    # rows are grouped by expert in order and counts describe the groups
    experts = [int(routing.expert_idx_A[a]) for a in perm]
    assert experts == sorted(experts)
    assert slots.counts == [experts.count(e) for e in range(E)]
    # dropped counts follow the capacity rule
    routed = [sum(1 for a in range(T * k) if valid[a] and routing.expert_idx_A[a] == e) for e in range(E)]
    assert slots.routed_E.tolist() == routed
    if capacity is None:
        assert slots.counts == routed
    else:
        assert capacity == max(1, min_capacity, math.ceil(cf * T * k / E))
        assert slots.counts == [min(r, capacity) for r in routed]
        # the kept ones are the first in priority order within each expert (naive greedy)
        used = [0] * E
        want = set()
        for a in order.tolist():
            e = int(routing.expert_idx_A[a])
            if valid[a] and used[e] < capacity:
                used[e] += 1
                want.add(a)
        assert set(perm) == want


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 30), E=st.integers(1, 8), k_frac=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_permutation_and_inverse_compose_to_identity(T, E, k_frac, seed):
    """The sort permutation (row -> assignment) and its inverse (assignment -> row) compose to the
    identity both ways; the sorted rows are the token copies; combine with unit weights and identity
    experts returns every token k times."""
    k = max(1, min(E, 1 + int(k_frac * E)))
    routing = _routing(T, E, k, seed)
    routing.weight_A = torch.ones_like(routing.weight_A)
    x = torch.randn(T, 5, generator=torch.Generator().manual_seed(seed))
    dispatcher = LocalDispatcher()
    x_ND, counts, state = dispatcher.dispatch(x, routing, None, None, None, E)
    assert sum(counts) == T * k
    perm_N, row_A = state.perm_N, state.row_A  # [N] assignment of each row, [A] row of each assignment
    arange = torch.arange(T * k)
    assert torch.equal(perm_N[row_A], arange) and torch.equal(row_A[perm_N], arange)
    for n in range(T * k):  # row n holds the token of assignment perm_N[n], grouped by expert
        a = int(perm_N[n])
        assert torch.equal(x_ND[n], x[a // k])
    experts = routing.expert_idx_A[perm_N].tolist()
    assert experts == sorted(experts)
    torch.testing.assert_close(dispatcher.combine(x_ND, state), k * x)


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_grouped_mm_against_loop(counts, seed):
    g = torch.Generator().manual_seed(seed)
    E, N = len(counts), sum(counts)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = grouped_mm(x, w, counts)
    rows, start = [], 0
    for e, c in enumerate(counts):
        for r in range(start, start + c):
            rows.append(x[r] @ w[e])
        start += c
    ref = torch.stack(rows) if rows else x.new_zeros(0, 4)
    torch.testing.assert_close(y, ref)
    probe = torch.randn(N, 4, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad((y * probe).sum(), (x, w))
    if rows:
        rx, rw = torch.autograd.grad((ref * probe).sum(), (x, w), allow_unused=True)
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gw, rw if rw is not None else torch.zeros_like(w))
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(gw[e], torch.zeros_like(gw[e]))  # empty experts get exact zeros


def _general_dispatch_combine(x, routing, E):
    """The scatter-add path (what capacity and expert choice use), as the reference for the fast one."""
    slots = assign_slots(routing.expert_idx_A, None, E, None, None)
    token_N = routing.token_index()[slots.perm_N]
    y_ND = x[token_N] * 2.0 + 1.0  # a stand-in expert
    weighted = y_ND * routing.weight_A[slots.perm_N][:, None]
    return x.new_zeros(x.shape).index_add(0, token_N, weighted)


@pytest.mark.parametrize("T,E,k,D", [(7, 5, 2, 6), (3, 4, 4, 3), (0, 3, 2, 4), (40, 6, 3, 300)])
def test_fast_dispatch_combine_matches_scatter_add(T, E, k, D):
    """Dropless token-major routing takes the gather/bmm path; values and gradients match index_add.

    (40, 6, 3, 300) is above the small-combine threshold (bmm), the others below (multiply-adds).
    """
    routing = _routing(T, E, k, seed=T + E)
    weights = routing.weight_A.detach().clone().requires_grad_(True)
    routing.weight_A = weights
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    dispatcher = LocalDispatcher()
    x_ND, counts, state = dispatcher.dispatch(x, routing, None, None, None, E)
    assert state.row_A is not None and state.top_k == k
    out = dispatcher.combine(x_ND * 2.0 + 1.0, state)
    ref = _general_dispatch_combine(x, routing, E)
    torch.testing.assert_close(out, ref)
    probe = torch.randn(T, D, dtype=torch.float64)
    if T:
        fast = torch.autograd.grad((out * probe).sum(), (x, weights))
        slow = torch.autograd.grad((ref * probe).sum(), (x, weights))
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a, b)


def test_fast_dispatch_combine_gradcheck():
    routing = _routing(6, 4, 2, seed=3)
    dispatcher = LocalDispatcher()

    def f(x, w):
        routing.weight_A = w
        x_ND, _, state = dispatcher.dispatch(x, routing, None, None, None, 4)
        return dispatcher.combine(x_ND.sin(), state)

    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = routing.weight_A.double().detach().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, w))


def test_general_path_when_assignments_drop():
    """With capacity drops (N < A) the state has no inverse permutation and combine scatter-adds."""
    routing = _routing(12, 3, 2, seed=5)
    x = torch.randn(12, 4)
    x_ND, counts, state = LocalDispatcher().dispatch(x, routing, None, 2, None, 3)
    assert sum(counts) < 24 and state.row_A is None
    assert LocalDispatcher().combine(x_ND, state).shape == (12, 4)
