"""upcycle: sparse upcycling vs continued dense training (Komatsuzaki et al. 2023).

experiments/upcycle.toml pre-trains a dense model. From its checkpoint: `moekit upcycle` turns
every FFN into 8 copies (top-2, new routers, outputs unchanged) and `moekit finetune` continues
training for EXTRA steps; the dense model is continued the same way for the same extra training
FLOPs (more steps, since a dense step is cheaper) and for the same extra steps. Every stage uses
the same data files (the stdlib's top-level modules unless --set data.paths=... chooses others),
so continued training stays on the pre-training data and validation split.
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
    fmt,
    train_variant,
)
from moekit.experiments.experiment import Experiment
from moekit.experiments.report import pyplot

EXPERTS, TOP_K = 8, 2
EXTRA_STEPS, SMOKE_EXTRA_STEPS = 150, 4
DENSE, UPCYCLED, EQUAL_FLOPS, EQUAL_STEPS = (
    "dense pre-training",
    "upcycled, continued",
    "dense, continued (equal FLOPs)",
    "dense, continued (equal steps)",
)
DATA_KEYS = ("data.paths=", "data.validation_paths=", "data.validation_fraction=")


def data_overrides(ctx: Context) -> tuple[str, ...]:
    """The data every stage uses: the user's data overrides, else the stdlib's top-level modules."""
    from moekit.data import stdlib_root

    chosen = tuple(o for o in ctx.overrides if o.replace(" ", "").startswith(DATA_KEYS))
    if any(o.replace(" ", "").startswith("data.paths=") for o in chosen):
        return chosen
    return (f'data.paths=["{Path(stdlib_root()) / "*.py"}"]', *chosen)


def flops_ratio(ctx: Context) -> float:
    """Training FLOPs per token of the upcycled model over the dense model's."""
    from moekit.adapt.upcycle import upcycled_config
    from moekit.model.flops import flops_per_token

    base = ctx.base_config()
    dense = base.model_config(base.data.vocab_size)
    sparse = upcycled_config(dense, EXPERTS, TOP_K)
    seq = base.data.seq_len
    return flops_per_token(sparse, seq).total / flops_per_token(dense, seq).total


class Upcycle(Experiment):
    name = "upcycle"
    title = "Sparse upcycling vs continued dense training"
    paper = "Sparse Upcycling (Komatsuzaki et al. 2023), sections 4.1-4.2"
    claim = (
        "Upcycling a trained dense model into an MoE (every FFN copied into the experts, new router) and "
        "continuing to train it beats continuing to train the dense model for the same extra compute."
    )

    def extra_steps(self, ctx: Context) -> int:
        return SMOKE_EXTRA_STEPS if ctx.smoke else EXTRA_STEPS

    def variants(self, ctx: Context) -> list[Variant]:
        equal_flops_steps = round(self.extra_steps(ctx) * flops_ratio(ctx))
        return [
            Variant(DENSE, data_overrides(ctx)),
            Variant(UPCYCLED, (f"train.steps={self.extra_steps(ctx)}",), source=DENSE),
            Variant(EQUAL_FLOPS, (f"train.steps={equal_flops_steps}",), source=DENSE),
            Variant(EQUAL_STEPS, (f"train.steps={self.extra_steps(ctx)}",), source=DENSE),
        ]

    def stage_settings(self, ctx: Context) -> tuple[str, ...]:
        schedule = (
            ("train.log_every=2", "train.eval_every=2", "train.eval_batches=1", "train.warmup_steps=1")
            if ctx.smoke
            else (
                "train.log_every=10",
                "train.eval_every=50",
                "train.eval_batches=4",
                "train.warmup_steps=10",
            )
        )
        return (*data_overrides(ctx), "train.lr=1e-3", *schedule)

    def run(self, ctx: Context, variant: Variant) -> RunRecord:
        if not variant.source:
            return train_variant(ctx, variant)
        if variant.label == UPCYCLED:
            return stages.upcycle_and_finetune(
                ctx, variant, self.stage_settings(ctx), experts=EXPERTS, top_k=TOP_K
            )
        return stages.finetune(ctx, variant, self.stage_settings(ctx))

    def summarize(self, ctx: Context, records: list[RunRecord]) -> Summary:
        rows = [
            [
                str(i),
                r.label,
                str(r.steps),
                "-" if r.flops_per_token is None else f"{r.flops_per_token / 1e6:.2f}",
                "-" if r.flops_per_token is None else f"{3 * r.flops_per_token * _tokens(r) / 1e12:.2f}",
                fmt(r.val_loss),
                fmt(r.training_seconds, 0),
            ]
            for i, r in enumerate(records, 1)
        ]
        table = Table(
            "",
            [
                "#",
                "run",
                "steps",
                "fwd FLOPs/token (M)",
                "training TFLOP (~3x fwd)",
                "final val loss",
                "seconds",
            ],
            rows,
        )
        by = {r.label: r for r in records}
        notes = [
            f"Upcycled: {EXPERTS} experts, top-{TOP_K}, each a copy of the dense FFN, so a step costs "
            f"{flops_ratio(ctx):.2f}x the dense FLOPs; the equal-FLOPs dense continuation runs that many "
            "times the steps. Continued training: learning rate 1e-3 with 10 warmup steps, cosine decay.",
        ]
        return Summary([table], _checks(by), notes)

    def plot(self, records: list[RunRecord], path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in records:
            if r.val_curve and r.label != DENSE and r.flops_per_token:
                steps, vals, _ = zip(*r.val_curve)
                per_step = 3 * r.flops_per_token * _tokens(r) / max(r.steps, 1)
                ax.plot([s * per_step / 1e12 for s in steps], vals, marker=".", label=r.label)
        ax.set(xlabel="extra training TFLOP", ylabel="validation loss (nats)", title="continued training")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _tokens(r: RunRecord) -> float:
    """Tokens the run trained on (steps x tokens per step, from its throughput)."""
    if r.tokens_per_s is None or r.training_seconds is None:
        return 0.0
    return r.tokens_per_s * r.training_seconds


def _checks(by: dict[str, RunRecord]) -> list[Check]:
    def val(label: str) -> float | None:
        r = by.get(label)
        return r.val_loss if r is not None and r.ok else None

    up, flops = val(UPCYCLED), val(EQUAL_FLOPS)
    return [
        Check(
            "Upcycling beats continued dense training at equal extra compute (Komatsuzaki et al. 2023).",
            f"upcycled {fmt(up)} vs dense continued for the same FLOPs {fmt(flops)} (same steps: "
            f"{fmt(val(EQUAL_STEPS))})",
            "inconclusive" if up is None or flops is None else agrees(up < flops),
        )
    ]
