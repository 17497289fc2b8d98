"""Grouped products: every strategy against a per-row loop, forward and backward; row blocks."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.moe import grouped
from moekit.moe.grouped import GroupPlan, grouped_mm, pick_strategy

STRATEGIES = ["auto", "loop", "bmm", "pairs", "grouped_mm"]


def _loop_reference(x, w, counts):
    rows, start = [], 0
    for e, c in enumerate(counts):
        for r in range(start, start + c):
            rows.append(x[r] @ w[e])
        start += c
    return torch.stack(rows) if rows else x.new_zeros(0, w.shape[-1])


def _check(counts, strategy, dtype, dims=(16, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    num_experts, num_rows = len(counts), sum(counts)
    x = torch.randn(num_rows, dims[0], generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(num_experts, *dims, generator=g, dtype=dtype, requires_grad=True)
    y = grouped_mm(x, w, counts, strategy)
    ref = _loop_reference(x, w, counts)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, ref, **tol)
    probe = torch.randn(num_rows, dims[1], generator=g, dtype=dtype)
    gx, gw = torch.autograd.grad((y * probe).sum(), (x, w))
    if num_rows:
        rx, rw = torch.autograd.grad((ref * probe).sum(), (x, w), allow_unused=True)
        torch.testing.assert_close(gx, rx, **tol)
        torch.testing.assert_close(gw, rw if rw is not None else torch.zeros_like(w), **tol)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(gw[e], torch.zeros_like(gw[e]))  # exact zeros, never a stale buffer


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [4, 4, 4], [0, 0, 2], [0, 0, 0], [7]])
def test_every_strategy_matches_loop(strategy, dtype, counts):
    _check(counts, strategy, dtype)


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=7),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 1000),
)
def test_strategies_property(counts, strategy, seed):
    _check(counts, strategy, torch.float32, seed=seed)


@contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_pairs_with_padding_matches_loop():
    """Unequal pairs are zero-padded only for weights of >= PAIR_PAD_MIN_BYTES: force it at test size."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouped, "PAIR_PAD_MIN_BYTES", 0)
        for counts in ([3, 0, 5, 1], [1, 2, 0, 1, 1, 3, 1, 2, 1, 0], [2, 9], [0, 1, 4, 4, 6]):
            _check(counts, "pairs", torch.float32)
            _check(counts, "pairs", torch.float64)


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=9), seed=st.integers(0, 1000))
def test_pairs_with_padding_property(counts, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouped, "PAIR_PAD_MIN_BYTES", 0)
        _check(counts, "pairs", torch.float32, seed=seed)


def test_pairs_view_two_experts_without_copies():
    w = torch.randn(6, 4, 3)
    pair = grouped.expert_pair(w, 1, 4)
    assert pair.data_ptr() == w[1].data_ptr() and torch.equal(pair[1], w[4])
    assert torch.equal(grouped.expert_pair(w.transpose(1, 2), 0, 5)[1], w[5].t())


def test_strategy_choice():
    x, w = torch.randn(8, 16), torch.randn(2, 16, 8)
    uniform, ragged = GroupPlan.from_counts([4, 4]), GroupPlan.from_counts([5, 3])
    large = GroupPlan.from_counts([150, 90])
    tiny = GroupPlan.from_counts([1, 2, 0, 1, 1, 3, 1, 2, 1, 0])  # decoding: many experts, few rows
    x_tiny, w_many = torch.randn(12, 16), torch.randn(10, 16, 8)
    ones = GroupPlan.from_counts([1, 1, 0, 1, 0, 0, 0, 0, 0, 0])  # one token: one row per expert
    for threads in (1, 2):
        with _threads(threads):
            assert pick_strategy("auto", uniform, x, w) == "bmm"
            assert pick_strategy("auto", large, torch.randn(240, 16), w) == "loop"
            assert pick_strategy("auto", GroupPlan.from_counts([0, 8]), x, w) == "loop"  # one group: one mm
            assert pick_strategy("bmm", ragged, x, w) == "loop"  # bmm needs equal groups
            assert pick_strategy("pairs", ragged, x, w.double()) == "loop"  # bmm needs one dtype
    with _threads(2):  # small groups: two at a time, one bmm each, so both threads work
        for plan, x_in, w_in in ((ragged, x, w), (tiny, x_tiny, w_many), (ones, torch.randn(3, 16), w_many)):
            assert pick_strategy("auto", plan, x_in, w_in) == "pairs"
        assert pick_strategy("auto", tiny, x_tiny.double(), w_many.double()) == "pairs"
    with _threads(1):  # one thread: _grouped_mm for small groups (one call), mv for one-row groups
        assert pick_strategy("auto", ragged, x, w) == "grouped_mm"
        assert pick_strategy("auto", tiny, x_tiny, w_many) == "grouped_mm"
        assert pick_strategy("auto", ones, torch.randn(3, 16), w_many) == "loop"  # matrix-vector products
        assert pick_strategy("auto", tiny, x_tiny.double(), w_many.double()) == "loop"
    assert pick_strategy("grouped_mm", ragged, x, w) == "grouped_mm"
    assert pick_strategy("grouped_mm", ragged, x.double(), w.double()) == "loop"  # fp32/bf16/fp16 only
    odd = torch.randn(8, 3)  # 12-byte rows break the 16-byte stride rule
    assert pick_strategy("grouped_mm", ragged, odd, torch.randn(2, 3, 8)) == "loop"
    with pytest.raises(ValueError, match="unknown strategy"):
        grouped_mm(x, w, [4, 4], "fastest")


def test_counts_validated():
    with pytest.raises(ValueError, match="rows but x has"):
        grouped_mm(torch.randn(3, 4), torch.randn(2, 4, 5), [2, 2])
    with pytest.raises(ValueError, match="group counts"):
        grouped_mm(torch.randn(3, 4), torch.randn(2, 4, 5), [3])


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=10), max_rows=st.integers(1, 25))
def test_row_blocks_cover_every_row_once(counts, max_rows):
    plan = GroupPlan.from_counts(counts)
    blocks = plan.blocks(max_rows)
    covered = []
    for start, end, block in blocks:
        assert 0 < end - start <= max_rows
        assert block.num_rows == end - start and len(block.counts) == len(counts)
        for e, s, t in block.bounds:  # local bounds map back onto expert e's global rows
            covered += [(e, start + r) for r in range(s, t)]
    want = [(e, r) for e, s, t in plan.bounds for r in range(s, t)]
    assert covered == want
    assert [b[0] for b in blocks] == sorted(b[0] for b in blocks)


def test_grouped_mm_without_a_kernel_falls_back_to_the_loop(monkeypatch):
    """A device/dtype where torch._grouped_mm raises (a GPU it has no kernel for) gets the loop's
    results, and the next calls go straight to the loop."""
    from moekit.moe import grouped

    calls = []

    def no_kernel(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("grouped gemm is not supported on this device")

    monkeypatch.setattr(grouped, "_GROUPED_MM_UNSUPPORTED", set())
    monkeypatch.setattr(grouped, "_GROUPED_MM_WORKS", set())
    monkeypatch.setattr(torch, "_grouped_mm", no_kernel)
    counts = [3, 0, 5, 1]
    _check(counts, "grouped_mm", torch.float32)  # forward and backward against the per-row loop
    unsupported = grouped._GROUPED_MM_UNSUPPORTED
    assert len(calls) == 1 and unsupported == {("cpu", torch.float32)}
    plan = GroupPlan.from_counts(counts)
    assert pick_strategy("grouped_mm", plan, torch.randn(9, 16), torch.randn(4, 16, 8)) == "loop"


def test_grouped_mm_errors_where_it_has_run_or_out_of_memory_are_raised(monkeypatch):
    """Only a first failure on a device and dtype reads as "no kernel" (the loop from then on): an
    error where torch._grouped_mm has run before, or running out of memory, is the caller's."""
    real = torch._grouped_mm
    monkeypatch.setattr(grouped, "_GROUPED_MM_UNSUPPORTED", set())
    monkeypatch.setattr(grouped, "_GROUPED_MM_WORKS", set())
    x, w = torch.randn(9, 16), torch.randn(4, 16, 8)
    offs = torch.tensor([3, 3, 8, 9], dtype=torch.int32)
    y = grouped.grouped_mm_on_device(x, w, offs)
    torch.testing.assert_close(y[3:8], x[3:8] @ w[2])
    assert ("cpu", torch.float32) in grouped._GROUPED_MM_WORKS and len(grouped._GROUPED_MM_WORKS) == 1

    def broken(*args, **kwargs):
        raise RuntimeError("an error after it worked")

    monkeypatch.setattr(torch, "_grouped_mm", broken)
    with pytest.raises(RuntimeError, match="after it worked"):
        grouped.grouped_mm_on_device(x, w, offs)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(grouped, "_GROUPED_MM_WORKS", set())
    monkeypatch.setattr(torch, "_grouped_mm", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        grouped.grouped_mm_on_device(x, w, offs)
    assert not grouped._GROUPED_MM_UNSUPPORTED
    monkeypatch.setattr(torch, "_grouped_mm", real)
