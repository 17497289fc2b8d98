"""Large CPU buffers without the kernel's per-page costs.

A fresh CPU tensor larger than glibc's mmap threshold (32 MiB at most) is new memory every time:
the kernel maps and zeroes each 4 KiB page on its first touch, one page fault per page. For the
buffers an MoE layer allocates per step (the experts' weight gradients, the saved hidden
activations) that costs as much as the arithmetic at decode-size batches: writing a fresh 69 MB
buffer took 20 ms here where rewriting it took 3 ms. Two remedies, both Linux madvise(2) calls on
memory this process allocated itself, which for torch's CPU allocator is private anonymous memory:

  - `new_buffer` asks for transparent huge pages (MADV_HUGEPAGE) on a large buffer's 2 MiB
    aligned interior: one fault per 2 MiB instead of per 4 KiB (the machine's THP setting must be
    "madvise" or "always"; with "never" the advice is a no-op). The same advice torch gives every
    allocation when started with THP_MEM_ALLOC_ENABLE=1, here only for our large buffers;
  - `zero_new_buffer` zeroes a fresh buffer by handing its whole pages back to the kernel
    (MADV_DONTNEED): they then read as zeros without being written. The weight gradient of an
    expert that received no rows is such a buffer (most experts of a layer at decode sizes).

Elsewhere (other systems, other devices, small tensors, a failing call) both fall back to the
plain torch behaviour. MOEKIT_HUGE_PAGES=0 in the environment turns the huge-page advice off.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch
from torch import Tensor

_MADV_DONTNEED, _MADV_HUGEPAGE = 4, 14
_PAGE_BYTES, _HUGE_PAGE_BYTES = mmap.PAGESIZE, 2 << 20
ZERO_PAGES_MIN_BYTES = 1 << 20  # below this a plain fill is as fast as the system call
HUGE_PAGES_MIN_BYTES = 4 << 20  # at least one whole aligned huge page inside
HUGE_PAGES = os.environ.get("MOEKIT_HUGE_PAGES", "1") != "0"


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def _advise(t: Tensor, align: int, advice: int, min_bytes: int) -> tuple[int, int] | None:
    """madvise the `align`-aligned interior [lo, hi) of t's bytes; (lo, hi) as offsets into t, or
    None where it does not apply or the call failed."""
    nbytes = t.numel() * t.element_size()
    if _madvise is None or t.device.type != "cpu" or not t.is_contiguous() or nbytes < min_bytes:
        return None
    start = t.data_ptr()
    lo = -(-start // align) * align
    hi = (start + nbytes) // align * align
    if hi <= lo or _madvise(lo, hi - lo, advice) != 0:
        return None
    return lo - start, hi - start


def new_buffer(shape: tuple[int, ...] | torch.Size, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """torch.empty(shape) on `like`'s device (and dtype), backed by huge pages where it pays."""
    t = like.new_empty(shape, dtype=dtype)
    if HUGE_PAGES:
        _advise(t, _HUGE_PAGE_BYTES, _MADV_HUGEPAGE, HUGE_PAGES_MIN_BYTES)
    return t


def zero_new_buffer(t: Tensor) -> None:
    """Fill with zeros a contiguous tensor the caller allocated itself (torch.empty, `new_buffer`).

    Whole pages are dropped (MADV_DONTNEED) instead of written, so they cost nothing until read,
    and a read maps the shared zero page; the partial pages at either end get `zero_`. Never call
    it on memory that may be shared or file-backed (a tensor from `share_memory_`, `from_file` or a
    memory-mapped checkpoint): there MADV_DONTNEED does not zero.
    """
    span = _advise(t, _PAGE_BYTES, _MADV_DONTNEED, ZERO_PAGES_MIN_BYTES)
    if span is None:
        t.zero_()
        return
    lo, hi = span
    bytes_B = t.view(-1).view(torch.uint8)
    bytes_B[:lo].zero_()
    bytes_B[hi:].zero_()
