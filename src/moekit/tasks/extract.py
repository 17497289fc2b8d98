"""Cut one task's sub-network out of a task-routed model (Task-MoE's deployment story).

With router="task" a task's tokens all go to the same top_k experts of every MoE layer, chosen by
the task's row of learned logits. `extract_task` keeps exactly those experts (in their original
order, so the combine sums in the same order) and the task's logits for them, and sets
num_tasks=1: the result is a smaller standalone model that needs no task ids and whose outputs for
that task are bit-identical to the full model's (tested), at num_experts = top_k.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from moekit.compress.derived import save_derived_checkpoint
from moekit.compress.surgery import moe_layers_named, per_expert_tensors, rebuild
from moekit.moe import MoE
from moekit.train.checkpoint import load_model


def _check_task_model(model: nn.Module, task: int) -> None:
    moe = getattr(model.config, "moe", None)
    if moe is None or moe.router != "task":
        router = None if moe is None else moe.router
        raise ValueError(
            f"extract needs a task-routed model (moe.router='task'); this one has router={router!r}"
        )
    if not 0 <= task < moe.num_tasks:
        raise ValueError(f"task {task} is out of range: the model has num_tasks={moe.num_tasks}")


def task_expert_table(model: nn.Module) -> list[list[list[int]]]:
    """[layer][task] -> the experts that task uses in that MoE layer."""
    _check_task_model(model, 0)
    return [
        [layer.router.task_experts(t) for t in range(layer.config.num_tasks)]
        for _, layer in moe_layers_named(model)
    ]


def extract_task(model: nn.Module, task: int) -> nn.Module:
    """The standalone sub-network of `task`: top_k experts per MoE layer, num_tasks=1."""
    _check_task_model(model, task)
    moe = model.config.moe
    kept = {prefix: layer.router.task_experts(task) for prefix, layer in moe_layers_named(model)}

    def layer_tensors(prefix: str, layer: MoE) -> dict[str, Tensor]:
        out = {name: t[kept[prefix]] for name, t in per_expert_tensors(layer).items()}
        out["router.gate.weight"] = out["router.gate.weight"][:, task : task + 1]  # [k, 1]: this task only
        return out

    extra = {**moe.extra, "extracted_task": task, "experts_kept": list(kept.values())}
    new_moe = dataclasses.replace(moe, num_experts=moe.top_k, num_tasks=1, task_experts=None, extra=extra)
    return rebuild(model, new_moe, layer_tensors)


def resolve_task(config: dict[str, Any], task: str | int) -> int:
    """A task given by name (from the checkpoint's task list) or by index."""
    names = list(config.get("tasks", {}).get("names", []))
    if isinstance(task, str) and task in names:
        return names.index(task)
    try:
        return int(task)
    except ValueError:
        raise ValueError(
            f"--task {task!r} is not a task of this checkpoint: expected one of {names} or an index"
        ) from None


def extract_checkpoint(
    ckpt: str | Path, task: str | int, out: str | Path
) -> tuple[Path, nn.Module, nn.Module]:
    """Extract `task` from checkpoint `ckpt` into folder `out` -> (out, full model, extracted model)."""
    model, config = load_model(ckpt)
    index = resolve_task(config, task)
    small = extract_task(model, index)
    entries: dict[str, Any] = {}
    if "tasks" in config:  # the extracted model evaluates on its own task's data only
        entries["tasks"] = {**config["tasks"], "names": [config["tasks"]["names"][index]]}
    if isinstance(config.get("run"), dict):
        run = config["run"]
        data = dict(run.get("data", {}))
        for key in ("paths", "validation_paths"):
            if len(data.get(key) or []) == model.config.moe.num_tasks:
                data[key] = [data[key][index]]
        entries["run"] = {**run, "data": data}
    path = save_derived_checkpoint(small, {**config, **entries}, out, {"op": "extract", "task": index})
    return path, model, small
