"""TaskTrainer: the training loop of `moekit train`, on the multi-task corpus, with task ids.

Every batch holds the same number of sequences of every task and passes `task_ids [B]` to the
model: a task router (moe.router = "task") routes each sequence by its task, a token-level router
ignores the ids, so both train on exactly the same batches and compare fairly. Validation reports
the loss of every task (`val_loss/<task>`) and their token-weighted mean (`val_loss`).

Checkpoints are ordinary moekit checkpoints plus a "tasks" entry in config.json (task names and
corpus settings), which `moekit extract` and the calibration of merge/prune/quantize read.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.tasks.data import (
    TaskBatchSampler,
    TaskSet,
    build_task_corpus,
    task_token_streams,
    task_validation_batches,
)
from moekit.train.config import RunConfig
from moekit.train.trainer import Trainer, autocast_for


def configure_for_tasks(cfg: RunConfig, tasks: TaskSet) -> None:
    """Point cfg's data at the task corpus and size a task router for its tasks (in place)."""
    if cfg.arch != "decoder":
        raise ValueError(f"multi-task training needs model.arch='decoder', got {cfg.arch!r}")
    files = build_task_corpus(tasks, cfg.data.cache_dir or None)
    cfg.data.paths = [str(f.train) for f in files]
    cfg.data.validation_paths = [str(f.validation) for f in files]
    if cfg.moe.get("router") == "task":
        cfg.moe["num_tasks"] = len(tasks.names)


class TaskTrainer(Trainer):
    """`Trainer` whose batches are `(inputs, task_ids, targets)` from the multi-task corpus."""

    def __init__(self, cfg: RunConfig, tasks: TaskSet | None = None, *, model: nn.Module | None = None):
        self.tasks = tasks if tasks is not None else TaskSet()
        configure_for_tasks(cfg, self.tasks)
        self._streams: list[tuple[np.ndarray, np.ndarray]] | None = None
        super().__init__(cfg, model=model)

    # -------------------------------------------------------------- data
    def task_streams(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train, validation) token streams of every task, encoded with the run's tokenizer."""
        if self._streams is None:
            files = build_task_corpus(self.tasks, self.cfg.data.cache_dir or None)
            self._streams = task_token_streams(files, self.tokenizer, self.cfg.data.cache_dir or None)
        return self._streams

    def _train_sampler(self) -> TaskBatchSampler:
        d = self.cfg.data
        streams = [train for train, _ in self.task_streams()]
        return TaskBatchSampler(streams, d.batch_size, d.seq_len, seed=self.cfg.train.seed)

    def task_validation(self, task: int) -> list[tuple[torch.Tensor, ...]]:
        d, t = self.cfg.data, self.cfg.train
        windows = max(1, t.eval_batches * d.eval_batch_size // len(self.tasks.names))
        stream = self.task_streams()[task][1]
        return task_validation_batches(stream, task, d.eval_batch_size, d.seq_len, windows)

    def _validation_batches(self) -> list[tuple[torch.Tensor, ...]]:
        return [b for task in range(len(self.tasks.names)) for b in self.task_validation(task)]

    def forward_batch(self, batch: tuple[torch.Tensor, ...]) -> Any:
        inputs, task_ids, targets = (b.to(self.device) for b in batch)
        with autocast_for(self.device, self.cfg.train.dtype):
            return self.forward_module(inputs, targets=targets, task_ids=task_ids)

    # -------------------------------------------------------------- evaluation and checkpoints
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss of every task and their token-weighted mean."""
        was_training = self.model.training
        self.model.eval()
        metrics, total, count = {}, 0.0, 0
        for task, name in enumerate(self.tasks.names):
            task_total, task_count = 0.0, 0
            for batch in self.task_validation(task):
                n = int((batch[-1] != -100).sum())
                task_total += float(self.forward_batch(batch).ce_loss) * n
                task_count += n
            metrics[f"val_loss/{name}"] = task_total / max(task_count, 1)
            total, count = total + task_total, count + task_count
        self.model.train(was_training)
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), **metrics}

    def checkpoint_config(self) -> dict[str, Any]:
        return {**super().checkpoint_config(), "tasks": self.tasks.to_dict()}
