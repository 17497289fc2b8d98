"""Cache helpers for the data package: where cached artefacts live, how their keys are made, and how
they are written.

Every cached file (tokenizer JSON, token arrays) is written to a temporary file in the destination
directory and then moved into place with ``os.replace``. The rename is atomic on POSIX and Windows, so a
crash or two runs racing on the same cache can never leave a half-written file that a later run would
trust. Keys are SHA-256 hashes of canonical JSON, so they are identical on every machine given the same
inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

CACHE_ENV_VAR = "MOEKIT_CACHE_DIR"


def default_cache_dir() -> Path:
    """The cache directory used when none is given: ``$MOEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/moekit``,
    else ``~/.cache/moekit``."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "moekit"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache directory to use (``cache_dir`` or the default), created if missing."""
    path = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(payload: Any) -> str:
    """SHA-256 hex digest of ``payload`` serialised as canonical JSON (sorted keys, no whitespace).

    Canonical JSON rather than ``repr`` or ``hash`` so the key does not depend on dict order, the Python
    version or hash randomisation.
    """
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success move it onto ``path`` atomically.

    The temporary file lives in the same directory because ``os.replace`` is only atomic within one file
    system. On any exception the temporary file is removed and ``path`` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_output supports modes 'wb' and 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        encoding = None if mode == "wb" else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            # fsync before the rename: otherwise a power loss can leave the new name pointing at an
            # empty file on some file systems.
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    with atomic_output(path, "w") as handle:
        handle.write(text)


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save ``array`` in ``.npy`` format to ``path`` atomically (never as a pickle)."""
    with atomic_output(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a ``.npy`` file read-only; pickled object arrays are refused."""
    return np.load(path, mmap_mode="r", allow_pickle=False)
