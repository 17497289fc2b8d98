"""Large-buffer helpers (moe/memory.py): zeroing by dropping pages must give exact zeros in the
range and leave every byte outside it as it was; huge-page buffers behave as plain tensors."""

import pytest
import torch

from moekit.moe import memory
from moekit.moe.grouped import zero_untouched


@pytest.mark.parametrize("start, length", [(0, 1 << 20), (3, (1 << 20) + 5), (1001, 3 << 20), (7, 100)])
def test_zero_new_buffer_zeros_exactly_its_range(start, length):
    buf = torch.arange(start + length + 4099, dtype=torch.float32)  # every element non-zero but the first
    before = buf.clone()
    memory.zero_new_buffer(buf[start : start + length])
    assert torch.count_nonzero(buf[start : start + length]) == 0
    assert torch.equal(buf[:start], before[:start])
    assert torch.equal(buf[start + length :], before[start + length :])
    buf[start : start + length] += 2.5  # the dropped pages are ordinary memory again
    assert torch.all(buf[start : start + length] == 2.5)


def test_zero_untouched_zeros_only_experts_without_rows():
    grad_E = torch.full((7, 300, 517), 3.0)  # 620 KB per expert: runs of neighbours span pages
    touched = [True, False, False, True, False, True, False]
    zero_untouched(grad_E, touched)
    for e, hit in enumerate(touched):
        assert torch.all(grad_E[e] == (3.0 if hit else 0.0)), e


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_buffer_is_an_ordinary_tensor(dtype):
    like = torch.zeros(3, dtype=dtype)
    t = memory.new_buffer((3, 5 << 20), like)  # large enough for the huge-page advice
    assert t.shape == (3, 5 << 20) and t.dtype == dtype and t.is_contiguous()
    t.fill_(1.5)
    assert t.sum(dtype=torch.float64).item() == 1.5 * t.numel()
    assert memory.new_buffer((4,), like, dtype=torch.float64).dtype == torch.float64


@pytest.mark.skipif(not memory.sys.platform.startswith("linux"), reason="madvise path is Linux only")
def test_linux_takes_the_page_dropping_path():
    buf = torch.ones(3 << 20)
    span = memory._advise(buf[5:], memory._PAGE_BYTES, memory._MADV_DONTNEED, memory.ZERO_PAGES_MIN_BYTES)
    assert span is not None and 0 <= span[0] < memory._PAGE_BYTES and span[1] > span[0]
    assert torch.count_nonzero(buf[5:][span[0] // 4 : span[1] // 4]) == 0  # dropped pages read as zeros
    assert torch.all(buf[:5] == 1)
