"""Calibration: run a model on a few sequences and record what every MoE layer's router saw.

Merging, pruning and GPTQ all need statistics of the experts on real data: how often each expert
is chosen (usage), the router logits of every token (MC-SMoE groups experts by them), and the
inputs routed to each expert (the Hessian of GPTQ). A forward hook on each router records its
input rows, its logits and its (token, expert) assignments; nothing in the model changes.

`calibration_batches` builds the sequences from a checkpoint's own training data (or `--calib`
files): the multi-task corpus with task ids for task-trained checkpoints, plain windows otherwise.

Shape legend: T calibration tokens, D model dim, E experts, A assignments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit.compress.surgery import moe_layers_named
from moekit.data import Tokenizer, encode_documents, expand_paths, load_corpus, read_documents
from moekit.data.corpus import split_fraction
from moekit.train.checkpoint import TOKENIZER_FILE

Batch = tuple[Tensor, Tensor | None]  # (input ids [B, S], task ids [B] or None)


@dataclass
class LayerRecord:
    """What one MoE layer's router saw on the calibration tokens."""

    x_TD: Tensor  # router inputs (the layer's normalized hidden states), float32
    logits_TE: Tensor  # router logits
    token_A: Tensor  # [A] token of every routed assignment
    expert_A: Tensor  # [A] its expert
    num_experts: int

    @property
    def usage_E(self) -> Tensor:
        """[E] assignments per expert (before any capacity drop)."""
        return torch.bincount(self.expert_A, minlength=self.num_experts).float()

    def expert_inputs(self, expert: int) -> Tensor:
        """[N_e, D] the rows routed to `expert`."""
        return self.x_TD[self.token_A[self.expert_A == expert]]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (nothing after the recorded layer is needed)."""


@contextlib.contextmanager
def _router_hooks(
    layers: Sequence[nn.Module], sink: list[list[tuple]], stop_after: int | None
) -> Iterator[None]:
    def hook(index: int):
        def record(module: nn.Module, args: tuple, routing: Any) -> None:
            x_TD, mask_T = args[0], args[1] if len(args) > 1 else None
            token_A, expert_A = routing.token_index(), routing.expert_idx_A
            valid_A = routing.keep_A
            if mask_T is not None:
                valid_A = mask_T[token_A] if valid_A is None else valid_A & mask_T[token_A]
            if valid_A is not None:
                token_A, expert_A = token_A[valid_A], expert_A[valid_A]
            sink[index].append((x_TD.detach().float(), routing.logits_TE.detach().float(), token_A, expert_A))
            if stop_after is not None and index == stop_after:
                raise _Stop

        return record

    handles = [layer.router.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def record_routing(
    model: nn.Module, batches: Sequence[Batch], stop_after: int | None = None
) -> list[LayerRecord]:
    """Run `model` on the batches and return one LayerRecord per MoE layer (in module order).

    With `stop_after=i` every forward stops right after MoE layer i routed (later layers are not
    recorded): what sequential quantization needs, at a fraction of the cost."""
    layers = [layer for _, layer in moe_layers_named(model)]
    if not layers:
        raise ValueError("the model has no MoE layers to calibrate")
    sink: list[list[tuple]] = [[] for _ in layers]
    was_training = model.training
    model.eval()
    with _router_hooks(layers, sink, stop_after):
        for input_ids, task_ids in batches:
            with contextlib.suppress(_Stop):
                model(input_ids) if task_ids is None else model(input_ids, task_ids=task_ids)
    model.train(was_training)
    records = []
    for layer, parts in zip(layers, sink):
        if not parts:
            records.append(None)
            continue
        offsets = np.cumsum([0] + [p[0].shape[0] for p in parts[:-1]])
        records.append(
            LayerRecord(
                torch.cat([p[0] for p in parts]),
                torch.cat([p[1] for p in parts]),
                torch.cat([p[2] + int(o) for p, o in zip(parts, offsets)]),
                torch.cat([p[3] for p in parts]),
                layer.config.num_experts,
            )
        )
    return records


# ---------------------------------------------------------------------- calibration data
def _windows(stream: np.ndarray, count: int, seq_len: int) -> Tensor:
    """[count, seq_len] evenly spaced windows of a token stream."""
    if len(stream) < seq_len:
        raise ValueError(f"calibration data has {len(stream)} tokens; one sequence needs {seq_len}")
    starts = np.linspace(0, len(stream) - seq_len, count).round().astype(np.int64)
    return torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int64))


def _batched(inputs_NS: Tensor, task_ids_N: Tensor | None, batch_size: int) -> list[Batch]:
    return [
        (inputs_NS[i : i + batch_size], None if task_ids_N is None else task_ids_N[i : i + batch_size])
        for i in range(0, inputs_NS.shape[0], batch_size)
    ]


def calibration_batches(
    config: dict[str, Any],
    paths: Sequence[str] | None = None,
    num_sequences: int = 32,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> list[Batch]:
    """Calibration sequences for the checkpoint described by `config` (from load_model).

    From `paths` when given, else from the checkpoint's own training data (the multi-task corpus,
    with task ids, when it was trained on tasks). Missing data is an error naming what is missing.
    """
    if config.get("arch", "decoder") != "decoder":
        raise ValueError(
            f"calibration runs decoder-only models; this checkpoint is arch={config.get('arch')!r}"
        )
    if num_sequences < 1:
        raise ValueError(f"--calib-sequences={num_sequences} is invalid: expected an integer >= 1")
    folder = Path(config["folder"])
    if not (folder / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(
            f"{str(folder / TOKENIZER_FILE)!r} is missing: calibration needs the tokenizer"
        )
    tokenizer = Tokenizer.from_file(folder / TOKENIZER_FILE)
    run = config.get("run") or {}
    data = run.get("data") or {}
    seq_len = seq_len or int(data.get("seq_len") or 0) or int(config["model"]["max_seq_len"])
    if paths is None and "tasks" in config:
        return _task_batches(config, tokenizer, num_sequences, seq_len, batch_size)
    sources = list(paths) if paths is not None else list(data.get("paths") or [])
    try:
        if paths is not None:  # the user's files, whole
            train = [doc for f in expand_paths(sources) for doc in read_documents(f)]
        else:  # the run's training split, exactly as it trained
            train = load_corpus(
                sources or None,
                validation_paths=data.get("validation_paths") or None,
                validation_fraction=data.get("validation_fraction", 0.05),
            ).train
    except (FileNotFoundError, ValueError) as exc:
        what = "--calib" if paths is not None else "the checkpoint's training data (run.data.paths)"
        raise ValueError(
            f"calibration data from {what} {sources!r} is unusable: {exc}; pass --calib FILES"
        ) from None
    docs = sorted(train, key=lambda d: split_fraction(f"calibration:{d.key}"))
    needed, texts, chars = num_sequences * seq_len * 6, [], 0  # ~4 chars a token, with a margin
    for doc in docs:
        texts.append(doc.text)
        chars += len(doc.text)
        if chars >= needed:
            break
    stream = encode_documents(tokenizer, texts)
    return _batched(_windows(stream, num_sequences, seq_len), None, batch_size)


def _task_batches(
    config: dict[str, Any], tokenizer: Tokenizer, num_sequences: int, seq_len: int, batch_size: int
) -> list[Batch]:
    from moekit.tasks.data import TaskSet, build_task_corpus, task_token_streams

    tasks = TaskSet.from_dict(config["tasks"])
    cache = ((config.get("run") or {}).get("data") or {}).get("cache_dir") or None
    streams = task_token_streams(build_task_corpus(tasks, cache), tokenizer, cache)
    per_task = max(1, num_sequences // len(streams))
    inputs = torch.cat([_windows(train, per_task, seq_len) for train, _ in streams])
    task_ids = torch.arange(len(streams)).repeat_interleave(per_task)  # token routers ignore them
    return _batched(inputs, task_ids, batch_size)
