"""An offline multi-task corpus from the Python standard library, and batches that carry task ids.

Four tasks, all built from files every Python install has (no download):

    code     stdlib modules with their comments and docstrings removed
    prose    those comments and docstrings: English text about code
    tests    the stdlib's own test suite (Lib/test/test_*.py), unittest style code
    dectest  the decimal arithmetic test vectors (Lib/test/decimaltestdata/*.decTest)

Each task's documents are ordered by a stable hash, split into train/validation by that hash (as
the single-corpus loader does), capped at `max_train_chars` / `max_validation_chars`, and written as
one text file per task and split under `<cache>/tasks-<key>/<task>/{train,validation}.txt`, so a run
config can name them and `moekit eval` can read them like any user data.

`TaskBatchSampler` yields `(inputs [B, S], task_ids [B], targets [B, S])` with B / num_tasks rows of
every task, resumable through `state_dict` like the single-stream sampler it is built from.
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import tokenize
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.data import LMBatchSampler, Tokenizer, ValidationWindows, load_corpus, load_or_encode_tokens
from moekit.data.cache import atomic_write_text, resolve_cache_dir, stable_hash
from moekit.data.corpus import list_stdlib_files, split_fraction, stdlib_root

TASK_NAMES = ("code", "prose", "tests", "dectest")
CORPUS_VERSION = 1


@dataclass
class TaskSet:
    """Which tasks, and how much text of each (characters)."""

    names: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    max_train_chars: int = 1_500_000
    max_validation_chars: int = 120_000
    validation_fraction: float = 0.05

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in TASK_NAMES]
        if unknown or not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(
                f"tasks={self.names!r} is invalid: expected distinct names from {list(TASK_NAMES)}"
            )
        for name in ("max_train_chars", "max_validation_chars"):
            if getattr(self, name) < 1000:
                raise ValueError(f"TaskSet.{name}={getattr(self, name)!r} is invalid: expected >= 1000")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"TaskSet.validation_fraction={self.validation_fraction!r} is invalid: expected in (0, 1)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSet:
        return cls(**d)


@dataclass(frozen=True)
class TaskFiles:
    name: str
    train: Path
    validation: Path


# ---------------------------------------------------------------------- splitting Python source
def split_code_and_prose(source: str) -> tuple[str, str]:
    """Python source -> (the code without comments and docstrings, those comments and docstrings).

    A docstring here is any statement that is a lone string literal. Source that does not tokenize
    is returned whole as code.
    """
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return source, ""
    line_starts = np.cumsum([0] + [len(x) for x in source.splitlines(keepends=True)]).tolist()

    def offset(pos: tuple[int, int]) -> int:
        return line_starts[pos[0] - 1] + pos[1]

    statement_start = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.ENCODING)
    spans, prose, previous = [], [], None
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            spans.append((offset(tok.start), offset(tok.end)))
            prose.append(tok.string.lstrip("#").strip())
        elif tok.type == tokenize.STRING and (previous is None or previous.type in statement_start):
            following = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.ENDMARKER
            if following in (tokenize.NEWLINE, tokenize.ENDMARKER):
                spans.append((offset(tok.start), offset(tok.end)))
                try:
                    value = ast.literal_eval(tok.string)
                except (ValueError, SyntaxError):
                    value = ""
                if isinstance(value, str) and value.strip():
                    prose.append("\n" + inspect.cleandoc(value) + "\n")
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            previous = tok
    pieces, last = [], 0
    for start, end in spans:
        pieces.append(source[last:start])
        last = end
    pieces.append(source[last:])
    code = "".join(line for line in "".join(pieces).splitlines(keepends=True) if line.strip())
    text = "\n".join(p for p in prose if p).strip()
    return code, text


# ---------------------------------------------------------------------- task documents
def task_sources(name: str, root: Path | None = None) -> list[tuple[str, Path]]:
    """(key, file) of every document of one task, in file order."""
    base = stdlib_root() if root is None else root
    if name in ("code", "prose"):
        files = list_stdlib_files(base)
    else:
        folder, pattern = (
            (base / "test", "test_*.py")
            if name == "tests"
            else (base / "test" / "decimaltestdata", "*.decTest")
        )
        files = sorted(folder.glob(pattern))
        if not files:
            raise FileNotFoundError(
                f"task {name!r} needs {str(folder / pattern)!r}, which this Python install lacks; "
                f"choose other tasks from {list(TASK_NAMES)}"
            )
    return [(p.relative_to(base).as_posix(), p) for p in files]


def task_text(name: str, path: Path) -> str:
    """The text one file contributes to a task."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if name in ("code", "prose"):
        code, prose = split_code_and_prose(text)
        return code if name == "code" else prose
    return text


def _collect(name: str, tasks: TaskSet) -> tuple[str, str]:
    """(train text, validation text) of one task: files in stable-hash order until both caps are met."""
    sources = sorted(task_sources(name), key=lambda d: split_fraction(f"{name}:{d[0]}"))
    caps = {"train": tasks.max_train_chars, "validation": tasks.max_validation_chars}
    taken: dict[str, list[str]] = {"train": [], "validation": []}
    size = {"train": 0, "validation": 0}
    for key, path in sources:
        split = "validation" if split_fraction(key) < tasks.validation_fraction else "train"
        if size[split] >= caps[split]:
            if all(size[s] >= caps[s] for s in caps):
                break
            continue
        text = task_text(name, path)
        if text.strip():
            piece = text[: caps[split] - size[split]]
            taken[split].append(piece)
            size[split] += len(piece)
    if not taken["validation"] and len(taken["train"]) > 1:  # few documents: still validate on one
        taken["validation"].append(taken["train"].pop())
    if not taken["validation"] or not taken["train"]:
        raise ValueError(f"task {name!r} has too little text for a train and a validation split")
    return "\n\n".join(taken["train"]), "\n\n".join(taken["validation"])


def build_task_corpus(tasks: TaskSet, cache_dir: str | None = None) -> list[TaskFiles]:
    """Write (once) and return the train/validation text file of every task."""
    key = stable_hash(
        {"version": CORPUS_VERSION, "python": list(sys.version_info[:3]), "tasks": tasks.to_dict()}
    )
    root = resolve_cache_dir(cache_dir) / f"tasks-{key[:16]}"
    files = []
    for name in tasks.names:
        folder = root / name
        out = TaskFiles(name, folder / "train.txt", folder / "validation.txt")
        if not (out.train.is_file() and out.validation.is_file()):
            train, validation = _collect(name, tasks)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out.validation, validation)
            atomic_write_text(out.train, train)
        files.append(out)
    return files


def task_token_streams(
    files: Sequence[TaskFiles], tokenizer: Tokenizer, cache_dir: str | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train tokens, validation tokens) of every task, cached like any corpus."""
    streams = []
    for f in files:
        corpus = load_corpus([str(f.train)], validation_paths=[str(f.validation)])
        splits = load_or_encode_tokens(corpus, tokenizer, cache_dir=cache_dir)
        streams.append((splits.train, splits.validation))
    return streams


# ---------------------------------------------------------------------- batches with task ids
class TaskBatchSampler:
    """Endless `(inputs [B, S], task_ids [B], targets [B, S])`: B / num_tasks rows of every task."""

    def __init__(self, streams: Sequence[np.ndarray], batch_size: int, seq_len: int, *, seed: int = 0):
        n = len(streams)
        if n == 0 or batch_size % n:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of the number of tasks ({n}): "
                "every batch holds the same number of rows of every task"
            )
        self.samplers = [
            LMBatchSampler(tokens, batch_size // n, seq_len, seed=seed + t)
            for t, tokens in enumerate(streams)
        ]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pairs = [s.next_batch() for s in self.samplers]
        inputs_BS = torch.cat([p[0] for p in pairs])
        targets_BS = torch.cat([p[1] for p in pairs])
        task_ids_B = torch.arange(len(pairs)).repeat_interleave(pairs[0][0].shape[0])
        return inputs_BS, task_ids_B, targets_BS

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("tasks")
        if not isinstance(saved, list) or len(saved) != len(self.samplers):
            raise ValueError(
                f"sampler state holds {len(saved) if isinstance(saved, list) else 'no'} task streams; "
                f"this run has {len(self.samplers)} tasks"
            )
        for sampler, s in zip(self.samplers, saved):
            sampler.load_state_dict(s)


def task_validation_batches(
    stream: np.ndarray, task: int, batch_size: int, seq_len: int, max_windows: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed validation batches `(inputs, task_ids, targets)` of one task."""
    windows = ValidationWindows(stream, batch_size, seq_len, max_windows=max_windows)
    return [(x, torch.full((x.shape[0],), task, dtype=torch.long), y) for x, y in windows]
