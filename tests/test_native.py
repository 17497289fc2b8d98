"""The native expert kernels (moe/native.py, moe/csrc/experts.c) against a float64 loop,
inside the MoE layer against the torch path, and its build: caching, failure, fallback."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from moekit.moe import MoE, MoEConfig, native
from moekit.moe.grouped import GroupPlan

needs_kernel = pytest.mark.skipif(
    native.library() is None, reason="no C compiler, or not Linux x86-64 with AVX2 and FMA"
)


@pytest.fixture(params=["few", "many"])
def regime(request, monkeypatch):
    """Both regimes of the kernel: few rows (the default at these sizes), or many rows (per-thread
    sgemm, taken here for every call, in blocks of at most 16 rows so that groups span blocks)."""
    if request.param == "many":
        if native.blas_sgemm() is None:
            pytest.skip("no usable BLAS sgemm: the many-row regime is off")
        monkeypatch.setattr(native, "MAX_MEAN_ROWS", 0)
        monkeypatch.setattr(native, "BLOCK_BYTES", 1)
    return request.param


def _act64(name: str, gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    """The activations written out from their formulas, float64."""
    sig = lambda v: 1 / (1 + torch.exp(-v))
    if name == "swiglu":
        return gate * sig(gate) * up
    if name == "geglu":
        return 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))) * up
    if name == "gpt_oss":
        g, u = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
        return (u + 1) * g * sig(1.702 * g)
    if name == "relu":
        return gate.clamp(min=0)
    if name == "gelu":
        return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    return gate * sig(gate)  # silu


def _reference(x, token, weight, counts, w_in, w_out, b_in, b_out, act, glu):
    """out[token[n]] += weight[n] * expert_e(x[token[n]]), one row at a time in float64."""
    x, w_in, w_out = x.double(), w_in.double(), w_out.double()
    out = torch.zeros_like(x)
    hidden = w_out.shape[1]
    n = 0
    for e, count in enumerate(counts):
        for _ in range(count):
            h = x[token[n]] @ w_in[e] + (0 if b_in is None else b_in[e].double())
            a = _act64(act, h[:hidden], h[hidden:]) if glu else _act64(act, h, None)
            y = a @ w_out[e] + (0 if b_out is None else b_out[e].double())
            out[token[n]] += float(weight[n]) * y
            n += 1
    return out


def _problem(dim, hidden, counts, tokens, glu, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts, rows = len(counts), sum(counts)
    w_in = torch.randn(experts, dim, (2 if glu else 1) * hidden, generator=gen) / dim**0.5
    w_out = torch.randn(experts, hidden, dim, generator=gen) / hidden**0.5
    b_in = torch.randn(experts, w_in.shape[-1], generator=gen) if bias else None
    b_out = torch.randn(experts, dim, generator=gen) if bias else None
    x = torch.randn(tokens, dim, generator=gen)
    token = torch.randint(0, tokens, (rows,), generator=gen)  # tokens repeat across groups
    weight = torch.rand(rows, generator=gen)
    return x, token, weight, w_in, w_out, b_in, b_out


@needs_kernel
@pytest.mark.parametrize(("act", "glu"), list(native.ACTIVATIONS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("counts", [[2, 0, 70, 1, 5], [2, 0, 70, 1], [3, 4, 0, 1]])
def test_kernel_matches_float64_loop(act, glu, bias, threads, counts, regime):
    # dims off the kernel's 16- and 8-wide column steps and 8-row blocks; a group of 70 rows takes
    # three passes of at most 32; groups of 1-5 rows (up to 4 share each weight load, more go by
    # blocks); an empty expert. 4 or 3 groups on 1, 2 or 3 threads: whole experts per thread and the
    # split of the groups left over (3 threads split 21 hidden units unevenly, 8, 8, 5). Many rows:
    # 78 rows cut into 1-3 ranges mid-group, blocks of 16 rows, tokens repeated across threads'
    # accumulators
    x, token, weight, w_in, w_out, b_in, b_out = _problem(37, 21, counts, 6, glu, bias)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bank = native.Experts(w_in, w_out, b_in, b_out, act, glu)
        out = native.sorted_rows(x, token, weight, GroupPlan.from_counts(counts), bank)
    finally:
        torch.set_num_threads(old)
    ref = _reference(x, token, weight, counts, w_in, w_out, b_in, b_out, act, glu)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_few_row_kernel_built_for_avx2_only_matches_float64_loop(monkeypatch, tmp_path):
    # machines without AVX-512 read the weights for 1-4 rows with AVX2 (one row at a time for one,
    # blocks for more): built here with AVX-512 off, groups of 1-5 rows on 1 and 2 threads
    path = native.build(native.SOURCES, tmp_path, extra_flags=("-mno-avx512f",))
    monkeypatch.setitem(native._state, "lib", native._load(path))
    counts = [1, 2, 0, 3, 4, 5]
    x, token, weight, w_in, w_out, b_in, b_out = _problem(37, 21, counts, 6, True, True)
    bank = native.Experts(w_in, w_out, b_in, b_out, "swiglu", True)
    ref = _reference(x, token, weight, counts, w_in, w_out, b_in, b_out, "swiglu", True)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = native.sorted_rows(x, token, weight, GroupPlan.from_counts(counts), bank)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_kernel_at_layer_size(regime):
    # full 8 x 256 blocks plus tails in both products: dim 520, hidden 300
    counts = [3, 1, 0, 4]
    x, token, weight, w_in, w_out, _, _ = _problem(520, 300, counts, 4, True, False, seed=1)
    bank = native.Experts(w_in, w_out, None, None, "swiglu", True)
    out = native.sorted_rows(x, token, weight, GroupPlan.from_counts(counts), bank)
    ref = _reference(x, token, weight, counts, w_in, w_out, None, None, "swiglu", True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 6), (3, 2)])
def test_routed_sorts_unsorted_and_repeated_experts(bias, tokens, top_k, regime):
    # the routing entry sorts the assignments by expert itself: order and repeats must not matter
    x, _, _, w_in, w_out, b_in, b_out = _problem(40, 24, [1] * 5, tokens, True, bias, seed=2)
    expert_idx = torch.tensor([3, 1, 3, 0, 4, 1])
    weight = torch.tensor([0.5, -1.0, 0.25, 2.0, 0.125, 1.5])
    bank = native.Experts(w_in, w_out, b_in, b_out, "swiglu", True)
    out = native.routed(x, expert_idx, weight, top_k, bank)
    ref = torch.zeros(tokens, 40, dtype=torch.float64)
    for a, (e, w) in enumerate(zip(expert_idx.tolist(), weight.tolist())):
        t = a // top_k
        ref[t] += _reference(x[t : t + 1], [0], [w], [0] * e + [1], w_in, w_out, b_in, b_out, "swiglu", True)[
            0
        ]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_routed_rejects_expert_indices_out_of_range():
    x, _, _, w_in, w_out, _, _ = _problem(16, 8, [1] * 3, 1, True, False)
    bank = native.Experts(w_in, w_out, None, None, "swiglu", True)
    with pytest.raises(ValueError, match=r"expert indices \[3\] are outside \[0, 3\)"):
        native.routed(x, torch.tensor([0, 3]), torch.ones(2), 2, bank)


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 2), (5, 3)])
def test_topk_layer_matches_float64_router_and_experts(bias, renormalize, threads, tokens, top_k):
    # the router in C (logits, softmax, top-k, renormalization) and the experts after it, against
    # the router's formulas in float64 and the float64 loop of the experts
    _check_topk_layer(6, 40, tokens, top_k, bias, renormalize, threads)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("experts", "dim", "tokens"),
    [
        (64, 64, 200),  # routing work past ROUTE_SERIAL_MACS: the tokens routed on the threads;
        # 400 assignments: the sort's arrays on the heap
        (300, 32, 3),  # more experts than the sort keeps on the stack
    ],
)
def test_topk_layer_with_many_tokens_or_experts_matches_float64(threads, experts, dim, tokens):
    _check_topk_layer(experts, dim, tokens, 2, True, True, threads)


def _check_topk_layer(experts, dim, tokens, top_k, bias, renormalize, threads):
    """native.topk_layer on `threads` threads against float64: logits, probabilities, the top-k
    (largest first), their weights and the experts' weighted outputs (a loop)."""
    x, _, _, w_in, w_out, b_in, b_out = _problem(dim, 24, [1] * experts, tokens, True, bias, seed=4)
    gen = torch.Generator().manual_seed(5)
    gate = torch.randn(experts, dim, generator=gen) / dim**0.5
    gate_bias = torch.randn(experts, generator=gen) if bias else None
    bank = native.Experts(w_in, w_out, b_in, b_out, "swiglu", True)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, logits, probs, expert_idx, weight = native.topk_layer(
            x, gate, gate_bias, top_k, renormalize, bank
        )
    finally:
        torch.set_num_threads(old)
    logits64 = x.double() @ gate.double().T + (0 if gate_bias is None else gate_bias.double())
    probs64 = logits64.exp() / logits64.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(logits.double(), logits64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.double(), probs64, rtol=1e-5, atol=1e-7)
    for t in range(tokens):
        order = sorted(range(experts), key=lambda e: -float(probs64[t, e]))[:top_k]  # largest first
        assert expert_idx[t * top_k : (t + 1) * top_k].tolist() == order
        chosen = probs64[t, order]
        expected = chosen / chosen.sum() if renormalize else chosen
        torch.testing.assert_close(
            weight[t * top_k : (t + 1) * top_k].double(), expected, rtol=1e-5, atol=1e-7
        )
    token = [a // top_k for a in range(tokens * top_k)]
    by_expert = sorted(range(tokens * top_k), key=lambda a: int(expert_idx[a]))
    counts = torch.bincount(expert_idx, minlength=experts).tolist()
    ref = _reference(
        x, [token[a] for a in by_expert], weight[by_expert], counts, w_in, w_out, b_in, b_out, "swiglu", True
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_topk_layer_breaks_ties_by_lower_expert_and_reports_non_finite_logits():
    x, _, _, w_in, w_out, _, _ = _problem(16, 8, [1] * 5, 2, True, False)
    bank = native.Experts(w_in, w_out, None, None, "swiglu", True)
    gate = torch.randn(1, 16).expand(5, 16).contiguous()  # every expert scores every token the same
    _, _, probs, expert_idx, weight = native.topk_layer(x, gate, None, 3, False, bank)
    assert expert_idx.tolist() == [0, 1, 2] * 2
    torch.testing.assert_close(weight, torch.full((6,), 0.2))
    torch.testing.assert_close(probs, torch.full((2, 5), 0.2))
    x[1, 3] = float("nan")
    assert native.topk_layer(x, gate, None, 3, False, bank) is None


class _Calls:
    """Calls counted: of the Python entries patched, plus the library's own count of its one-call
    layer (native.topk_layer_calls: the layer's prepared call, whether by the C++ call or ctypes)."""

    def __init__(self):
        self.python: list[int] = []
        self.start = native.topk_layer_calls()

    def __len__(self) -> int:
        return len(self.python) + native.topk_layer_calls() - self.start

    def reset(self) -> None:
        self.python.clear()
        self.start = native.topk_layer_calls()


@pytest.fixture(params=["cpp", "python"])
def call_path(request, monkeypatch):
    """Where a layer's prepared decode-size call checks its guards and calls the kernel: in C++
    (csrc/decode.cpp, native.decode_module) or, where that module cannot be built, in Python and
    ctypes. Set before the layer's first call (a prepared call keeps its path)."""
    if request.param == "cpp" and native.decode_module() is None:
        pytest.skip("the C++ decode call cannot be built here")
    if request.param == "python":
        monkeypatch.setitem(native._state, "decode", None)
    return request.param


def _count_calls(monkeypatch, entries: tuple[str, ...] = ("sorted_rows", "routed")) -> _Calls:
    """Counts the calls of the kernel's entries (by default after a dispatcher and straight from a
    routing) and of the layer's prepared call with the top-k router in it."""
    calls = _Calls()
    for name in entries:
        real = getattr(native, name)

        def counted(*args, _real=real, **kwargs):
            calls.python.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(native, name, counted)
    return calls


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize(
    ("activation", "expert_bias"), [("swiglu", False), ("gelu", True), ("gpt_oss", True)]
)
def test_layer_takes_kernel_at_few_tokens_and_matches_torch(monkeypatch, tokens, activation, expert_bias):
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=48, hidden_dim=40, num_experts=6, top_k=2, activation=activation, expert_bias=expert_bias
    )
    layer = MoE(cfg).eval()
    if expert_bias:
        with torch.no_grad():
            layer.experts.b_in_EF.normal_()
            layer.experts.b_out_ED.normal_()
    x = torch.randn(2, tokens, 48)[:1]  # [1, T, D]
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        fast = layer(x).output
        assert len(calls) == 1
        monkeypatch.setattr(native, "ENABLED", False)
        slow = layer(x).output
    assert len(calls) == 1  # the second call took the torch path
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_layer_prepared_call_follows_the_weights_tokens_and_threads_and_is_dropped_by_copies(
    monkeypatch, call_path
):
    # The layer keeps its native call prepared (native.TopKLayer) between calls: a
    # change of what it was prepared for (weights modified in place or replaced, the token count, the
    # thread count, the dtype) must show in the next output, and a copy or pickle of the layer must
    # not carry it (the copy's weights are other memory)
    import copy
    import pickle

    from tests.moe_reference import reference_moe

    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=5, top_k=2)).eval()
    calls = _count_calls(monkeypatch)

    def check(x, expected_calls):
        with torch.no_grad():
            out = layer(x).output
        ref, _ = reference_moe(layer, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert len(calls) == expected_calls

    x1, x3 = torch.randn(1, 32), torch.randn(3, 32)
    check(x1, 1)
    prepared = layer._native_call
    check(x1, 2)
    assert layer._native_call is prepared  # the same call again: kept
    with torch.no_grad():
        layer.experts.w_out_EFD.mul_(1.5)  # in place: the same memory, read afresh
        layer.router.gate.weight.add_(torch.randn(5, 32))
    check(x1, 3)
    assert layer._native_call is prepared
    layer.experts.w_in_EDF.data = layer.experts.w_in_EDF.data * -1  # new memory: prepared again
    check(x1, 4)
    assert layer._native_call is not prepared
    check(x3, 5)  # another token count
    prepared = layer._native_call
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # another thread count (work size)
    try:
        check(x3, 6)
    finally:
        torch.set_num_threads(threads)
    assert layer._native_call is not prepared  # prepared again for three threads
    calls.reset()
    twin = copy.deepcopy(layer)
    assert "_native_call" in layer.__dict__ and twin.__dict__.get("_native_call") is None
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.__dict__.get("_native_call") is None
    with torch.no_grad():
        twin.experts.w_out_EFD.zero_()  # the copy's own weights: the original's output is unchanged
        torch.testing.assert_close(twin(x3).output, torch.zeros(3, 32))
        torch.testing.assert_close(restored(x3).output, layer(x3).output)
    check(x3, 4)  # (the two copies' calls, the original's, this one)
    layer.double()  # float64: not the kernel's, the torch path answers
    with torch.no_grad():
        out = layer(x3.double()).output
    torch.testing.assert_close(out, reference_moe(layer, x3.double())[0])
    assert len(calls) == 4


@needs_kernel
def test_layer_prepared_call_follows_the_layer_settings(monkeypatch, call_path):
    # the layer keeps its native call only while its settings are the ones it was prepared for: a
    # capacity set in the config afterwards, expert dropout in training, a replaced router or expert
    # bank and a changed top-k must each show in the next output (against the naive reference)
    from tests.moe_reference import reference_moe

    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=5, top_k=2, expert_dropout=0.5)).eval()
    x = torch.randn(4, 32)
    calls = _count_calls(monkeypatch, entries=())  # (with capacity the dispatcher's path has its own)

    def check(expected_calls):
        with torch.no_grad():
            out = layer(x).output
        torch.testing.assert_close(out, reference_moe(layer, x)[0], rtol=1e-5, atol=1e-5)
        assert len(calls) == expected_calls

    check(1)
    layer.config.capacity_factor = 0.5  # 4 tokens x 2 / 5 experts x 0.5: tokens are dropped
    check(1)
    layer.config.capacity_factor = None
    check(2)
    layer.train()  # expert dropout is active: the bank's own path, which applies it
    with torch.no_grad():
        assert not torch.equal(layer(x).output, layer(x).output)
    assert len(calls) == 2
    layer.eval()
    check(3)
    twin = MoE(layer.config)  # another router and bank (other weights), swapped in one at a time
    layer.router = twin.router
    check(4)
    layer.experts = twin.experts.eval()
    check(5)
    layer.router.top_k = 3
    layer.config.top_k = 3  # (the reference reads the config)
    check(6)
    layer.config.norm_topk_prob = False  # a field assigned (the key counts assignments): prepared again
    check(7)


def _layer_with_router_bias(num_experts: int) -> MoE:
    """A small top-2 layer (dim 32) whose router has a random bias, seeded, in eval mode."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=num_experts, top_k=2, router_bias=True)).eval()
    with torch.no_grad():
        layer.router.gate.bias.normal_()
    return layer


@needs_kernel
def test_layer_call_keeps_each_outputs_routing_and_runs_hooks_and_checks(monkeypatch, call_path):
    # A decode-size call leaves its routing in the prepared call's buffers until it is read
    # (native.KernelRouting): an output still held when the next call overwrites them must keep its
    # own routing, statistics and losses; one dropped costs no copy. The layer's call skips
    # nn.Module's dispatch only where that would do nothing: hooks still run, bad input still gets the
    # layer's error, and a bias replaced under the prepared call is read afresh.
    from tests.moe_reference import reference_moe

    layer = _layer_with_router_bias(5)
    calls = _count_calls(monkeypatch)
    copies = []
    real_tensors = native.KernelRouting.tensors
    monkeypatch.setattr(native.KernelRouting, "tensors", lambda self: copies.append(1) or real_tensors(self))
    xs = [torch.randn(2, 32) for _ in range(3)]

    def check(out, x):
        ref, info = reference_moe(layer, x)
        torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-5)
        logits = x.double() @ layer.router.gate.weight.double().T + layer.router.gate.bias.double()
        torch.testing.assert_close(out.router_logits.double(), logits, rtol=1e-5, atol=1e-5)
        counts = torch.zeros(5, dtype=torch.long)
        for _, e, _, _ in info["assignments"]:
            counts[e] += 1
        assert torch.equal(out.stats.routed_per_expert, counts)
        for name in ("load_balance", "z"):  # (the top-k router's losses)
            expected = torch.tensor(float(info["losses"][name]), dtype=torch.float64)
            torch.testing.assert_close(out.losses[name].double(), expected, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        for x in xs:
            layer(x)  # dropped: nothing copied
        assert len(calls) == 3 and copies == []
        held = [layer(x) for x in xs]  # each held while the next call writes the buffers
    assert len(calls) == 6 and len(copies) == 2
    for out, x in zip(held, xs):
        check(out, x)

    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: (args[0] * 2,)),
        layer.register_forward_hook(lambda module, args, out: seen.append(out)),
    ]
    with torch.no_grad():
        hooked = layer(xs[0])
    for handle in handles:
        handle.remove()
    assert len(seen) == 1 and seen[0] is hooked
    check(hooked, xs[0] * 2)  # the pre-hook's input
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(out) if module is layer else None
    )
    with torch.no_grad():
        globally_hooked = layer(xs[1])
    handle.remove()
    assert len(seen) == 2 and seen[1] is globally_hooked

    with torch.no_grad(), pytest.raises(ValueError, match=r"expected \[..., dim=32\]"):
        layer(torch.randn(2, 31))
    layer.router.gate.bias.data = torch.randn(5)  # new memory under the same parameter
    with torch.no_grad():
        check(layer(xs[2]), xs[2])


@needs_kernel
def test_layer_call_outputs_made_a_few_at_a_time_are_each_their_own_tensor(monkeypatch, call_path):
    # The prepared call allocates its outputs a batch at a time: over several batches, every output
    # held keeps its own values (a naive loop's), owns its own memory (no view of a shared block),
    # and writing into one changes no other.
    from tests.moe_reference import reference_moe

    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=5, top_k=2)).eval()
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(native, "OUTPUT_BATCH", 3)
    xs = [torch.randn(2, 32) for _ in range(8)]
    with torch.no_grad():
        outs = [layer(x).output for x in xs]
    assert len(calls) == 8
    assert len({o.data_ptr() for o in outs}) == 8
    for out, x in zip(outs, xs):
        assert out._base is None and out.untyped_storage().nbytes() == 2 * 32 * 4
        torch.testing.assert_close(out, reference_moe(layer, x)[0], rtol=1e-5, atol=1e-5)
    before = [o.clone() for o in outs]
    outs[3].add_(1.0)
    for i, (out, old) in enumerate(zip(outs, before)):
        assert torch.equal(out, old + 1.0 if i == 3 else old)


@needs_kernel
def test_layer_routes_in_the_kernel_unless_the_router_is_hooked_or_the_logits_are_not_finite(
    monkeypatch, call_path
):
    # the router in C stands in for TopKRouter's forward: analysis and calibration hook that forward,
    # so a hooked router runs itself; a NaN in the input reaches the router's own error
    layer = _layer_with_router_bias(4)
    x = torch.randn(3, 32)
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        fused = layer(x)
        assert len(calls) == 1
        seen = []
        handle = layer.router.register_forward_hook(lambda module, args, routing: seen.append(routing))
        hooked = layer(x)
        handle.remove()
    assert len(seen) == 1 and len(calls) == 2  # the router ran, then `routed` after it
    torch.testing.assert_close(fused.output, hooked.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.router_logits, seen[0].logits_TE, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.stats.routed_per_expert, hooked.stats.routed_per_expert)
    x[1, 0] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="router logits contain 4 NaN/Inf"):
        layer(x)


def _prepared_decode_layer() -> tuple[MoE, torch.Tensor]:
    """A small top-2 layer (dim 32, seeded, eval) and a one-token input it has been called on once
    without autograd (its decode-size call prepared)."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=5, top_k=2)).eval()
    x = torch.randn(1, 32)
    with torch.no_grad():
        layer(x)
    return layer, x


@needs_kernel
def test_decode_call_answers_only_for_what_it_was_prepared_for(call_path):
    # The prepared call's guards (native.TopKLayer.holds; in C++ also the layer's direct call): each
    # input or state it was not prepared for turns it away, and the layer's output stays right.
    import threading

    from tests.moe_reference import reference_moe

    layer, x = _prepared_decode_layer()
    call = layer._native_call
    assert (call.fast is not None) == (call_path == "cpp")
    with torch.no_grad():
        assert call.holds(layer, x) and call.holds(layer, torch.nn.Parameter(x, requires_grad=False))
        strided = torch.randn(1, 64)[:, ::2]
        for other in (x.double(), torch.randn(2, 32), strided, torch.randn(1, 33)):
            assert not call.holds(layer, other)
        found = []
        torch.vmap(lambda row: found.append(call.holds(layer, row[None])) or row)(torch.randn(3, 32))
        assert found == [False]  # (vmap's batched tensor is no plain tensor)
        worker = threading.Thread(target=lambda: found.append(call.holds(layer, x)))
        worker.start()
        worker.join()
        assert found == [False, False]  # another thread: other work memory
    assert not call.holds(layer, x)  # autograd on
    with torch.no_grad():
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        try:
            assert not call.holds(layer, x)
        finally:
            torch.set_num_threads(threads)
        assert call.holds(layer, x)
        if call.fast is not None:
            assert call.fast(layer, x) is not None and call.fast(layer, strided) is None
            with pytest.raises(ValueError, match="plain CPU float32 tensor"):
                call.fast.run(x.double())
        layer.experts.w_out_EFD.data = layer.experts.w_out_EFD.data * 2  # new memory
        assert not call.holds(layer, x)
        torch.testing.assert_close(layer(x).output, reference_moe(layer, x)[0], rtol=1e-5, atol=1e-5)
        assert layer._native_call is not call
        call = layer._native_call
        handle = layer.register_forward_hook(lambda module, args, out: None)
        assert not call.holds(layer, x)  # a hook added
        seen = []
        handle.remove()
        handle = layer.register_forward_pre_hook(lambda module, args: seen.append(1))
        out = layer(x)  # prepared again with the hook: not direct
        torch.testing.assert_close(out.output, reference_moe(layer, x)[0], rtol=1e-5, atol=1e-5)
        call = layer._native_call
        assert seen == [1] and call.holds(layer, x)
        if call.fast is not None:
            assert call.fast(layer, x) is None  # the layer's call runs its hooks: not the C++ call's to skip
        layer(x)
        assert seen == [1, 1]
        handle.remove()


@needs_kernel
def test_decode_call_output_is_what_init_makes_and_a_deleted_layer_is_freed(call_path):
    # The C++ call fills the output's slots itself (csrc/decode.cpp): every slot as _NativeOutput's
    # __init__ sets it. The prepared call lives in the layer's __dict__ and names that dict without
    # holding it: a deleted layer (and its weights) is freed at once, not by the garbage collector.
    import gc
    import weakref

    from moekit.moe.layer import MoEOutput, _NativeOutput

    layer, x = _prepared_decode_layer()
    with torch.no_grad():
        out = layer(x)
    assert type(out) is _NativeOutput
    made = _NativeOutput(out.output, layer, x, out._kernel_routing, 2)
    for slot in (*MoEOutput.__slots__, *_NativeOutput.__slots__):
        assert getattr(out, slot) is getattr(made, slot), slot
    assert out._kernel_routing._copied is False and len(out._kernel_routing._tensors) == 4
    gc.disable()
    try:
        freed = weakref.ref(layer.experts.w_in_EDF)
        gone = weakref.ref(layer)
        del layer, out, made
        assert gone() is None and freed() is None
    finally:
        gc.enable()


@needs_kernel
@pytest.mark.parametrize("shared_gate", [False, True])
def test_decode_call_adds_shared_experts_and_reads_losses_like_the_general_path(call_path, shared_gate):
    # The layer's decode-size call with shared experts (added after the routed ones) and the
    # statistics and losses read afterwards, against the reference and the general (autograd) path.
    from tests.moe_reference import reference_moe

    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=32, hidden_dim=24, num_experts=5, top_k=2, num_shared_experts=1, shared_gate=shared_gate
    )
    layer = MoE(cfg).eval()
    calls = native.topk_layer_calls()
    for _ in range(3):
        x = torch.randn(2, 32)
        with torch.no_grad():
            fast = layer(x)
        general = layer(x)
        torch.testing.assert_close(fast.output, reference_moe(layer, x)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.output, general.output.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.aux_loss, general.aux_loss.detach())
        torch.testing.assert_close(fast.z_loss, general.z_loss.detach())
        assert torch.equal(fast.stats.routed_per_expert, general.stats.routed_per_expert)
    assert native.topk_layer_calls() == calls + 3


@needs_kernel
def test_decode_call_from_two_threads_at_once_gives_each_its_own_output(call_path):
    # The C++ call runs the kernel without the GIL: two threads calling one layer at once (each
    # prepares its own call: the work memory is per thread) each get their own input's output.
    import threading

    from tests.moe_reference import reference_moe

    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=5, top_k=2)).eval()
    inputs = [[torch.randn(1, 32) for _ in range(20)] for _ in range(2)]
    outputs: list[list[torch.Tensor]] = [[], []]

    def decode(i: int) -> None:
        with torch.no_grad():
            for x in inputs[i]:
                outputs[i].append(layer(x).output)

    workers = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for xs, outs in zip(inputs, outputs):
        assert len(outs) == len(xs)
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, reference_moe(layer, x)[0], rtol=1e-5, atol=1e-5)


def test_decode_call_checks_its_arguments():
    decode = native.decode_module()
    if decode is None:
        pytest.skip("the C++ decode call cannot be built here")
    args = [0, 0, 1, 4, 1, 0, (), (), (), (), list, native.KernelRouting, (), None]
    decode.Call(*args)
    for i, bad, error, message in [
        (6, ((1, 2, 3),), TypeError, r"same\[0\] must be a \(dict or None, key, value\) tuple"),
        (7, (({}, "1"),), TypeError, r"sizes\[0\] must be a \(dict, int\) tuple"),
        (8, (torch.zeros(1),), ValueError, "tensors and pointers must be tuples of the same length"),
        (11, native.KernelRouting(()), TypeError, "routing must be the routing objects' type"),
        (13, (list, 2), TypeError, "has no object slot output"),
        (13, (list,), TypeError, r"direct must be None or \(the output objects' type, top_k\)"),
    ]:
        with pytest.raises(error, match=message):
            decode.Call(*args[:i], bad, *args[i + 1 :])


def test_decode_call_unbuildable_falls_back_to_python(monkeypatch, tmp_path, caplog):
    # no C++ compiler: the prepared call checks its guards in Python and calls the kernel by ctypes
    if native.library() is None:
        pytest.skip("no native kernel on this machine")
    monkeypatch.delitem(native._state, "decode", raising=False)
    _unbuildable(monkeypatch, tmp_path, caplog, "CXX", native.decode_module)
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=5, top_k=2)).eval()
    x = torch.randn(2, 32)
    calls = native.topk_layer_calls()
    with torch.no_grad():
        out = layer(x).output
    assert layer._native_call.fast is None and native.topk_layer_calls() == calls + 1
    from tests.moe_reference import reference_moe

    torch.testing.assert_close(out, reference_moe(layer, x)[0], rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    "kw",
    [
        dict(expert_capacity=1, capacity_group="sequence"),  # per-sequence capacity drops rows
        dict(capacity_factor=0.5),  # batch-wide capacity
        dict(router="gshard", random_routing=True),  # training-only drops: none in eval
    ],
)
def test_layer_with_drops_or_masks_keeps_them_at_few_tokens(kw):
    # the routed kernel path must not ignore capacity, padding masks or dropped assignments
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2, **kw)).eval()
    x = torch.randn(2, 4, 32)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    for m in (None, mask):
        with torch.no_grad():
            fast = layer(x, mask=m).output
        general = layer(x, mask=m).output.detach()  # autograd on: the dispatch path
        torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_few_row_kernel_not_used_with_autograd_large_groups_other_dtypes_pinned_strategy_or_big_work(
    monkeypatch,
):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2))
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(native, "MANY_ROWS", False)
    # training takes the many-row kernel only (test_layer_training_with_kernel_matches_torch_path):
    # with that regime off, the few-row kernel is never used under autograd
    layer(torch.randn(5, 32)).output.sum().backward()
    with torch.no_grad():
        layer(torch.randn(200, 32))  # 100 rows per expert on average, many-row regime off: torch
        monkeypatch.setattr(native, "MANY_ROWS", True)
        layer.experts.strategy = "loop"
        layer(torch.randn(5, 32))
        layer.experts.strategy = "auto"
        layer.to(torch.float64)(torch.randn(5, 32, dtype=torch.float64))
        monkeypatch.setattr(native, "MAX_WORK_BYTES", 1024)  # more work memory than allowed
        layer.to(torch.float32)(torch.randn(5, 32))
    assert len(calls) == 0
    monkeypatch.setattr(native, "MAX_WORK_BYTES", 64 << 20)
    with torch.no_grad():
        layer(torch.randn(5, 32))
    assert len(calls) == 1


needs_sgemm = pytest.mark.skipif(
    native.library() is None or native.blas_sgemm() is None, reason="no native kernel or no usable BLAS sgemm"
)


@needs_sgemm
@pytest.mark.parametrize("tokens", [40, 300])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("activation", "expert_bias"), [("swiglu", False), ("geglu", True), ("relu", True)])
def test_layer_takes_many_row_kernel_for_batches_and_matches_torch(
    monkeypatch, tokens, threads, activation, expert_bias
):
    # 40 tokens x top-2 over 2 experts: 40 rows per expert (past MAX_MEAN_ROWS); 300 tokens: blocks
    # of 16 rows (BLOCK_BYTES lowered), groups cut between the threads
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=48,
        hidden_dim=40,
        num_experts=2 if tokens == 40 else 6,
        top_k=2,
        activation=activation,
        expert_bias=expert_bias,
    )
    layer = MoE(cfg).eval()
    if expert_bias:
        with torch.no_grad():
            layer.experts.b_in_EF.normal_()
            layer.experts.b_out_ED.normal_()
    monkeypatch.setattr(native, "BLOCK_BYTES", 1)
    x = torch.randn(tokens, 48)
    entries = []  # the sgemm each routed call got: None in the few-row regime
    real = native._routed
    monkeypatch.setattr(native, "_routed", lambda *a: entries.append(a[5]) or real(*a))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            fast = layer(x).output
            monkeypatch.setattr(native, "ENABLED", False)
            slow = layer(x).output
    finally:
        torch.set_num_threads(old)
    assert entries == [native.blas_sgemm()]  # one call, in the many-row regime
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def _act64_autograd(name, h, glu):
    hidden = h.shape[-1] // 2 if glu else h.shape[-1]
    return _act64(name, h[..., :hidden], h[..., hidden:]) if glu else _act64(name, h, None)


@needs_sgemm
@pytest.mark.parametrize(("act", "glu"), list(native.TRAINING_ACTIVATIONS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_training_kernel_gradients_match_float64_autograd(monkeypatch, act, glu, bias, threads):
    # 3 non-empty groups of 70, 41 and 37 rows (an empty expert between), blocks of 16 rows, cut
    # between 1-3 threads mid-group: the shared experts' weight gradients go through the partials;
    # tokens repeat within and across groups
    monkeypatch.setattr(native, "BLOCK_BYTES", 1)
    counts = [70, 0, 41, 37]
    x, token, weight, w_in, w_out, b_in, b_out = _problem(37, 21, counts, 50, glu, bias, seed=3)
    bank = native.Experts(w_in, w_out, b_in, b_out, act, glu)
    plan = GroupPlan.from_counts(counts)
    grad_out = torch.randn(50, 37, generator=torch.Generator().manual_seed(4))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert native.applies_training(x, bank, plan.num_rows, len(plan.bounds))
        h = torch.full((len(token), w_in.shape[-1]), float("nan"))  # every row written
        out = native.sorted_rows(x, token, weight, plan, bank, h)
        grads = {
            "x": torch.zeros_like(x),
            "weight": torch.empty(len(token)),
            "w_in": torch.full_like(w_in, float("nan")),  # written for experts with rows only
            "w_out": torch.full_like(w_out, float("nan")),
            "b_in": torch.zeros_like(b_in) if bias else None,
            "b_out": torch.zeros_like(b_out) if bias else None,
        }
        native.sorted_rows_backward(x, token, weight, plan, bank, h, grad_out, grads)
    finally:
        torch.set_num_threads(old)
    # float64 autograd through the formula, one row at a time
    leaves = {
        k: v.double().requires_grad_(True)
        for k, v in dict(x=x, weight=weight, w_in=w_in, w_out=w_out).items()
    }
    if bias:
        leaves.update(b_in=b_in.double().requires_grad_(True), b_out=b_out.double().requires_grad_(True))
    ref = torch.zeros(50, 37, dtype=torch.float64)
    hs = []
    n = 0
    for e, count in enumerate(counts):
        for _ in range(count):
            hn = leaves["x"][token[n]] @ leaves["w_in"][e] + (leaves["b_in"][e] if bias else 0)
            hs.append(hn)
            y = _act64_autograd(act, hn, glu) @ leaves["w_out"][e] + (leaves["b_out"][e] if bias else 0)
            ref = ref.index_add(0, token[n : n + 1], (leaves["weight"][n] * y)[None])
            n += 1
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), torch.stack(hs).detach(), rtol=1e-5, atol=1e-5)
    ref.backward(grad_out.double())
    for name, leaf in leaves.items():
        got = grads[name].clone()
        if name in ("w_in", "w_out"):
            assert torch.isnan(got[1]).all()  # the empty expert's is left to the caller
            got[1] = 0
        torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-4, atol=1e-4, msg=name)


@needs_sgemm
@pytest.mark.parametrize(
    ("activation", "expert_bias"), [("swiglu", False), ("gelu", True), ("gpt_oss", True)]
)
def test_layer_training_with_kernel_matches_torch_path(monkeypatch, activation, expert_bias):
    # forward + backward of the layer at 200 tokens (100 rows per expert): every gradient, the
    # router's included, equals the torch path's; GPT-OSS's activation takes torch's path
    def grads_of(native_on: bool):
        monkeypatch.setattr(native, "ENABLED", native_on)
        torch.manual_seed(0)
        layer = MoE(
            MoEConfig(
                dim=48, hidden_dim=40, num_experts=4, top_k=2, activation=activation, expert_bias=expert_bias
            )
        )
        if expert_bias:
            with torch.no_grad():
                layer.experts.b_in_EF.normal_()
                layer.experts.b_out_ED.normal_()
        x = torch.randn(2, 100, 48, requires_grad=True)
        out = layer(x)
        (out.output.square().sum() + out.aux_loss).backward()
        return out.output.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}

    calls = []
    real = native.sorted_rows_backward
    monkeypatch.setattr(native, "sorted_rows_backward", lambda *a: calls.append(1) or real(*a))
    fast_out, fast_x, fast = grads_of(True)
    assert len(calls) == (0 if activation == "gpt_oss" else 1)
    slow_out, slow_x, slow = grads_of(False)
    torch.testing.assert_close(fast_out, slow_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_x, slow_x, rtol=1e-4, atol=1e-5)
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-4, msg=name)


@needs_sgemm
def test_sgemm_check_rejects_a_wrong_blas():
    assert native.sgemm_works(native.blas_sgemm())
    # an "sgemm" that writes nothing: the kernel's products are wrong, so the regime must be off
    noop = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)(lambda *args: None)
    assert not native.sgemm_works(ctypes.cast(noop, ctypes.c_void_p).value)


@needs_kernel
def test_many_rows_without_sgemm_takes_torch(monkeypatch):
    monkeypatch.setitem(native._state, "sgemm", None)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2)).eval()
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(200, 32))  # 100 rows per expert: past the few-row regime
        assert len(calls) == 0
        layer(torch.randn(4, 32))  # 2 rows per expert: the few-row regime still runs
    assert len(calls) == 1


@needs_kernel
def test_generation_logits_match_torch_path(monkeypatch):
    from moekit.model import ModelConfig, MoETransformer

    torch.manual_seed(0)
    moe = MoEConfig(dim=64, hidden_dim=48, num_experts=8, top_k=2)
    cfg = ModelConfig(
        vocab_size=97, dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=96, max_seq_len=64, moe=moe
    )
    model = MoETransformer(cfg).eval()
    prompt = torch.randint(0, 97, (1, 5))
    calls = _count_calls(monkeypatch)
    fast = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    assert len(calls) >= 2 * 6  # every decode step's MoE layers
    monkeypatch.setattr(native, "ENABLED", False)
    slow = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    assert torch.equal(fast, slow)


@needs_sgemm
def test_a_fresh_process_can_start_with_a_large_inference_batch():
    # the first kernel call of a process finds the sgemm (under the module's lock), which loads the
    # library: with the decode-size check after it, a non-reentrant lock deadlocked here
    code = (
        "import torch; from moekit.moe import MoE, MoEConfig\n"
        "layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2)).eval()\n"
        "with torch.no_grad(): print(layer(torch.randn(300, 32)).output.shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([300, 32])" in done.stdout


def _unbuildable(monkeypatch, tmp_path, caplog, compiler_env: str, load) -> None:
    """With $`compiler_env` naming no compiler and an empty cache, load() gives None and logs why."""
    monkeypatch.setenv(compiler_env, str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="moekit.moe.native"):
        assert load() is None
    assert "no-such-compiler" in caplog.text


def test_failed_build_reports_the_compilers_last_lines(tmp_path):
    import shutil

    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    source = tmp_path / "broken.c"
    source.write_text("int f(void) { return }\n" * 100)  # an error (and its context) per line
    with pytest.raises(RuntimeError, match="failed to build broken.c") as failed:
        native.build(source, tmp_path / "out")
    lines = str(failed.value).splitlines()
    assert "error" in str(failed.value) and len(lines) == 41  # the first line and the last 40
    assert not list((tmp_path / "out").iterdir())  # nothing half-written left behind


def test_failed_build_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_supported_machine", lambda: True)
    _unbuildable(monkeypatch, tmp_path, caplog, "CC", native.library)
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2)).eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        out = layer(x).output
        monkeypatch.setattr(native, "ENABLED", False)
        torch.testing.assert_close(out, layer(x).output)
    assert not list((tmp_path / "cache").rglob("*.so*"))  # nothing half-written left behind


def test_compiler_error_is_reported(tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("int f( {\n")
    with pytest.raises(RuntimeError, match="failed to build broken.c"):
        native.build(broken, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


@needs_kernel
def test_status_names_the_library(monkeypatch):
    many = "both regimes" if native.blas_sgemm() is not None else "many-row regime off (no usable BLAS sgemm)"
    assert native.status() == f"on ({native.build().name}, {many})"
    monkeypatch.setattr(native, "MANY_ROWS", False)
    assert native.status() == f"on ({native.build().name}, many-row regime off (MOEKIT_NATIVE_MANY=0))"
    monkeypatch.setattr(native, "ENABLED", False)
    assert native.status() == "off (MOEKIT_NATIVE=0)"


@needs_kernel
def test_build_is_cached(tmp_path):
    first = native.build(folder=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(folder=tmp_path) == first
    assert first.stat().st_mtime_ns == stamp  # not compiled again
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


@needs_kernel
def test_unwritable_cache_builds_in_a_private_folder(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder's parent should be: mkdir fails
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(blocked / "cache"))
    built = native.build()
    assert built.exists() and not str(built).startswith(str(blocked))


def test_unsupported_machine_uses_torch(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_supported_machine", lambda: False)
    assert native.library() is None
    assert native.status().startswith("off (no compiler")
    layer = MoE(MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2)).eval()
    with torch.no_grad():
        assert layer(torch.randn(3, 32)).output.shape == (3, 32)


# ------------------------------------------------------------------ attention (csrc/attention.c)


def _attention64(q, k, v, causal, scale):
    """softmax(scale q k^T + causal mask) v in float64, query head h on key/value head h // (H / G)."""
    H, G = q.shape[1], k.shape[1]
    k, v = k.double().repeat_interleave(H // G, dim=1), v.double().repeat_interleave(H // G, dim=1)
    scores = scale * q.double() @ k.transpose(-1, -2)  # [B, H, S, T]
    if causal:
        S, T = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(S, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


@needs_sgemm
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (3, 3)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    ("causal", "rows", "keys"),
    [(True, 1, 1), (True, 130, 130), (False, 1, 1), (False, 130, 130), (False, 70, 45)],
)  # causal attention is self-attention here (S == T); cross-attention (S != T) is not causal
def test_attention_kernel_and_its_backward_match_float64(causal, heads, kv_heads, threads, rows, keys):
    # blocks of 64 query rows with a tail, a causal block reading only its columns, q and v as strided
    # views of [B, S, heads, K] memory (what the model hands over), units cut between 1-3 threads
    gen = torch.Generator().manual_seed(rows + heads)
    B, K, scale = 2, 16, 0.3
    q = torch.randn(B, rows, heads, K, generator=gen).transpose(1, 2)
    k = torch.randn(B, kv_heads, keys, K, generator=gen)
    v = torch.randn(B, keys, kv_heads, K, generator=gen).transpose(1, 2)
    grad = torch.randn(B, heads, rows, K, generator=gen)
    assert native.applies_attention(q, k, v, causal, scale)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = native.attention(q, k, v, causal, scale)
        dq, dk, dv = native.attention_backward(q, k, v, out, lse, grad, causal, scale)
    finally:
        torch.set_num_threads(old)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = _attention64(q64, k64, v64, causal, scale)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for mine, theirs in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-5)


@needs_sgemm
def test_model_attention_takes_the_kernel_only_where_it_applies(monkeypatch):
    # self-attention without a mask tensor, dropout or cache takes the kernel, both ways, with the
    # results of torch's SDPA; a padding mask (a mask tensor) and a decode cache keep SDPA
    from moekit.model import ModelConfig, MoETransformer

    calls = []
    real = native.attention
    monkeypatch.setattr(native, "attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      moe=MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2, causal=True))  # fmt: skip
    model = MoETransformer(cfg)
    tokens = torch.randint(0, 64, (2, 20))
    loss = model(tokens, targets=tokens).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 2  # one per layer
    model.zero_grad()
    monkeypatch.setattr(native, "MANY_ROWS", False)  # the kernel needs the sgemm: off
    slow = model(tokens, targets=tokens).loss
    slow.backward()
    assert len(calls) == 2
    torch.testing.assert_close(loss, slow, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(native, "MANY_ROWS", True)
    with torch.no_grad():
        model(tokens, attention_mask=torch.ones(2, 20, dtype=torch.bool))
        model.generate(tokens[:1, :5], max_new_tokens=3)
    assert len(calls) == 2


@needs_kernel
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize(
    ("m", "n", "k"),
    [
        (1, 1, 1),
        (5, 17, 3),
        (6, 16, 8),
        (13, 47, 70),
        (15, 33, 20),
        (150, 130, 300),
        (64, 2816 // 8, 517),
        (290, 64, 9),
    ],
)
def test_gemm_matches_float64_products(ta, tb, m, n, k):
    # moekit's blocked GEMM (csrc/gemm.c) on every edge: rows and columns past whole tiles (last tiles
    # of 1-5 rows: 1, 5, 13, 15, 64 and 290's last block of 86), k past a
    # slice and short of an 8-wide transpose block, blocks of rows split evenly, row strides wider
    # than the rows, and beta = 0 never reading C (NaN there) against beta = 0.5
    _check_gemm(native.gemm, ta, tb, m, n, k)


def _check_gemm(gemm, ta, tb, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)

    def stored(rows, cols):  # a [rows, cols] view with a row stride of cols + 3
        return torch.randn(rows, cols + 3, generator=gen)[:, :cols]

    a = stored(k, m) if ta else stored(m, k)
    b = stored(n, k) if tb else stored(k, n)
    op_a = (a.T if ta else a).double()
    op_b = (b.T if tb else b).double()
    c = stored(m, n)
    expected = op_a @ op_b + 0.5 * c.double()
    gemm(a, b, c, 0.5, ta, tb)
    torch.testing.assert_close(c.double(), expected, rtol=1e-5, atol=1e-4)
    c.fill_(float("nan"))
    gemm(a, b, c, 0.0, ta, tb)
    torch.testing.assert_close(c.double(), op_a @ op_b, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_gemm_built_for_avx2_only_matches_float64_products(tmp_path):
    # machines without AVX-512 compile the GEMM's AVX2 micro-kernel (6 x 16 tiles, 256-deep slices):
    # built here with AVX-512 off, the same checks as above on a few of their shapes
    import ctypes

    lib = ctypes.CDLL(str(native.build([native.CSRC / "gemm.c"], tmp_path, extra_flags=("-mno-avx512f",))))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moekit_gemm.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        i64,
        i64,
        i64,
        p,
        i64,
        p,
        i64,
        ctypes.c_float,
        p,
        i64,
    ]
    lib.moekit_gemm.restype = ctypes.c_int

    def gemm(a, b, c, beta, ta, tb):
        m, n = c.shape
        k = a.shape[0] if ta else a.shape[1]
        args = (a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), beta, c.data_ptr(), c.stride(0))
        assert lib.moekit_gemm(int(ta), int(tb), m, n, k, *args) == 0

    for ta, tb in ((False, False), (True, False), (False, True), (True, True)):
        for m, n, k in ((5, 17, 3), (13, 47, 270), (150, 130, 300)):
            _check_gemm(gemm, ta, tb, m, n, k)


@needs_kernel
def test_gemm_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="expected op"):
        native.gemm(torch.randn(3, 4), torch.randn(5, 6), torch.empty(3, 6))
    with pytest.raises(ValueError, match="contiguous rows"):
        native.gemm(torch.randn(4, 3).T, torch.randn(4, 6), torch.empty(3, 6))
