"""Validation loss and forward speed of a (possibly pruned, merged or quantized) checkpoint model.

The loss is the run's own validation measure, through the same Trainer `moekit eval` uses (the
multi-task TaskTrainer, with per-task losses, for checkpoints trained on tasks), so numbers before
and after compression are comparable.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.train.checkpoint import TOKENIZER_FILE


def validation_loss(model: nn.Module, config: dict[str, Any], batches: int | None = None) -> dict[str, float]:
    """{"val_loss": ..., ...} of `model` on the validation data of the run in `config`."""
    from moekit.train.config import RunConfig

    if not isinstance(config.get("run"), dict):
        raise ValueError(f"{config.get('folder')!r} has no run config: cannot tell which data to evaluate on")
    cfg = RunConfig.from_dict(config["run"])
    cfg.data.tokenizer = str(Path(config["folder"]) / TOKENIZER_FILE)
    cfg.train.device = "cpu"
    if batches is not None:
        cfg.train.eval_batches = batches
    if "tasks" in config:
        from moekit.tasks import TaskSet, TaskTrainer

        return TaskTrainer(cfg, TaskSet.from_dict(config["tasks"]), model=model).evaluate()
    from moekit.train.trainer import Trainer

    return Trainer(cfg, model=model).evaluate()


@torch.no_grad()
def forward_tokens_per_second(
    model: nn.Module,
    batch_size: int = 8,
    seq_len: int = 128,
    repeats: int = 3,
    task_ids: torch.Tensor | None = None,
) -> float:
    """Tokens per second of a no-grad forward on random ids (best of `repeats`, after a warm-up)."""
    model.eval()
    seq_len = min(seq_len, model.config.max_seq_len)
    x = torch.randint(
        0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)
    )
    kwargs = {} if task_ids is None else {"task_ids": task_ids}
    model(x, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(x, **kwargs)
        best = min(best, time.perf_counter() - start)
    return batch_size * seq_len / best
