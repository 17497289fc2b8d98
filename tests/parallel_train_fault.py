"""`moekit train` in which one rank fails: for tests/test_parallel_train.py, started by torchrun.

    FAULT=kill FAULT_RANK=1 FAULT_STEP=13 torchrun --nproc-per-node 2 tests/parallel_train_fault.py train --set ...

Rank FAULT_RANK fails when it is about to run step FAULT_STEP + 1, while every other rank goes on
into the collectives of that step. FAULT=kill: it dies by SIGKILL (no cleanup, like a crashed or
OOM-killed process). FAULT=hang: it stops making progress (sleeps) but stays alive, so only the
collective timeout (parallel.timeout_s) can end the others' wait. FAULT=interrupt: it alone gets
SIGINT twice (as after a Ctrl-C in a terminal: the terminal's and the one torchrun forwards); the
ranks must agree to stop after that step, then save and evaluate together.
"""

from __future__ import annotations

import os
import signal
import time

from moekit.cli import main
from moekit.train.trainer import Trainer


def fail_at(rank: int, step: int, fault: str) -> None:
    """Patch Trainer.train_step so that rank `rank` dies or hangs before training step `step` + 1."""
    if fault not in ("kill", "hang", "interrupt"):
        raise ValueError(f"FAULT={fault!r}: expected kill, hang or interrupt")
    train_step = Trainer.train_step

    def train_step_or_fail(self: Trainer):
        if self.layout.rank == rank and self.step == step:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault == "interrupt":
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            else:
                time.sleep(3600)
        return train_step(self)

    Trainer.train_step = train_step_or_fail


if __name__ == "__main__":
    fail_at(int(os.environ["FAULT_RANK"]), int(os.environ["FAULT_STEP"]), os.environ["FAULT"])
    raise SystemExit(main())
