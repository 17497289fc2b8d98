"""`moekit train-tasks` and `moekit extract`: task-level routing from the command line.

moekit train-tasks [--config FILE] [--set section.key=value ...] [--tasks code,prose,...] [--max-chars N]
    train on the multi-task stdlib corpus; `--set moe.router='"task"'` routes by task (num_tasks is
    filled in), any other router routes token by token on the same batches
moekit extract --ckpt DIR --task T --out DIR
    cut task T's experts out of a task-routed checkpoint into a smaller standalone one
"""

from __future__ import annotations

import argparse

import torch


def add_commands(sub: argparse._SubParsersAction) -> None:
    from moekit.tasks.data import TASK_NAMES

    tr = sub.add_parser("train-tasks", help="train on the multi-task stdlib corpus (task ids per sequence)")
    tr.add_argument("--config", default=None, help="TOML config (default: the shipped default.toml)")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    tr.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated, from {list(TASK_NAMES)}")
    tr.add_argument("--max-chars", type=int, default=1_500_000, help="training characters per task")
    tr.set_defaults(func=run_train_tasks)

    ex = sub.add_parser("extract", help="cut one task's sub-network out of a task-routed checkpoint")
    ex.add_argument("--ckpt", required=True, help="checkpoint or run folder (router='task')")
    ex.add_argument("--task", required=True, help="task name or index")
    ex.add_argument("--out", required=True, help="output checkpoint folder (not the input)")
    ex.set_defaults(func=run_extract)


def run_train_tasks(args: argparse.Namespace) -> int:
    from moekit.tasks.data import TaskSet
    from moekit.tasks.trainer import TaskTrainer
    from moekit.train.commands import DEFAULT_CONFIG
    from moekit.train.config import load_config
    from moekit.train.report import write_report

    tasks = TaskSet(
        names=[t.strip() for t in args.tasks.split(",") if t.strip()], max_train_chars=args.max_chars
    )
    # num_tasks first, so that a task router validates; token-level routers ignore it
    cfg = load_config(args.config or DEFAULT_CONFIG, [f"moe.num_tasks={len(tasks.names)}", *args.set])
    trainer = TaskTrainer(cfg, tasks)
    print(
        f"moekit train-tasks: tasks {tasks.names}, router {cfg.moe.get('router', 'topk')}, run {trainer.run_dir}"
    )
    result = trainer.fit()
    write_report(result.run_dir, result.summary, result.checkpoint_dir)
    metrics = trainer.evaluate()
    print(f"done: {result.step} steps; validation loss {metrics['val_loss']:.4f}")
    for name in tasks.names:
        print(f"  {name:8s} {metrics[f'val_loss/{name}']:.4f}")
    print(f"checkpoint: {result.checkpoint_dir}")
    return 130 if result.interrupted else 0


def run_extract(args: argparse.Namespace) -> int:
    from moekit.model import count_params
    from moekit.tasks.extract import extract_checkpoint

    out, full, small = extract_checkpoint(args.ckpt, args.task, args.out)
    task = small.config.moe.extra["extracted_task"]
    x = torch.randint(0, full.config.vocab_size, (4, min(64, full.config.max_seq_len)))
    with torch.no_grad():
        same = torch.equal(full(x, task_ids=torch.full((4,), task)).logits, small(x).logits)
    before, after = count_params(full).total, count_params(small).total
    print(
        f"extracted task {task}: {before:,} -> {after:,} parameters ({after / before:.1%}), experts kept per layer:"
    )
    for layer, experts in enumerate(small.config.moe.extra["experts_kept"]):
        print(f"  MoE layer {layer}: {experts}")
    print(f"outputs identical to the full model on a random batch: {same}")
    print(f"checkpoint: {out}")
    return 0 if same else 1
