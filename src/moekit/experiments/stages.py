"""Runs that start from another run's checkpoint: fine-tuning, distillation and upcycling.

Each runs in this process through moekit.adapt exactly as its command does, and records that
command: `moekit finetune --ckpt RUN --freeze S --set ...`, `moekit distill --teacher RUN --out
RUN2 --alpha A --set ...`, or `moekit upcycle ...` followed by `moekit finetune ...`. The source
run is found by its label and seed in the experiment's run folder (`Context.run_dir`); when it
did not finish (skipped, diverged) the stage is skipped too.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from moekit.experiments.core import (
    Context,
    RunRecord,
    Variant,
    display_path,
    fit_and_record,
    new_record,
    skipped_record,
)


def stage_overrides(ctx: Context, variant: Variant, settings: tuple[str, ...]) -> list[str]:
    """--set values of a stage: the experiment's stage settings, the variant's, then bookkeeping."""
    return [
        *settings,
        *variant.overrides,
        f"train.seed={variant.seed}",
        f"train.run_name={ctx.run_name(variant)}",
        f"train.out_dir={ctx.runs_dir / ctx.name}",
        "train.resume=false",
        "train.progress=false",
    ]


def source_run(ctx: Context, variant: Variant) -> Path | None:
    """The finished run folder this stage starts from, or None."""
    folder = ctx.run_dir(variant.source, variant.seed)
    return folder if (folder / "checkpoint" / "config.json").is_file() else None


def _sets(overrides: list[str]) -> str:
    return " ".join(f"--set {shlex.quote(o)}" for o in overrides)


def finetune(
    ctx: Context,
    variant: Variant,
    settings: tuple[str, ...],
    *,
    freeze: str = "none",
    source: Path | None = None,
) -> RunRecord:
    """`moekit finetune --ckpt SOURCE --freeze FREEZE --set ...` (SOURCE: the variant's source run)."""
    from moekit.adapt import FinetuneOptions, FinetuneTrainer, finetune_config, load_finetune_model
    from moekit.adapt.checkpoints import Source

    source = source or source_run(ctx, variant)
    if source is None:
        return skipped_record(ctx, variant, f"not run: its source run {variant.source!r} did not finish")
    options = FinetuneOptions(freeze=freeze)
    options.validate()
    overrides = stage_overrides(ctx, variant, settings)
    checkpoint = Source.open(source)
    cfg = finetune_config(checkpoint, None, overrides)
    trainer = FinetuneTrainer(cfg, load_finetune_model(checkpoint, cfg), options)
    command = (
        f"moekit finetune --ckpt {shlex.quote(display_path(source))} --freeze {freeze} {_sets(overrides)}"
    )
    return fit_and_record(trainer, new_record(variant, command, trainer))


def distill(ctx: Context, variant: Variant, settings: tuple[str, ...], *, alpha: float) -> RunRecord:
    """`moekit distill --teacher SOURCE --out RUN --alpha ALPHA --set ...` (student FFNs: the
    average of the teacher's experts, the command's default)."""
    from moekit.adapt.checkpoints import Source, refuse_overwrite, run_config_for
    from moekit.adapt.distill import DistillTrainer, check_alpha, dense_student, dense_student_config
    from moekit.train.checkpoint import build_model

    teacher_run = source_run(ctx, variant)
    if teacher_run is None:
        return skipped_record(ctx, variant, f"not run: its teacher run {variant.source!r} did not finish")
    check_alpha(alpha)
    overrides = stage_overrides(ctx, variant, settings)
    out = ctx.runs_dir / ctx.name / ctx.run_name(variant)
    source = Source.open(teacher_run)
    refuse_overwrite(source.folder, out)
    defaults = {"train": {"run_name": "distill"}, "data": {"tokenizer": str(source.tokenizer_file)}}
    cfg = run_config_for(
        source.arch,
        dense_student_config(source.model_config),
        source.run,
        defaults=defaults,
        overrides=overrides,
    )
    teacher = source.load_weights(build_model(source.arch, source.model_config))
    student = dense_student(teacher, source.arch, "average", seed=cfg.train.seed)
    trainer = DistillTrainer(
        cfg, student, teacher, alpha, 1.0, {"teacher": str(source.folder), "ffn_init": "average"}
    )
    command = (
        f"moekit distill --teacher {shlex.quote(display_path(teacher_run))} --out "
        f"{shlex.quote(display_path(out))} --alpha {alpha:g} {_sets(overrides)}"
    )
    return fit_and_record(trainer, new_record(variant, command, trainer))


def upcycle_and_finetune(
    ctx: Context, variant: Variant, settings: tuple[str, ...], *, experts: int, top_k: int
) -> RunRecord:
    """`moekit upcycle --ckpt SOURCE --out INIT --experts E --top-k K --seed S`, then
    `moekit finetune --ckpt INIT ...` (continued training of the upcycled model)."""
    from moekit.adapt import upcycle_checkpoint

    dense_run = source_run(ctx, variant)
    if dense_run is None:
        return skipped_record(ctx, variant, f"not run: its dense run {variant.source!r} did not finish")
    init = ctx.runs_dir / ctx.name / f"{ctx.run_name(variant)}-init"
    upcycle_checkpoint(dense_run, init, experts, top_k, seed=variant.seed)
    record = finetune(ctx, variant, settings, source=init)
    upcycle = (
        f"moekit upcycle --ckpt {shlex.quote(display_path(dense_run))} --out {shlex.quote(display_path(init))} "
        f"--experts {experts} --top-k {top_k} --seed {variant.seed}"
    )
    record.command = f"{upcycle}\n{record.command}"
    return record
