"""Large CPU buffers without the kernel's per-page costs.

A fresh CPU tensor larger than glibc's mmap threshold (32 MiB at most) is new memory every time:
the kernel maps and zeroes each 4 KiB page on its first touch, one page fault per page. For the
experts' weight gradients, allocated anew every step (an optimizer's `zero_grad` frees them), that
costs as much as the arithmetic at decode-size batches: writing a fresh 69 MB buffer took 20 ms
here where rewriting it took 3 ms. Two remedies, both Linux madvise(2) calls on
memory this process allocated itself, which for torch's CPU allocator is private anonymous memory:

  - `new_buffer` asks for transparent huge pages (MADV_HUGEPAGE) on a large buffer's 2 MiB
    aligned interior: one fault per 2 MiB instead of per 4 KiB (the machine's THP setting must be
    "madvise" or "always"; with "never" the advice is a no-op). The same advice torch gives every
    allocation when started with THP_MEM_ALLOC_ENABLE=1, here only for the weight gradients.
    (Measured on the saved hidden activations too, it made forward+backward at T=512 slower in a
    long-running process, 150 vs 122 ms fine-grained, so they stay on plain pages);
  - `zero_new_buffer` zeroes a fresh buffer by handing its whole pages back to the kernel
    (MADV_DONTNEED): they then read as zeros without being written. The weight gradient of an
    expert that received no rows is such a buffer (most experts of a layer at decode sizes).

Elsewhere (other systems, other devices, small tensors, a failing call) both fall back to the
plain torch behaviour. MOEKIT_HUGE_PAGES=0 in the environment turns the huge-page advice off.

`scratch` keeps the fused experts' row-block buffers between calls, and `gradient_buffer` the
experts' weight-gradient memory between steps, for the same reason.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import threading
import weakref

import torch
from torch import Tensor

_MADV_DONTNEED, _MADV_HUGEPAGE = 4, 14
_PAGE_BYTES, _HUGE_PAGE_BYTES = mmap.PAGESIZE, 2 << 20
# Only buffers that glibc maps on their own (at or above its largest mmap threshold, 32 MiB): the
# advice then ends with the buffer's munmap. On a smaller buffer carved from the heap it outlives
# the tensor, and later allocations there paid for it (measured: forward+backward at T=512 10-20%
# slower after decode-size calls had advised heap memory).
MADVISE_MIN_BYTES = 32 << 20
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


def _advise(t: Tensor, part: Tensor, align: int, advice: int) -> tuple[int, int] | None:
    """madvise the `align`-aligned interior [lo, hi) of the bytes of `part`, a contiguous piece of
    the buffer `t`; (lo, hi) as byte offsets into `part`, or None where it does not apply (see
    MADVISE_MIN_BYTES: decided on the whole buffer) or the call failed."""
    nbytes = part.numel() * part.element_size()
    if _madvise is None or t.device.type != "cpu" or not (t.is_contiguous() and part.is_contiguous()):
        return None
    if t.numel() * t.element_size() < MADVISE_MIN_BYTES:
        return None
    start = part.data_ptr()
    lo = -(-start // align) * align
    hi = (start + nbytes) // align * align
    if hi <= lo or _madvise(lo, hi - lo, advice) != 0:
        return None
    return lo - start, hi - start


def new_buffer(shape: tuple[int, ...] | torch.Size, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """torch.empty(shape) on `like`'s device (and dtype), backed by huge pages where it pays."""
    t = like.new_empty(shape, dtype=dtype)
    if HUGE_PAGES:
        _advise(t, t, _HUGE_PAGE_BYTES, _MADV_HUGEPAGE)
    return t


def zero_new_buffer(t: Tensor, start: int = 0, end: int | None = None) -> None:
    """Fill t[start:end] (along dim 0; all of t by default) with zeros, where `t` is a contiguous
    buffer the caller allocated itself (torch.empty, `new_buffer`).

    Whole pages are dropped (MADV_DONTNEED) instead of written, so they cost nothing until read,
    and a read maps the shared zero page; the partial pages at either end get `zero_`. Never call
    it on memory that may be shared or file-backed (a tensor from `share_memory_`, `from_file` or a
    memory-mapped checkpoint): there MADV_DONTNEED does not zero.
    """
    part = t[start:end]
    span = _advise(t, part, _PAGE_BYTES, _MADV_DONTNEED)
    if span is None:
        part.zero_()
        return
    lo, hi = span
    bytes_B = part.view(-1).view(torch.uint8)
    bytes_B[:lo].zero_()
    bytes_B[hi:].zero_()


# ---------------------------------------------------------------------- scratch workspace
_local = threading.local()


def scratch(like: Tensor, *shapes: tuple[int, ...], pool: str = "experts") -> list[Tensor]:
    """Scratch buffers of the given shapes (like's dtype and device), kept per thread, pool, device
    and dtype (the i-th shape reuses the i-th buffer of the pool, grown as needed). A function that
    runs inside another one's use of a pool takes its own pool.

    The row-block buffers of the fused experts are rewritten on every call; fresh allocations of a
    few MiB each come from the heap or from new mappings depending on glibc's state (its trim and
    mmap thresholds move as the process allocates), and when they are new memory every page faults
    again. A kept buffer is touched once. The buffers are valid until the next `scratch` call in
    the same thread: a caller must not return them or keep them past its own return. (One does, on
    purpose: native.TopKLayer keeps its work buffer between calls as scratch memory only, shared
    with the pool's other users and used by its own thread's calls alone; a pool that grows later
    leaves it the old buffer.)

    Buffers are always normal tensors, even when first asked for under `torch.inference_mode`
    (`generate`): an inference tensor kept here could not be written by a later training step.
    """
    cache = getattr(_local, "workspaces", None)
    if cache is None:
        cache = _local.workspaces = {}
    bufs = cache.setdefault((pool, like.device, like.dtype), [])
    out = []
    for i, shape in enumerate(shapes):
        size = math.prod(shape)
        if i == len(bufs) or bufs[i].numel() < size:
            with torch.inference_mode(False):
                buf = torch.empty(size, dtype=like.dtype, device=like.device)
            if i == len(bufs):
                bufs.append(buf)
            else:
                bufs[i] = buf
        out.append(bufs[i][:size].view(shape))
    return out


def release_scratch() -> None:
    """Free this thread's scratch workspaces (they are kept between calls otherwise)."""
    _local.workspaces = {}


# ---------------------------------------------------------------------- gradient buffers
# (id(owner), slot) -> (weak reference to the owner, the storage of the last buffer given for it, its dtype)
_kept_storages: dict[tuple[int, str], tuple[weakref.ref, torch.UntypedStorage, torch.dtype]] = {}
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def gradient_buffer(weight: Tensor) -> tuple[Tensor, bool]:
    """An uninitialized buffer for `weight`'s gradient, and whether it is the memory of the buffer
    given for `weight` last time (True) or new memory (`new_buffer`, False).

    An optimizer's `zero_grad()` (set_to_none) drops every gradient after each step, so each backward
    would write its expert gradients into new memory, page faults and all (after a pause, on a VM that
    reports free memory to its host, even on huge pages). Instead the storage of the buffer handed out
    last time is kept, and reused once nothing else holds it: not `.grad`, not a view, not a tensor of
    the caller's. The buffer is a fresh tensor on that storage, so autograd still takes it as `.grad`
    without a copy. The kept storage goes with the weight (a weak reference), or with
    `release_gradient_buffers()`.
    """
    return kept_buffer(weight, "grad", weight.shape, weight)


def kept_buffer(
    owner: Tensor, slot: str, shape: tuple[int, ...] | torch.Size, like: Tensor
) -> tuple[Tensor, bool]:
    """`gradient_buffer`'s reuse for any buffer tied to `owner`: an uninitialized tensor of `shape`
    (`like`'s dtype and device) on the storage given for (owner, slot) last time if nothing else holds
    it any more and its size matches (True), else new memory (False). The fused experts keep the
    pre-activation hidden they save for the backward this way (slot "hidden"): freed by the backward,
    reused by the next step's forward."""
    key = (id(owner), slot)
    entry = _kept_storages.get(key)
    nbytes = math.prod(shape) * like.element_size()
    if entry is not None and entry[0]() is owner and _storage_use_count is not None:
        storage = entry[1]
        if (
            _storage_use_count(storage._cdata) == 1  # only this entry
            and storage.nbytes() == nbytes
            and storage.device == like.device
            and entry[2] == like.dtype
        ):
            return like.new_empty(0).set_(storage, 0, shape), True
    buf = new_buffer(shape, like)
    forget = weakref.ref(owner, lambda _, key=key: _kept_storages.pop(key, None))
    _kept_storages[key] = (forget, buf.untyped_storage(), like.dtype)
    return buf, False


def release_gradient_buffers() -> None:
    """Drop the kept gradient (and other `kept_buffer`) storages: memory nothing else holds is freed."""
    _kept_storages.clear()
