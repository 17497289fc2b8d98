"""Hugging Face checkpoint folders on disk: config.json and (sharded) safetensors, streamed.

A folder holds `config.json` and either `model.safetensors` or the shards listed by
`model.safetensors.index.json` (`{"weight_map": {key: file}}`).

Reading streams one tensor at a time. `safe_open` memory-maps each whole file, and every page it
touches stays resident until the file is closed: loading a 400 MB file into a model that way peaks
at model + file (measured, safetensors 0.8). `SafetensorsReader` parses the headers itself (the
format is an 8-byte header length, a JSON header of dtype/shape/offsets, then raw little-endian
bytes) and reads each tensor with `readinto` into one reused scratch buffer, so the peak is the
model plus the largest single tensor. All headers are read and checked first, so a missing shard,
a missing key or a truncated file is reported before any weight is copied.

Writing groups tensors into shards of at most `max_shard_bytes` in order, builds only one shard's
tensors at a time, and writes the index when there is more than one shard, as transformers does.
`write_folder` makes a save atomic: the new folder is written beside the old one and swapped in
with a rename, so a failed save leaves the old folder as it was, and the weight files of an
earlier save (an index, shards of another count) can never survive next to the new ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# what a save rewrites: config.json and the safetensors weights (single file, shards, index)
SAVED_FILES = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointFormatError(ValueError):
    """A Hugging Face folder that cannot be read as asked: missing, corrupt, or not matching its config."""


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise CheckpointFormatError(f"{str(folder)!r} is not a folder")
    if not path.is_file():
        raise CheckpointFormatError(f"{str(path)!r} is missing: not a Hugging Face model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"{str(path)!r} is not valid JSON: {exc}") from exc


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header without __metadata__); checks offsets against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointFormatError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    header.pop("__metadata__", None)
    data_start = 8 + n
    for key, info in header.items():
        if info.get("dtype") not in DTYPES:
            raise CheckpointFormatError(
                f"{str(path)!r}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}"
            )
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise CheckpointFormatError(
                f"{str(path)!r} is truncated: tensor {key!r} ends at byte {data_start + end}, file has {size}"
            )
    return data_start, header


class SafetensorsReader:
    """The tensors of a folder's safetensors files, read one at a time (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path, single = self.folder / INDEX_NAME, self.folder / WEIGHTS_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointFormatError(f"{str(index_path)!r} has no valid weight_map: {exc}") from exc
            self.listing = index_path
        elif single.is_file():
            weight_map = None
            self.listing = single
        else:
            found = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []
            hint = (
                " (moekit reads only safetensors, never pickles)" if any(".bin" in f for f in found) else ""
            )
            raise CheckpointFormatError(
                f"{str(self.folder)!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}; it holds {found[:12]}"
            )
        files = sorted(set(weight_map.values())) if weight_map is not None else [WEIGHTS_NAME]
        self.headers: dict[str, tuple[int, dict[str, Any]]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                keys = sorted(k for k, f in weight_map.items() if f == name) if weight_map else []
                raise CheckpointFormatError(
                    f"shard {str(path)!r} listed in {INDEX_NAME} is missing (it should hold {len(keys)} "
                    f"tensors, e.g. {keys[:3]})"
                )
            self.headers[name] = _read_header(path)
        if weight_map is None:
            weight_map = dict.fromkeys(self.headers[WEIGHTS_NAME][1], WEIGHTS_NAME)
        for key, name in weight_map.items():
            if key not in self.headers[name][1]:
                raise CheckpointFormatError(
                    f"tensor {key!r} is listed in {INDEX_NAME} under {name!r}, but that file does not hold it"
                )
        self.key_file: dict[str, str] = dict(weight_map)
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def keys(self) -> list[str]:
        return list(self.key_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def _info(self, key: str) -> dict[str, Any]:
        return self.headers[self.key_file[key]][1][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._info(key)["dtype"]]

    def describe(self, key: str) -> str:
        return f"{key!r} in {str(self.folder / self.key_file[key])!r}"

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key`, as a view into a reused buffer: valid until the next read."""
        return self.read_rows(key, 0, self.shape(key)[0] if self.shape(key) else 1)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 (along dim 0) of `key`, a view into the reused buffer.

        Rows are contiguous on disk, so a large tensor is read in slabs without ever being whole."""
        info = self._info(key)
        shape, dtype = list(info["shape"]), DTYPES[info["dtype"]]
        row_bytes = torch.Size(shape[1:]).numel() * dtype.itemsize
        n = (stop - start) * row_bytes if shape else dtype.itemsize
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.uint8)
        buf = self._scratch[:n]
        self._read_bytes(key, start * row_bytes, buf)
        return buf.view(dtype).view([stop - start, *shape[1:]] if shape else [])

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read `key` straight into `out` (contiguous, same dtype and shape): no intermediate copy."""
        if not out.is_contiguous() or out.dtype != self.dtype(key) or tuple(out.shape) != self.shape(key):
            raise ValueError(
                f"read_into {key!r}: target must be contiguous {self.dtype(key)} {self.shape(key)}"
            )
        self._read_bytes(key, 0, out.view(-1).view(torch.uint8) if out.numel() else out.view(torch.uint8))

    def _read_bytes(self, key: str, offset: int, buf: torch.Tensor) -> None:
        name = self.key_file[key]
        data_start, header = self.headers[name]
        begin = header[key]["data_offsets"][0]
        with open(self.folder / name, "rb") as f:
            f.seek(data_start + begin + offset)
            if f.readinto(memoryview(buf.numpy())) != buf.numel():
                raise CheckpointFormatError(f"{self.describe(key)} is truncated")


class DictReader:
    """The same interface over an in-memory state dict (pure conversions, tests)."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "<state dict>") -> None:
        self.tensors, self.name = tensors, name

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def describe(self, key: str) -> str:
        return f"{key!r} in {self.name}"

    def read(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def write_sharded(
    folder: str | Path,
    items: Sequence[tuple[str, int, Callable[[], torch.Tensor]]],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write (key, nbytes, make_tensor) items as safetensors shards; returns the file names.

    Only one shard's tensors exist at a time. One shard is `model.safetensors`; more are
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, int, Callable[[], torch.Tensor]]]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item[1] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1]
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = {"format": "pt", **(metadata or {})}
    weight_map = {}
    for name, shard in zip(names, shards):
        tensors = {key: make().contiguous() for key, _, make in shard}
        save_file(tensors, str(folder / name), metadata=meta)
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": sum(item[1] for item in items)}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def write_folder(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a Hugging Face folder atomically: `write(tmp)` fills a new sibling folder, which then
    takes the place of `folder` with one rename.

    Entries of an existing `folder` that a save does not rewrite (tokenizer files, a README, ...)
    are carried over, hard-linked where the file system allows; its config.json and safetensors
    weights are not, so a stale index or shard can never shadow the new weights. When `write`
    fails, `folder` is left untouched and the partial folder is removed."""
    from moekit.train.checkpoint import save_folder_atomically  # checkpoints build on the models

    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise CheckpointFormatError(f"{str(folder)!r} exists and is not a folder")

    def carry_over(existing: Path, tmp: Path) -> None:
        for entry in existing.iterdir():
            if not SAVED_FILES.fullmatch(entry.name) and not (tmp / entry.name).exists():
                _link_or_copy(entry, tmp / entry.name)

    return save_folder_atomically(folder, write, carry_over)


def _link_or_copy(src: Path, dst: Path) -> None:
    def one(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=one)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        one(str(src), str(dst))


def parse_size(size: int | str) -> int:
    """Bytes of 123, "500MB", "5GB" (decimal units, as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (
        ("GIB", 2**30),
        ("MIB", 2**20),
        ("KIB", 2**10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
    ):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
