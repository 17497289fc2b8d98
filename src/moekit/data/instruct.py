"""Instruction and multi-task data: JSONL prompt/response pairs, with the loss on the response only.

Each line of a JSONL file is one object with a prompt and a response (field names configurable;
an optional "task" field names the task of a multi-task mixture). An example becomes

    ids     = encode(prompt) + encode(response) + [eos]        P prompt ids, then the response ids
    inputs  = ids[:-1]
    targets = ids[1:], with targets[:P - 1] = -100

Position t predicts ids[t + 1], so exactly the response ids and the final eos are targets; the
prompt is context only. Prompt and response are encoded separately (the mask is exact, and a
response token never merges with the prompt's last bytes). An example longer than `max_len + 1`
ids is cut at the end; one whose prompt alone fills the window has no response target left and
is skipped (counted in `InstructionData.skipped`). An empty response is skipped too.

Batches are `(inputs, attention_mask, targets)`, each [B, L] with L the longest example of the
batch: right padding with pad_id, attention_mask False and targets -100 there. In a causal decoder
right padding never changes the real tokens' outputs; the mask keeps padding out of routing.

Train/validation split: separate validation files, or else a stable hash of "<path>:line<n>" as
for JSONL corpora (corpus.py), so the split never changes between runs.

`InstructionSampler` is resumable exactly like `LMBatchSampler`: examples are visited in a random
permutation per epoch drawn from `(seed, epoch)`, so `state_dict()` is a few integers and a restored
sampler yields exactly the batches the original would have yielded next.

Shape legend: B examples per batch, L padded length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.data.cache import stable_hash
from moekit.data.corpus import (
    DEFAULT_VALIDATION_FRACTION,
    PathLike,
    _file_stats,
    check_validation_fraction,
    expand_paths,
    iter_jsonl,
    split_fraction,
)
from moekit.data.loader import IGNORE_INDEX, _ResumableSampler
from moekit.data.tokenizer import Tokenizer

PROMPT_FIELD = "prompt"
RESPONSE_FIELD = "response"
TASK_FIELD = "task"


@dataclass(frozen=True)
class InstructionRecord:
    key: str  # "<path>:line<n>": decides the split and names the record in errors
    prompt: str
    response: str
    task: str | None = None


@dataclass(frozen=True)
class InstructionExample:
    input_ids: np.ndarray  # [L] int64
    targets: np.ndarray  # [L] int64, -100 where the next token is part of the prompt
    task: str | None = None

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class InstructionData:
    train: tuple[InstructionExample, ...]
    validation: tuple[InstructionExample, ...]
    skipped: int  # records without any response target (empty response, or a prompt that fills the window)
    fingerprint: str


# ---------------------------------------------------------------------------------------------------
# Reading and encoding
# ---------------------------------------------------------------------------------------------------


def read_instruction_file(
    path: PathLike, prompt_field: str = PROMPT_FIELD, response_field: str = RESPONSE_FIELD
) -> list[InstructionRecord]:
    """Every record of one JSONL file; bad lines raise ValueError naming the file, line and field."""
    file = Path(path)
    records = []
    expected = f"one JSON object with {prompt_field!r} and {response_field!r} fields"
    for line_number, record in iter_jsonl(file, expected):
        where = f"{file.as_posix()} line {line_number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt = _text_field(record, prompt_field, where, "--prompt-field")
        response = _text_field(record, response_field, where, "--response-field")
        task = record.get(TASK_FIELD)
        records.append(
            InstructionRecord(
                f"{file.as_posix()}:line{line_number}", prompt, response, None if task is None else str(task)
            )
        )
    if not records:
        raise ValueError(f"instruction file {file.as_posix()!r} has no records")
    return records


def _text_field(record: dict[str, Any], name: str, where: str, flag: str) -> str:
    if name not in record:
        fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
        raise ValueError(f"{where}: the record has no field {name!r} (fields: {fields}); set {flag}")
    value = record[name]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} is a {type(value).__name__}, expected a string")
    return value


def encode_example(
    tokenizer: Tokenizer, prompt: str, response: str, max_len: int, task: str | None = None
) -> InstructionExample | None:
    """One example with targets on the response only; None when no response target fits in max_len."""
    prompt_ids = tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response)
    if not response_ids:
        return None
    ids = np.asarray(prompt_ids + response_ids + [tokenizer.eos_id], dtype=np.int64)[: max_len + 1]
    targets = ids[1:].copy()
    targets[: max(len(prompt_ids) - 1, 0)] = IGNORE_INDEX  # predicting a prompt token: not trained
    if (targets == IGNORE_INDEX).all():
        return None
    return InstructionExample(ids[:-1].copy(), targets, task)


def load_instruction_data(
    paths: PathLike | Sequence[PathLike],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    validation_paths: PathLike | Sequence[PathLike] | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    prompt_field: str = PROMPT_FIELD,
    response_field: str = RESPONSE_FIELD,
) -> InstructionData:
    """Read, split and encode instruction files; either split being empty is an error."""
    files = expand_paths(paths)
    val_files = expand_paths(validation_paths) if validation_paths else []
    if not val_files:
        check_validation_fraction(validation_fraction)
    records = [r for f in files for r in read_instruction_file(f, prompt_field, response_field)]
    if val_files:
        train_records = records
        val_records = [r for f in val_files for r in read_instruction_file(f, prompt_field, response_field)]
    else:
        train_records = [r for r in records if split_fraction(r.key) >= validation_fraction]
        val_records = [r for r in records if split_fraction(r.key) < validation_fraction]
    skipped = 0
    splits = []
    for side, side_records in (("training", train_records), ("validation", val_records)):
        examples = []
        for r in side_records:
            ex = encode_example(tokenizer, r.prompt, r.response, max_len, r.task)
            skipped += ex is None
            if ex is not None:
                examples.append(ex)
        if not examples:
            raise ValueError(
                f"the {side} split of the instruction data {[f.as_posix() for f in files]} has no example "
                f"with a response target ({len(side_records)} records, {max_len} tokens per example); "
                f"add records, pass validation paths, or change validation_fraction"
            )
        splits.append(tuple(examples))
    fingerprint = stable_hash(
        {
            "kind": "instruct",
            "files": _file_stats(files),
            "validation_files": _file_stats(val_files),
            "validation_fraction": None if val_files else validation_fraction,
            "fields": [prompt_field, response_field],
            "tokenizer": tokenizer.fingerprint,
            "max_len": max_len,
        }
    )
    return InstructionData(splits[0], splits[1], skipped, fingerprint)


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------


def collate(
    examples: Sequence[InstructionExample], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, attention_mask, targets), each [B, L], right-padded to the longest example."""
    length = max(len(ex.input_ids) for ex in examples)
    inputs = np.full((len(examples), length), pad_id, dtype=np.int64)  # [B, L]
    targets = np.full((len(examples), length), IGNORE_INDEX, dtype=np.int64)  # [B, L]
    mask = np.zeros((len(examples), length), dtype=bool)  # [B, L]
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        inputs[i, :n], targets[i, :n], mask[i, :n] = ex.input_ids, ex.targets, True
    return torch.from_numpy(inputs), torch.from_numpy(mask), torch.from_numpy(targets)


class InstructionSampler(_ResumableSampler):
    """Endless `(inputs, attention_mask, targets)` batches of `batch_size` examples, resumable.

    The shared sampler machinery walks "windows" of one item over the example indices 0..n-1, so an
    epoch is a permutation of the examples drawn from (seed, epoch) and the state is (epoch, position).
    """

    kind = "instruct"

    def __init__(
        self,
        examples: Sequence[InstructionExample],
        batch_size: int,
        pad_id: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not examples:
            raise ValueError("InstructionSampler needs at least one example")
        self.examples = tuple(examples)
        self.pad_id = pad_id
        indices = np.arange(len(self.examples), dtype=np.int64)
        super().__init__(indices, batch_size=batch_size, window_len=1, stride=1, shuffle=shuffle, seed=seed)
        self._num_targets = sum(ex.num_targets for ex in self.examples)

    def _identity(self) -> dict[str, Any]:
        # The example count alone would accept a state saved for other data of the same size.
        return {**super()._identity(), "num_targets": self._num_targets}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return collate([self.examples[start] for _epoch, _pos, start in self._next_windows()], self.pad_id)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.next_batch()


def validation_batches(
    examples: Sequence[InstructionExample], batch_size: int, pad_id: int, max_examples: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: all examples in order, or `max_examples` evenly spaced ones."""
    indices = np.arange(len(examples))
    if max_examples is not None and max_examples < len(examples):
        indices = np.linspace(0, len(examples) - 1, max_examples).round().astype(np.int64)
    chosen = [examples[i] for i in indices]
    return [collate(chosen[i : i + batch_size], pad_id) for i in range(0, len(chosen), batch_size)]
