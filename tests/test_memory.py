"""Large-buffer helpers (moe/memory.py): zeroing by dropping pages must give exact zeros in the
range and leave every byte outside it as it was; huge-page buffers behave as plain tensors."""

import pytest
import torch

from moekit.moe import memory
from moekit.moe.grouped import zero_untouched

BIG = memory.MADVISE_MIN_BYTES // 4 + 4099  # float32 elements: large enough for the page path


@pytest.mark.parametrize("start, end", [(0, BIG), (3, BIG - 5), (1001, (3 << 20) + 1001), (7, 107)])
def test_zero_new_buffer_zeros_exactly_its_range(start, end):
    buf = torch.arange(BIG, dtype=torch.float32) + 1  # every element non-zero
    before = buf.clone()
    memory.zero_new_buffer(buf, start, end)
    assert torch.count_nonzero(buf[start:end]) == 0
    assert torch.equal(buf[:start], before[:start])
    assert torch.equal(buf[end:], before[end:])
    buf[start:end] += 2.5  # the dropped pages are ordinary memory again
    assert torch.all(buf[start:end] == 2.5)


@pytest.mark.parametrize("per_expert", [300 * 517, BIG // 7])  # below and above MADVISE_MIN_BYTES
def test_zero_untouched_zeros_only_experts_without_rows(per_expert):
    grad_E = torch.full((7, per_expert), 3.0)
    touched = [True, False, False, True, False, True, False]
    zero_untouched(grad_E, touched)
    for e, hit in enumerate(touched):
        assert torch.all(grad_E[e] == (3.0 if hit else 0.0)), e


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_buffer_is_an_ordinary_tensor(dtype):
    like = torch.zeros(3, dtype=dtype)
    t = memory.new_buffer((3, memory.MADVISE_MIN_BYTES // 4), like)  # large enough for the advice
    assert t.shape == (3, memory.MADVISE_MIN_BYTES // 4) and t.dtype == dtype and t.is_contiguous()
    t.fill_(1.5)
    assert t.sum(dtype=torch.float64).item() == 1.5 * t.numel()
    assert memory.new_buffer((4,), like, dtype=torch.float64).dtype == torch.float64


@pytest.mark.skipif(not memory.sys.platform.startswith("linux"), reason="madvise path is Linux only")
def test_linux_takes_the_page_dropping_path():
    buf = torch.ones(BIG)
    part = buf[5:]
    span = memory._advise(buf, part, memory._PAGE_BYTES, memory._MADV_DONTNEED)
    assert span is not None and 0 <= span[0] < memory._PAGE_BYTES and span[1] > span[0]
    assert torch.count_nonzero(part[span[0] // 4 : span[1] // 4]) == 0  # dropped pages read as zeros
    assert torch.all(buf[:5] == 1)
    assert memory._advise(buf[:1000].clone(), part, memory._PAGE_BYTES, memory._MADV_DONTNEED) is None


def test_scratch_reuses_per_slot_and_thread():
    like = torch.zeros(1)
    memory.release_scratch()
    a, b = memory.scratch(like, (4, 8), (3,))
    assert a.shape == (4, 8) and b.shape == (3,) and a.dtype == like.dtype
    a2, b2 = memory.scratch(like, (2, 8), (3,))  # smaller: the same memory again
    assert a2.data_ptr() == a.data_ptr() and b2.data_ptr() == b.data_ptr()
    (big,) = memory.scratch(like, (100, 8))  # larger: slot 0 grows
    assert big.shape == (100, 8) and big.numel() == 800
    (d,) = memory.scratch(torch.zeros(1, dtype=torch.float64), (4, 8))  # other dtype: its own
    assert d.dtype == torch.float64 and d.data_ptr() != big.data_ptr()
    import threading

    ptrs = []
    worker = threading.Thread(target=lambda: ptrs.append(memory.scratch(like, (100, 8))[0].data_ptr()))
    worker.start()
    worker.join()
    assert ptrs[0] != big.data_ptr()  # another thread never shares a workspace
    memory.release_scratch()


def test_scratch_first_asked_for_under_inference_mode_is_writable_by_training():
    """generate runs under inference mode; the fused experts' workspace it creates is used again by
    the next training step, which writes it in place: it must not be an inference tensor."""
    memory.release_scratch()
    like = torch.zeros(3)
    with torch.inference_mode():
        (first,) = memory.scratch(like, (4, 5), pool="test")
        first.fill_(1.0)
    (again,) = memory.scratch(like, (4, 5), pool="test")
    assert not again.is_inference() and again.data_ptr() == first.data_ptr()
    again.fill_(2.0)  # an inference tensor raises here outside inference mode
    assert bool((again == 2.0).all())
    memory.release_scratch()


def test_gradient_buffers_are_reused_only_when_nothing_holds_them():
    """A backward after `zero_grad(set_to_none=True)` writes the experts' gradients into the memory
    of the previous ones; while anything holds that memory (.grad, a reference, a view) it gets new
    memory. Gradients are the same either way (checked against a fresh layer with the same weights)."""
    from moekit.moe import MoE

    torch.manual_seed(0)
    moe = MoE(dim=16, hidden_dim=24, num_experts=8, top_k=2)
    twin = MoE(dim=16, hidden_dim=24, num_experts=8, top_k=2)
    twin.load_state_dict(moe.state_dict())
    w = moe.experts.w_in_EDF
    held = []  # the twin's old gradients stay referenced, so it always computes into new memory

    def step(seed):
        g = torch.Generator().manual_seed(seed)
        x, grad = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
        moe(x).output.backward(grad)
        held.append([p.grad for p in twin.parameters()])
        twin.zero_grad(set_to_none=True)
        twin(x).output.backward(grad)
        for (name, p), q in zip(moe.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), name
        return w.grad

    first = step(0)
    ptr = first.data_ptr()
    kept = first  # a reference of the caller's: the next step must not write there
    before = kept.clone()
    moe.zero_grad(set_to_none=True)
    second = step(1)
    assert second.data_ptr() != ptr and torch.equal(kept, before)
    del kept, first, before
    moe.zero_grad(set_to_none=True)
    ptr = second.data_ptr()
    del second
    third = step(2)  # nothing holds the last buffer: its memory again, exact zeros where untouched
    assert third.data_ptr() == ptr
    view = third.view(-1)
    moe.zero_grad(set_to_none=True)
    del third
    assert step(3).data_ptr() != ptr and view.data_ptr() == ptr  # a view holds it
    del view
    moe.experts.zero_grad(set_to_none=False)  # accumulation: .grad stays, gradients add up
    acc_before = w.grad.clone()
    g = torch.Generator().manual_seed(4)
    x, grad = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    moe(x).output.backward(grad)
    twin.zero_grad(set_to_none=True)
    twin(x).output.backward(grad)
    torch.testing.assert_close(w.grad, acc_before + twin.experts.w_in_EDF.grad)


def test_gradient_buffer_entries_go_with_their_weight():
    weight = torch.nn.Parameter(torch.ones(4, 4))
    buf, reused = memory.gradient_buffer(weight)
    key = (id(weight), "grad")
    assert not reused and key in memory._kept_storages
    del weight, buf
    assert key not in memory._kept_storages


@pytest.mark.parametrize("native_on", [True, False])
def test_saved_hidden_memory_is_reused_only_once_the_backward_freed_it(monkeypatch, native_on):
    # 100 tokens x top-2 over 4 experts (50 rows each: the native many-row kernel where it runs):
    # the pre-activation hidden saved for the backward comes from kept memory; a graph still alive
    # keeps its own, and its backward gives the gradients of a twin run one step at a time
    from moekit.moe import MoE, native

    monkeypatch.setattr(native, "ENABLED", native_on)
    torch.manual_seed(0)
    moe = MoE(dim=16, hidden_dim=12, num_experts=4, top_k=2)
    twin = MoE(dim=16, hidden_dim=12, num_experts=4, top_k=2)
    twin.load_state_dict(moe.state_dict())
    key = (id(moe.experts.w_in_EDF), "hidden")
    x1, x2, grad = torch.randn(100, 16), torch.randn(100, 16), torch.randn(100, 16)
    moe(x1).output.backward(grad)
    ptr = memory._kept_storages[key][1].data_ptr()
    moe(x2).output.backward(grad)  # the first step's hidden was freed by its backward: reused
    assert memory._kept_storages[key][1].data_ptr() == ptr
    moe.zero_grad(set_to_none=True)
    out1 = moe(x1).output  # holds the kept hidden until its backward
    out2 = moe(x2).output  # so this one gets new memory
    assert memory._kept_storages[key][1].data_ptr() != ptr
    out1.backward(grad)
    out2.backward(grad)
    for xi in (x1, x2):
        twin(xi).output.backward(grad)
    for (name, p), q in zip(moe.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
