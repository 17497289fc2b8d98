"""Multi-process training: the process group, each rank's rows of a batch, agreement between ranks.

`torchrun --nproc-per-node W -m moekit train --set parallel.ep=P` starts W copies of one job; the
Trainer joins them with these helpers around `moekit.parallel` (docs/expert_parallel.md, section 7):

    device = start_process_group(device, timeout_s)    # WORLD_SIZE > 1: gloo, with nccl on CUDA
    layout = init_parallel(ep, model_config)           # validated on every rank, names the values
    with main_process_first(layout): prepare data      # rank 0 tokenizes and caches, then the others
    sampler = RankRows(sampler_of_global_batches, layout)

Data: the sampler draws the global batch that one process would draw with W*B sequences, and rank
r keeps its contiguous block, rows r*B .. r*B+B-1. The blocks concatenated in rank order are that
batch, so a W-rank run computes what one process does with batch_size W*B (expert parallelism
decides capacity on the concatenation in rank order too), and every rank holds the same sampler
state: the checkpoint stores it once, exactly as for one process.

Every forward of an expert-parallel model is a collective, so all ranks must run equally many:
training blocks are equal, and evaluation splits every validation batch into W blocks (possibly
empty) instead of dealing whole batches to ranks. Decisions that end the loop (time limit, Ctrl-C)
are agreed on with one all-reduce per step (`reduce_floats`), never taken by one rank alone.
Without torch.distributed every helper is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from moekit.parallel import ParallelLayout
from moekit.parallel.dispatch import collective_device


def env_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them (RANK, WORLD_SIZE); (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def start_process_group(device: torch.device, timeout_s: float) -> torch.device:
    """Join the job's process group when torchrun started several processes; returns this rank's
    device (cuda:LOCAL_RANK for a bare "cuda"). gloo on CPU; on CUDA nccl for CUDA tensors and gloo
    for the small CPU ones (config digests, RNG states). `timeout_s` bounds every collective, so a
    rank that hangs makes the others fail instead of waiting forever (a rank that dies is noticed
    at once: torchrun stops the others). An existing group is reused."""
    _, world = env_rank()
    if world <= 1 and not dist.is_initialized():
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device


def stop_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_first(layout: ParallelLayout) -> Iterator[None]:
    """Rank 0 runs the block first (it fills the data caches), then the other ranks (they read them):
    one tokenizer for all, trained once."""
    if layout.distributed and layout.rank != 0:
        dist.barrier()
    yield
    if layout.distributed and layout.rank == 0:
        dist.barrier()


def rank_rows(batch: tuple[Tensor, ...], layout: ParallelLayout) -> tuple[Tensor, ...]:
    """This rank's contiguous block of rows of every tensor of `batch`: W blocks in rank order whose
    sizes differ by at most one (a block may be empty)."""
    if not layout.distributed:
        return batch
    return tuple(t.tensor_split(layout.world_size)[layout.rank] for t in batch)


class RankRows:
    """One rank's view of a batch sampler that yields global batches of W*B rows: rows r*B .. r*B+B-1.

    Every rank advances the same sampler by the same global batches, so the state is the same on
    every rank and is that of the one-process sampler with batch_size W*B.
    """

    def __init__(self, sampler: Any, layout: ParallelLayout) -> None:
        self.sampler = sampler
        self.layout = layout

    def next_batch(self) -> tuple[Tensor, ...]:
        batch = self.sampler.next_batch()
        rows = batch[0].shape[0]
        if rows % self.layout.world_size:
            raise ValueError(
                f"a training batch of {rows} sequences cannot be split evenly over {self.layout.world_size} "
                "ranks: the sampler must yield world_size * data.batch_size sequences"
            )
        return rank_rows(batch, self.layout)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def comm_device(layout: ParallelLayout) -> torch.device:
    """Where small tensors for collectives live: CUDA under nccl, else the CPU."""
    return collective_device() if layout.distributed else torch.device("cpu")


def reduce_floats(values: list[float], layout: ParallelLayout, op: str = "sum") -> list[float]:
    """`values` reduced element-wise over all ranks ("sum", "max" or "min") in float64; one all-reduce."""
    if not layout.distributed:
        return list(values)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    packed = torch.tensor(values, dtype=torch.float64, device=comm_device(layout))
    dist.all_reduce(packed, op=ops[op])
    return packed.cpu().tolist()


def gather_objects(obj: Any, layout: ParallelLayout) -> list[Any]:
    """Every rank's `obj` (picklable, e.g. RNG states), in rank order, on every rank."""
    if not layout.distributed:
        return [obj]
    gathered: list[Any] = [None] * layout.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(layout: ParallelLayout) -> None:
    if layout.distributed:
        dist.barrier()


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of rank `rank`'s own random stream (dropout, router noise) from `step` on: ranks draw
    different masks for their different rows; the model's initialization uses `seed` on every rank."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class StopRequests:
    """Ctrl-C in a multi-process run: noted, and the ranks stop together at the end of the step.

    A KeyboardInterrupt raised at once would leave the ranks in different collectives (one inside an
    all-to-all, another saving), so with `enabled` SIGINT only sets `requested`; the loop agrees on
    it with the other ranks. Every SIGINT does only that: after a Ctrl-C in a terminal each worker
    gets two (the terminal's and the one torchrun forwards), and torchrun kills workers that have not
    exited 30 s after forwarding it.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> StopRequests:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)
