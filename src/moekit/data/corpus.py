"""Text sources for moekit: the embedded standard-library corpus and user data files.

A :class:`Corpus` is a list of training documents and a list of validation documents plus a
fingerprint (a hash of the source files, their sizes and modification times and the split settings)
that keys every cache built from it.

Default corpus
--------------
With no paths, :func:`load_corpus` returns the Python standard library source of the running
interpreter (``sysconfig.get_paths()["stdlib"]``): every ``*.py`` file, skipping any file below a
directory named ``test``, ``tests``, ``idle_test``, ``__pycache__``, ``site-packages`` or
``dist-packages`` (this also drops ``lib2to3/tests``, ``ctypes/test`` and friends). Files are read as
UTF-8 with ``errors="replace"`` in sorted order of their path relative to the stdlib root (POSIX
separators), and files that are empty or whitespace only are skipped. It needs no download and is the
same on every machine with the same Python version.

User data
---------
``paths`` is a list of file paths or glob patterns (``*``, ``?``, ``[...]``; ``**`` matches
directories recursively). Each file is read according to its name:

* ``*.jsonl`` / ``*.ndjson`` (optionally ``.gz``): one JSON object per line; the document text is the
  string in field ``text_field`` (default ``"text"``). Blank lines are skipped; records whose field is
  ``null`` or ``""`` are skipped; a line that is not JSON, not an object, lacks the field, or holds a
  non-string is an error naming the file, line number and field.
* ``*.parquet``: one document per row, the text is the string column ``text_field`` (default
  ``"text"``); null and empty values are skipped. Needs ``pyarrow`` (``pip install 'moekit[parquet]'``).
* anything else (``*.txt``, ``*.md``, ``*.py``, ...; optionally ``.gz``): the whole file is one
  document, read as UTF-8 with ``errors="replace"``.

Train/validation split
----------------------
Unless ``validation_paths`` is given, each document goes to validation when
``sha1(key)`` read as a fraction in [0, 1) is below ``validation_fraction`` (default 0.05). The key is
the relative path for stdlib files, the path as given/matched for text files, ``"<path>:line<n>"`` for
JSONL records and ``"<path>:row<i>"`` for parquet rows. The split is therefore stable: it does not change
between runs or machines, and adding a document never moves another one across the split. If either side
would be empty a ``ValueError`` says so; pass ``validation_paths`` (all of ``paths`` then trains) or change
``validation_fraction``.

Errors
------
Missing files and globs matching nothing raise ``FileNotFoundError``; directories, empty files, empty
corpora, malformed records, unknown columns and bad fractions raise ``ValueError``; each message names the
path or value and what was expected.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from moekit.data.cache import stable_hash

DEFAULT_VALIDATION_FRACTION = 0.05
DEFAULT_TEXT_FIELD = "text"
STDLIB_CORPUS_NAME = "stdlib"
# Directory names whose contents never belong to the stdlib corpus: test suites (large, repetitive and
# containing deliberately malformed files), bytecode caches and third-party packages.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIX = ".parquet"
GLOB_CHARS = frozenset("*?[")
# Bumped whenever the way documents are read or split changes, so stale caches are not reused.
CORPUS_FORMAT_VERSION = 1

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Document:
    """One document: ``key`` identifies it (and decides its split), ``text`` is its content."""

    key: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Training and validation documents plus a fingerprint of everything they were read from."""

    name: str
    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    fingerprint: str

    def train_texts(self) -> Iterator[str]:
        return (doc.text for doc in self.train)

    def validation_texts(self) -> Iterator[str]:
        return (doc.text for doc in self.validation)

    @property
    def num_train_chars(self) -> int:
        return sum(len(doc.text) for doc in self.train)

    @property
    def num_validation_chars(self) -> int:
        return sum(len(doc.text) for doc in self.validation)


# ---------------------------------------------------------------------------------------------------
# Stable split
# ---------------------------------------------------------------------------------------------------


def split_fraction(key: str) -> float:
    """Map ``key`` to a number in [0, 1) that is the same on every machine (unlike ``hash``)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_validation_fraction(validation_fraction: float) -> None:
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be strictly between 0 and 1, got {validation_fraction!r}")


def split_documents(
    documents: Iterable[Document], validation_fraction: float, source: str
) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """Split documents by the stable hash of their key; raise if either side ends up empty."""
    check_validation_fraction(validation_fraction)
    train: list[Document] = []
    validation: list[Document] = []
    for doc in documents:
        (validation if split_fraction(doc.key) < validation_fraction else train).append(doc)
    total = len(train) + len(validation)
    for side, docs in (("validation", validation), ("training", train)):
        if not docs:
            raise ValueError(
                f"the {side} split of {source} is empty ({total} documents, validation_fraction="
                f"{validation_fraction}); add more documents, change validation_fraction, or pass "
                f"separate validation paths"
            )
    return tuple(train), tuple(validation)


def _file_stats(paths: Iterable[Path]) -> list[list[Any]]:
    """(absolute path, size, mtime) of each file: enough to notice that a cached result is stale."""
    stats = []
    for path in paths:
        st = path.stat()
        stats.append([path.resolve().as_posix(), st.st_size, st.st_mtime_ns])
    return stats


# ---------------------------------------------------------------------------------------------------
# Standard library corpus
# ---------------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: PathLike | None = None) -> list[Path]:
    """All stdlib ``*.py`` files outside excluded directories, sorted by relative POSIX path."""
    base = stdlib_root() if root is None else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {base}")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        # Pruning in place stops os.walk from descending into excluded trees at all.
        dirnames[:] = [name for name in dirnames if name not in STDLIB_EXCLUDED_DIRS]
        found.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(base).as_posix())


def load_stdlib_corpus(
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION, root: PathLike | None = None
) -> Corpus:
    """The default corpus: the stdlib source, split by a stable hash of each file's relative path."""
    check_validation_fraction(validation_fraction)
    base = stdlib_root() if root is None else Path(root)
    files = list_stdlib_files(base)
    documents = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            documents.append(Document(path.relative_to(base).as_posix(), text))
    if not documents:
        raise ValueError(f"no non-empty *.py files found under the standard library directory {base}")
    train, validation = split_documents(documents, validation_fraction, f"the standard library at {base}")
    fingerprint = stable_hash(
        {
            "kind": STDLIB_CORPUS_NAME,
            "version": CORPUS_FORMAT_VERSION,
            "python": list(sys.version_info[:3]),
            "files": _file_stats(files),
            "validation_fraction": validation_fraction,
        }
    )
    return Corpus(STDLIB_CORPUS_NAME, train, validation, fingerprint)


# ---------------------------------------------------------------------------------------------------
# User files
# ---------------------------------------------------------------------------------------------------


def _as_pattern_list(paths: PathLike | Sequence[PathLike]) -> list[str]:
    # A single string is one path, not a sequence of one-character paths.
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def _glob(pattern: str) -> list[Path]:
    """Files matching ``pattern``, sorted; directories matched by the pattern are ignored."""
    import glob

    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    return [Path(match) for match in matches if os.path.isfile(match)]


def expand_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """Expand globs and check paths: existing files in the order given, duplicates dropped."""
    patterns = _as_pattern_list(paths)
    if not patterns:
        raise ValueError("no data paths given; pass at least one file path or glob pattern")
    expanded: list[Path] = []
    for pattern in patterns:
        if GLOB_CHARS.intersection(pattern):
            matches = _glob(pattern)
            if not matches:
                raise FileNotFoundError(f"glob pattern {pattern!r} matched no files")
            expanded.extend(matches)
            continue
        path = Path(pattern).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data file not found: {pattern!r}")
        if path.is_dir():
            raise ValueError(
                f"data path {pattern!r} is a directory; pass files or a glob such as '{pattern}/**/*.txt'"
            )
        expanded.append(path)
    return list(dict.fromkeys(expanded))


def _base_suffix(path: Path) -> str:
    """The format suffix of ``path``, looking through a trailing ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path) -> IO[str]:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - returned to a with-block


def read_text_file(path: PathLike) -> list[Document]:
    """A plain text file as a single document; an empty file is an error."""
    file = Path(path)
    with _open_text(file) as handle:
        text = handle.read()
    if not text.strip():
        raise ValueError(f"text file {file.as_posix()!r} is empty; expected some text")
    return [Document(file.as_posix(), text)]


def _jsonl_text(record: Any, file: Path, line_number: int, text_field: str) -> str | None:
    """The text of one JSONL record, ``None`` for a null/empty value, or a ValueError for bad records."""
    where = f"{file.as_posix()} line {line_number}"
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
        )
    if text_field not in record:
        fields = ", ".join(repr(name) for name in list(record)[:10]) or "none"
        raise ValueError(
            f"{where}: the record has no field {text_field!r} (fields: {fields}); set text_field to the "
            f"field that holds the text"
        )
    value = record[text_field]
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} is a {type(value).__name__}, expected a string")
    return value


def iter_jsonl(file: Path, expected: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSONL file (compressed too); a line
    that is not JSON raises ValueError naming the file and line, and what a line should hold."""
    with _open_text(file) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{file.as_posix()} line {line_number}: not valid JSON ({err.msg}); each line must be "
                    f"{expected}"
                ) from err


def read_jsonl_file(path: PathLike, text_field: str = DEFAULT_TEXT_FIELD) -> list[Document]:
    """One document per JSON object line, taking the text from ``text_field``."""
    file = Path(path)
    documents = []
    for line_number, record in iter_jsonl(file, f"one JSON object with a {text_field!r} field"):
        text = _jsonl_text(record, file, line_number, text_field)
        if text is not None:
            documents.append(Document(f"{file.as_posix()}:line{line_number}", text))
    if not documents:
        raise ValueError(f"JSONL file {file.as_posix()!r} has no records with text in field {text_field!r}")
    return documents


def _import_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            "reading .parquet files needs pyarrow; install it with `pip install 'moekit[parquet]'` "
            "or `pip install pyarrow`"
        ) from err
    return pq


def _check_parquet_column(schema: Any, file: Path, text_column: str) -> None:
    import pyarrow as pa

    if text_column not in schema.names:
        raise ValueError(
            f"parquet file {file.as_posix()!r} has no column {text_column!r} (columns: "
            f"{', '.join(schema.names)}); set text_field to the column that holds the text"
        )
    column_type = schema.field(text_column).type
    is_string_view = getattr(pa.types, "is_string_view", lambda _type: False)
    if not (
        pa.types.is_string(column_type)
        or pa.types.is_large_string(column_type)
        or is_string_view(column_type)
    ):
        raise ValueError(
            f"parquet file {file.as_posix()!r}: column {text_column!r} has type {column_type}, expected strings"
        )


def read_parquet_file(path: PathLike, text_column: str = DEFAULT_TEXT_FIELD) -> list[Document]:
    """One document per row, taking the text from the string column ``text_column``."""
    pq = _import_parquet()
    file = Path(path)
    try:
        parquet = pq.ParquetFile(file)
    except Exception as err:  # pyarrow raises its own error types for unreadable files
        raise ValueError(f"cannot read parquet file {file.as_posix()!r}: {err}") from err
    _check_parquet_column(parquet.schema_arrow, file, text_column)
    documents = []
    row = 0
    # Reading in record batches keeps memory bounded by one batch rather than the whole file.
    for batch in parquet.iter_batches(columns=[text_column]):
        for value in batch.column(0).to_pylist():
            if value:
                documents.append(Document(f"{file.as_posix()}:row{row}", value))
            row += 1
    if not documents:
        raise ValueError(f"parquet file {file.as_posix()!r} has no rows with text in column {text_column!r}")
    return documents


def read_documents(path: PathLike, text_field: str = DEFAULT_TEXT_FIELD) -> list[Document]:
    """Read one file according to its suffix (see the module docstring)."""
    file = Path(path)
    suffix = _base_suffix(file)
    if suffix in JSONL_SUFFIXES:
        return read_jsonl_file(file, text_field)
    if suffix == PARQUET_SUFFIX:
        if file.suffix.lower() == ".gz":
            raise ValueError(
                f"{file.as_posix()!r}: gzipped parquet is not supported; parquet compresses itself"
            )
        return read_parquet_file(file, text_field)
    return read_text_file(file)


def load_documents(files: Sequence[Path], text_field: str = DEFAULT_TEXT_FIELD) -> list[Document]:
    documents: list[Document] = []
    for file in files:
        documents.extend(read_documents(file, text_field))
    return documents


def load_text_corpus(
    paths: PathLike | Sequence[PathLike],
    *,
    validation_paths: PathLike | Sequence[PathLike] | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> Corpus:
    """A corpus from user files: split by stable hash, or ``paths`` train and ``validation_paths`` validate."""
    train_files = expand_paths(paths)
    validation_files = expand_paths(validation_paths) if validation_paths is not None else []
    overlap = {p.resolve() for p in train_files} & {p.resolve() for p in validation_files}
    if overlap:
        names = ", ".join(sorted(p.as_posix() for p in overlap))
        raise ValueError(f"files given both as training and validation data: {names}")
    train_docs = load_documents(train_files, text_field)
    if validation_files:
        train, validation = tuple(train_docs), tuple(load_documents(validation_files, text_field))
    else:
        listed = ", ".join(p.as_posix() for p in train_files[:3]) + (", ..." if len(train_files) > 3 else "")
        train, validation = split_documents(train_docs, validation_fraction, f"the data in {listed}")
    fingerprint = stable_hash(
        {
            "kind": "files",
            "version": CORPUS_FORMAT_VERSION,
            "files": _file_stats(train_files),
            "validation_files": _file_stats(validation_files),
            # With explicit validation files the fraction plays no part, so it must not change the key.
            "validation_fraction": None if validation_files else validation_fraction,
            "text_field": text_field,
        }
    )
    return Corpus("files", train, validation, fingerprint)


def load_corpus(
    paths: PathLike | Sequence[PathLike] | None = None,
    *,
    validation_paths: PathLike | Sequence[PathLike] | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> Corpus:
    """The stdlib corpus when ``paths`` is ``None`` (or ``"stdlib"``), otherwise the given user files."""
    if paths is None or (isinstance(paths, str) and paths == STDLIB_CORPUS_NAME):
        if validation_paths is not None:
            raise ValueError("validation_paths needs training paths; the stdlib corpus splits itself")
        return load_stdlib_corpus(validation_fraction)
    return load_text_corpus(
        paths,
        validation_paths=validation_paths,
        validation_fraction=validation_fraction,
        text_field=text_field,
    )
