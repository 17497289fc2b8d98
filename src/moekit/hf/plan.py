"""Tensor plans: where each Hugging Face tensor lives in a moekit state dict, in both directions.

A family module describes a checkpoint as a list of `HFTensor`s. Each names one transformers key,
its shape, and the `Piece`s it is made of: which moekit tensor, which region of it (`dst`), which
region of the transformers tensor (`src`), and whether the two are transposed. Examples:

    per-expert Mixtral w1 of expert j, [F, D]  ->  w_in_EDF[j, :, :F]   (transposed)
    fused gate_up_proj [E, 2F, D]              ->  w_in_EDF             (transposed)
    GPT-OSS gate_up_proj [E, D, 2F], gate in even columns -> two pieces, src [..., 0::2] and [..., 1::2]
    DeepSeek interleaved rotary rows           ->  src = (row permutation,)

One plan serves loading (`load_plan`: read each HF tensor once, copy its pieces into place) and
saving (`assemble`: build each HF tensor from its pieces), so the two directions cannot disagree.
`check_plan` verifies that a plan covers every element of every moekit tensor exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moekit.hf.io import CheckpointFormatError

ALL = slice(None)
SLAB_BYTES = 16 * 2**20  # largest read buffer when a big tensor is loaded a slab of rows at a time


@dataclass(frozen=True)
class Piece:
    """One region of a moekit tensor, filled from one region of a transformers tensor."""

    param: str  # moekit state-dict key
    dst: tuple[Any, ...] = ()  # index into the moekit tensor (() = all of it)
    src: tuple[Any, ...] = ()  # index into the transformers tensor
    transpose: bool = False  # the transformers region is the moekit region with its last two dims swapped


@dataclass(frozen=True)
class HFTensor:
    key: str  # transformers state-dict key
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


def whole(key: str, shape: tuple[int, ...], param: str) -> HFTensor:
    """A transformers tensor that is a moekit tensor as it is (norms, embeddings, nn.Linear weights)."""
    return HFTensor(key, tuple(shape), (Piece(param),))


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def __contains__(self, key: str) -> bool: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def describe(self, key: str) -> str: ...
    def read(self, key: str) -> torch.Tensor: ...


def _region_numel(shape: tuple[int, ...], index: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(torch.empty(shape, device="meta")[index].shape)


def check_plan(plan: Iterable[HFTensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every moekit tensor covered exactly by the plan's pieces (element counts), shapes agreeing.

    A failure is a bug in a family mapping, not a user error."""
    covered = dict.fromkeys(shapes, 0)
    for t in plan:
        for p in t.pieces:
            if p.param not in shapes:
                raise AssertionError(f"plan maps {t.key!r} to {p.param!r}, which the moekit model lacks")
            dst = _region_numel(shapes[p.param], p.dst)
            src = _region_numel(t.shape, p.src)
            if p.transpose:
                src = src[:-2] + (src[-1], src[-2])
            if dst != src:
                raise AssertionError(
                    f"plan piece {t.key!r}{p.src} -> {p.param!r}{p.dst}: shapes {src} vs {dst}"
                )
            covered[p.param] += torch.Size(dst).numel()
    wrong = {
        k: (covered[k], torch.Size(s).numel())
        for k, s in shapes.items()
        if covered[k] != torch.Size(s).numel()
    }
    if wrong:
        raise AssertionError(f"plan covers these moekit tensors partially or twice (covered, numel): {wrong}")


def check_source(
    plan: list[HFTensor], source: TensorSource, ignored: Any, context: str, hint: str = ""
) -> None:
    """Raise CheckpointFormatError unless the source holds exactly the plan's tensors with its shapes.

    `ignored(key)` marks tensors a checkpoint may carry that the model does not use."""
    wanted = {t.key: t for t in plan}
    missing = [k for k in wanted if k not in source]
    if missing:
        raise CheckpointFormatError(
            f"{context}: tensor {missing[0]!r} is missing ({len(missing)} missing in all, e.g. {missing[:4]}){hint}"
        )
    unexpected = sorted(k for k in source.keys() if k not in wanted and not ignored(k))  # noqa: SIM118
    if unexpected:
        raise CheckpointFormatError(
            f"{context}: the checkpoint has tensors its config.json does not account for, e.g. "
            f"{source.describe(unexpected[0])} ({len(unexpected)} in all: {unexpected[:4]}); "
            f"config.json contradicts the weights{hint}"
        )
    for t in plan:
        if tuple(source.shape(t.key)) != t.shape:
            raise CheckpointFormatError(
                f"{context}: tensor {source.describe(t.key)} has shape {tuple(source.shape(t.key))} but "
                f"config.json implies {t.shape}{hint}"
            )


@torch.no_grad()
def load_plan(
    plan: list[HFTensor], source: TensorSource, params: dict[str, torch.Tensor], slab_bytes: int = SLAB_BYTES
) -> None:
    """Copy every planned transformers tensor into its moekit regions, one tensor at a time.

    With a streaming source (io.SafetensorsReader) a tensor that is a moekit tensor as it is is
    read straight into it, and a large one whose pieces keep dim 0 (fused expert banks, embeddings)
    is read in slabs of rows of at most `slab_bytes`: the extra memory stays one slab."""
    for t in plan:
        direct = _whole_same(t, source, params)
        if direct is not None and hasattr(source, "read_into"):
            source.read_into(t.key, direct)
            continue
        row_bytes = torch.Size(t.shape[1:]).numel() * source.dtype(t.key).itemsize
        if hasattr(source, "read_rows") and _keeps_rows(t) and row_bytes * t.shape[0] > slab_bytes:
            step = max(1, slab_bytes // max(row_bytes, 1))
            for start in range(0, t.shape[0], step):
                stop = min(start + step, t.shape[0])
                _copy_pieces(t, source.read_rows(t.key, start, stop), params, rows=slice(start, stop))
            continue
        _copy_pieces(t, source.read(t.key), params)


def _copy_pieces(
    t: HFTensor, value: torch.Tensor, params: dict[str, torch.Tensor], rows: slice | None = None
) -> None:
    """Copy the pieces of `t` from `value` (all of it, or the dim-0 rows `rows` of it)."""
    for p in t.pieces:
        src, dst = p.src, p.dst
        if rows is not None:  # _keeps_rows: both indices are () or start with a full slice
            src, dst = (ALL, *src[1:]), (rows, *dst[1:])
        region = value[src]
        if p.transpose:
            region = region.transpose(-1, -2)
        params[p.param][dst].copy_(region)


def _whole_same(t: HFTensor, source: TensorSource, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The moekit tensor `t` can be read into directly (one whole piece, same dtype), else None."""
    if len(t.pieces) != 1:
        return None
    p = t.pieces[0]
    target = params[p.param]
    if p.src or p.dst or p.transpose or target.dtype != source.dtype(t.key) or not target.is_contiguous():
        return None
    return target


def _keeps_rows(t: HFTensor) -> bool:
    """Whether dim 0 of `t` is dim 0 of every piece's moekit region (so rows can be read apart)."""
    if len(t.shape) < 2:
        return False
    for p in t.pieces:
        if p.transpose and len(t.shape) < 3:  # a transposed matrix: HF rows are moekit columns
            return False
        for index in (p.src, p.dst):
            if index and not (isinstance(index[0], slice) and index[0] == ALL):
                return False
    return True


def assemble(t: HFTensor, params: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The transformers tensor `t`, built from its moekit regions (a new contiguous tensor)."""
    first = params[t.pieces[0].param]
    out = torch.empty(t.shape, dtype=dtype or first.dtype)
    for p in t.pieces:
        region = params[p.param].detach()[p.dst]
        if p.transpose:
            region = region.transpose(-1, -2)
        out[p.src] = region.to(out.dtype)
    return out


def nbytes(t: HFTensor, dtype: torch.dtype) -> int:
    return torch.Size(t.shape).numel() * torch.empty((), dtype=dtype).element_size()
