"""finetune: freezing strategies and expert dropout in fine-tuning (ST-MoE, Switch).

Stage 1 pre-trains an MoE and the dense model of equal active FLOPs (experiments/finetune.toml,
stdlib corpus). Stage 2 fine-tunes them on another domain, Python's unittest test suite (absent
from the stdlib corpus), through `moekit finetune` with dropout 0.1:

    full fine-tuning            nothing frozen, expert dropout 0.1
    freeze MoE layers           experts and routers frozen (freeze strategy "moe")
    train only MoE layers       everything outside the MoE layers frozen ("non_moe", ST-MoE's "MoE only")
    expert dropout 0.4          nothing frozen, dropout 0.1 outside and 0.4 inside the experts (Switch)
    dense, full fine-tuning     the dense model, nothing frozen

Overfitting is the generalization gap at the end of fine-tuning: validation loss minus the mean
training loss of the last 10 steps.
"""

from __future__ import annotations

from pathlib import Path

from moekit.experiments import stages
from moekit.experiments.core import (
    Check,
    Context,
    RunRecord,
    Summary,
    Table,
    Variant,
    agrees,
    dense_ffn_hidden,
    fmt,
    train_variant,
)
from moekit.experiments.experiment import Experiment
from moekit.experiments.report import pyplot

TRAIN_GLOB = "unittest/test/test_[a-l]*.py"  # fine-tuning data, relative to the stdlib
VAL_GLOB = "unittest/test/test_[m-z]*.py"
NEARLY = 0.05  # nats: "nearly matches" / "hurts" threshold
PRETRAIN_MOE, PRETRAIN_DENSE = "pretrain MoE", "pretrain dense"
FULL, FREEZE_MOE, ONLY_MOE, EXPERT_DROPOUT, DENSE = (
    "full fine-tuning",
    "freeze MoE layers",
    "train only MoE layers",
    "expert dropout 0.4",
    "dense, full fine-tuning",
)
FREEZE = {FULL: "none", FREEZE_MOE: "moe", ONLY_MOE: "non_moe", EXPERT_DROPOUT: "none", DENSE: "none"}


def finetune_files() -> tuple[Path, str, str]:
    from moekit.data import stdlib_root

    root = Path(stdlib_root())
    return root, str(root / TRAIN_GLOB), str(root / VAL_GLOB)


class Finetune(Experiment):
    name = "finetune"
    title = "Fine-tuning: freezing strategies and expert dropout"
    paper = "ST-MoE (Zoph et al. 2022), section 4; Switch Transformers (Fedus et al. 2022), Table 4"
    claim = (
        "Sparse models overfit more than dense ones when fine-tuned; freezing the MoE layers nearly "
        "matches full fine-tuning while updating only the MoE layers (everything else frozen) hurts a "
        "lot (ST-MoE); a higher dropout inside the experts (0.4, with 0.1 elsewhere) fine-tunes better "
        "(Switch)."
    )

    def missing(self) -> str:
        root, train, val = finetune_files()
        if not list(root.glob(TRAIN_GLOB)) or not list(root.glob(VAL_GLOB)):
            return f"the fine-tuning data ({train} and {val}, Python's unittest test suite) is not installed"
        return ""

    def variants(self, ctx: Context) -> list[Variant]:
        base = ctx.base_config()
        return [
            Variant(PRETRAIN_MOE),
            Variant(PRETRAIN_DENSE, ("moe.enabled=false", f"model.ffn_hidden_dim={dense_ffn_hidden(base)}")),
            Variant(FULL, ("model.dropout=0.1", "moe.expert_dropout=0.1"), source=PRETRAIN_MOE),
            Variant(FREEZE_MOE, ("model.dropout=0.1", "moe.expert_dropout=0.1"), source=PRETRAIN_MOE),
            Variant(ONLY_MOE, ("model.dropout=0.1", "moe.expert_dropout=0.1"), source=PRETRAIN_MOE),
            Variant(EXPERT_DROPOUT, ("model.dropout=0.1", "moe.expert_dropout=0.4"), source=PRETRAIN_MOE),
            Variant(DENSE, ("model.dropout=0.1",), source=PRETRAIN_DENSE),
        ]

    def stage_settings(self, ctx: Context) -> tuple[str, ...]:
        _, train, val = finetune_files()
        schedule = (
            ("train.steps=4", "train.log_every=2", "train.eval_every=2", "train.eval_batches=1")
            if ctx.smoke
            else ("train.steps=150", "train.log_every=10", "train.eval_every=25", "train.eval_batches=4")
        )
        return (
            f'data.paths=["{train}"]',
            f'data.validation_paths=["{val}"]',
            "train.lr=1e-3",
            "train.warmup_steps=10" if not ctx.smoke else "train.warmup_steps=1",
            *schedule,
        )

    def run(self, ctx: Context, variant: Variant) -> RunRecord:
        if not variant.source:
            return train_variant(ctx, variant)
        return stages.finetune(ctx, variant, self.stage_settings(ctx), freeze=FREEZE[variant.label])

    def summarize(self, ctx: Context, records: list[RunRecord]) -> Summary:
        by_label = {r.label: r for r in records}
        rows = [
            [str(i), r.label, FREEZE.get(r.label, "(pre-training)"), fmt(r.val_loss), fmt(_gap(r))]
            for i, r in enumerate(records, 1)
        ]
        table = Table("", ["#", "run", "frozen", "final val loss", "val - train loss (end)"], rows)
        notes = [
            "Pre-training val loss is on the stdlib corpus; fine-tuning val loss on the held-out unittest "
            "test files. Fine-tuning: 150 steps at learning rate 1e-3, dropout 0.1 (see the commands).",
        ]
        return Summary([table], _checks(by_label), notes)

    def plot(self, records: list[RunRecord], path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in records:
            if r.label in FREEZE and r.val_curve:
                steps, vals, _ = zip(*r.val_curve)
                ax.plot(steps, vals, marker=".", label=r.label)
        ax.set(xlabel="fine-tuning step", ylabel="validation loss (unittest tests)", title="fine-tuning")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _gap(r: RunRecord) -> float | None:
    if r.val_loss is None or len(r.train_curve) < 1:
        return None
    tail = r.train_curve[-10:]
    return r.val_loss - sum(tail) / len(tail)


def _checks(by: dict[str, RunRecord]) -> list[Check]:
    def val(label: str) -> float | None:
        r = by.get(label)
        return r.val_loss if r is not None and r.ok else None

    full, frozen_moe, only_moe, dropout = val(FULL), val(FREEZE_MOE), val(ONLY_MOE), val(EXPERT_DROPOUT)
    checks = []
    if full is None or frozen_moe is None:
        checks.append(
            Check("Freezing the MoE layers nearly matches full fine-tuning.", "missing runs", "inconclusive")
        )
    else:
        checks.append(
            Check(
                f"Freezing the MoE layers nearly matches full fine-tuning (ST-MoE). Rule: within {NEARLY} nats.",
                f"frozen MoE {frozen_moe:.3f} vs full {full:.3f} ({frozen_moe - full:+.3f})",
                agrees(abs(frozen_moe - full) <= NEARLY),
            )
        )
    if full is None or only_moe is None or frozen_moe is None:
        checks.append(Check("Updating only the MoE layers hurts a lot.", "missing runs", "inconclusive"))
    else:
        checks.append(
            Check(
                f"Updating only the MoE layers (all else frozen) hurts a lot (ST-MoE). Rule: worse than full "
                f"fine-tuning by more than {NEARLY} nats and worse than freezing the MoE layers.",
                f"only MoE {only_moe:.3f} vs full {full:.3f} ({only_moe - full:+.3f})",
                agrees(only_moe - full > NEARLY and only_moe > frozen_moe),
            )
        )
    checks.append(
        Check(
            "Expert dropout 0.4 (0.1 elsewhere) fine-tunes better than 0.1 everywhere (Switch Table 4).",
            f"expert dropout 0.4: {fmt(dropout)} vs 0.1: {fmt(full)}",
            "inconclusive" if full is None or dropout is None else agrees(dropout < full),
        )
    )
    moe_gap = _gap(by[FULL]) if FULL in by and by[FULL].ok else None
    dense_gap = _gap(by[DENSE]) if DENSE in by and by[DENSE].ok else None
    checks.append(
        Check(
            "Sparse models overfit more than dense ones in fine-tuning (ST-MoE). Rule: larger "
            "val - train gap at the end of full fine-tuning.",
            f"gap MoE {fmt(moe_gap)} vs dense {fmt(dense_gap)}",
            "inconclusive" if moe_gap is None or dense_gap is None else agrees(moe_gap > dense_gap),
        )
    )
    return checks
