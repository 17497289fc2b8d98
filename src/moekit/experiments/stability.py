"""stability: router z-loss and router precision at a high learning rate, over seeds.

Four settings, three seeds each, at the high learning rate of experiments/stability.toml: float32
router without z-loss (the baseline), with z-loss 1e-3 (ST-MoE), a router whose math is rounded
through bfloat16 (`moe.router_dtype=bfloat16`, Switch's unstable case), and bf16 with z-loss.

A run counts as diverged when training stopped on NaN/Inf, when it ends no better than a unigram
model (validation loss >= the unigram model's), or when its loss ends more than 0.5 nats above
the best it reached (10-step means): a spike it never recovered from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moekit.experiments.core import (
    Check,
    Context,
    RunRecord,
    Summary,
    Table,
    Variant,
    agrees,
    by_group,
    fmt,
    mean,
    train_variant,
)
from moekit.experiments.experiment import Experiment
from moekit.experiments.report import pyplot

SEEDS = (1, 2, 3)
SETTINGS = (
    ("float32 router", ("moe.router_dtype=float32", "moe.z_loss_coef=0.0")),
    ("float32 router + z-loss", ("moe.router_dtype=float32", "moe.z_loss_coef=0.001")),
    ("bf16 router", ("moe.router_dtype=bfloat16", "moe.z_loss_coef=0.0")),
    ("bf16 router + z-loss", ("moe.router_dtype=bfloat16", "moe.z_loss_coef=0.001")),
)
SPIKE_NATS = 0.5  # loss ending this far above its best 10-step mean = an unrecovered spike
WINDOW = 10
EQUAL_QUALITY = 0.02  # nats: "at equal quality" tolerance for the z-loss check


def divergence(record: RunRecord) -> str:
    """Why the run counts as diverged, or "" when it does not."""
    if record.status == "nonfinite":
        return "NaN/Inf"
    unigram = record.unigram_val_loss
    if record.val_loss is not None and unigram is not None and record.val_loss >= unigram:
        return "no better than unigram"
    losses = record.train_curve
    if len(losses) >= 2 * WINDOW:
        means = [sum(losses[i : i + WINDOW]) / WINDOW for i in range(len(losses) - WINDOW + 1)]
        if means[-1] > min(means) + SPIKE_NATS:
            return f"ended {means[-1] - min(means):.2f} nats above its best"
    return ""


class Stability(Experiment):
    name = "stability"
    title = "Training stability: router z-loss and router precision"
    paper = "ST-MoE (Zoph et al. 2022), Table 4; Switch Transformers (Fedus et al. 2022), Table 2"
    claim = (
        "The router z-loss stabilizes training without hurting quality (ST-MoE: stable in 3/3 runs with "
        "z-loss vs 4/6 without, log perplexity -1.741 vs -1.755), and a bfloat16 router diverges where "
        "a float32 router trains (Switch: float32 router -1.716, bfloat16 router diverged at -3.780)."
    )

    def variants(self, ctx: Context) -> list[Variant]:
        seeds = SEEDS[:2] if ctx.smoke else SEEDS
        return [
            Variant(label, overrides, seed=s, group=label) for label, overrides in SETTINGS for s in seeds
        ]

    def run(self, ctx: Context, variant: Variant) -> RunRecord:
        keep: dict = {}
        record = train_variant(ctx, variant, keep=keep)
        if record.ok:
            record.extra.update(router_logit_stats(keep["trainer"]))
        return record

    def summarize(self, ctx: Context, records: list[RunRecord]) -> Summary:
        rows = []
        for i, r in enumerate(records, 1):
            why = divergence(r) if r.status != "skipped" else "not run"
            rows.append(
                [
                    str(i),
                    r.group,
                    str(r.seed),
                    str(r.steps),
                    fmt(r.val_loss),
                    fmt(r.extra.get("router_z"), 2),
                    fmt(r.extra.get("router_max_logit"), 2),
                    why or "no",
                ]
            )
        runs = Table(
            "Runs",
            ["#", "setting", "seed", "steps", "final val loss", "router z", "max router logit", "diverged"],
            rows,
        )
        stats, router_z = {}, {}
        for group, rs in by_group(records).items():
            ran = [r for r in rs if r.status != "skipped"]
            diverged = [r for r in ran if divergence(r)]
            stable_losses = [r.val_loss for r in ran if not divergence(r)]
            stats[group] = (len(diverged), len(ran), mean(stable_losses))
            router_z[group] = mean([r.extra.get("router_z") for r in ran])
        settings = Table(
            "Settings",
            ["setting", "diverged", "mean final val loss of the others", "mean router z"],
            [[g, f"{d}/{n}", fmt(m), fmt(router_z[g], 2)] for g, (d, n, m) in stats.items()],
        )
        notes = [
            f"Learning rate {ctx.base_config().train.lr:g} (10x the other experiments'), gradient clipping "
            "at norm 1.0 as in every run.",
            "Router z = mean over tokens and MoE layers of logsumexp(router logits)^2 after training, on "
            "validation text (what the z-loss penalizes); max router logit = the largest |logit| there.",
        ]
        return Summary([settings, runs], _checks(stats, router_z), notes)

    def plot(self, records: list[RunRecord], path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        colours = {label: f"C{i}" for i, (label, _) in enumerate(SETTINGS)}
        seen = set()
        for r in records:
            if not r.train_curve:
                continue
            label = r.group if r.group not in seen else None
            seen.add(r.group)
            ax.plot(
                range(1, len(r.train_curve) + 1),
                r.train_curve,
                color=colours.get(r.group),
                alpha=0.7,
                label=label,
            )
        ax.set(xlabel="step", ylabel="training loss (nats)", title="every seed of every setting")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


@torch.no_grad()
def router_logit_stats(trainer, windows: int = 16) -> dict[str, float]:
    """Router z (mean logsumexp^2) and the largest |logit| of the trained model on validation text."""
    model, seq = trainer.model, trainer.cfg.data.seq_len
    tokens = np.asarray(trainer.data.tokens.validation[: windows * seq], dtype=np.int64)
    n = len(tokens) // seq
    was_training = model.training
    model.eval()
    out = model(torch.as_tensor(tokens[: n * seq]).view(n, seq).to(trainer.device))
    model.train(was_training)
    z = [float(torch.logsumexp(lg, dim=-1).pow(2).mean()) for lg in out.router_logits]
    top = [float(lg.abs().max()) for lg in out.router_logits]
    return {"router_z": sum(z) / len(z), "router_max_logit": max(top)} if z else {}


def _checks(
    stats: dict[str, tuple[int, int, float | None]], router_z: dict[str, float | None]
) -> list[Check]:
    def counts(group: str) -> str:
        d, n, m = stats.get(group, (0, 0, None))
        return f"{group}: {d}/{n} diverged, others' loss {fmt(m)}"

    base, zloss, bf16 = (
        stats.get(g, (0, 0, None)) for g in ("float32 router", "float32 router + z-loss", "bf16 router")
    )
    checks = []
    if base[1] == 0 or zloss[1] == 0:
        outcome = "inconclusive"
    elif base[0] == 0:
        outcome = "inconclusive"  # the baseline never diverged: this setting cannot show the effect
    else:
        outcome = "agrees" if zloss[0] / zloss[1] < base[0] / base[1] else "disagrees"
    checks.append(
        Check(
            "The router z-loss makes divergence rarer (ST-MoE: 0/3 with z-loss vs 2/6 without). "
            "Inconclusive when the baseline never diverges.",
            f"{counts('float32 router')}; {counts('float32 router + z-loss')}",
            outcome,
        )
    )
    if base[2] is None or zloss[2] is None:
        outcome = "inconclusive"
    else:
        outcome = "agrees" if zloss[2] <= base[2] + EQUAL_QUALITY else "disagrees"
    checks.append(
        Check(
            f"The z-loss costs no quality (ST-MoE: -1.741 with vs -1.755 without). Rule: mean final loss of "
            f"the stable runs with z-loss at most {EQUAL_QUALITY} nats above without.",
            f"{fmt(zloss[2])} with vs {fmt(base[2])} without",
            outcome,
        )
    )
    z_base, z_with = router_z.get("float32 router"), router_z.get("float32 router + z-loss")
    checks.append(
        Check(
            "The z-loss keeps router logits small (ST-MoE section 3.2: large logits cause round-off "
            "errors in the router's exponentials). Rule: lower mean router z with the z-loss.",
            f"router z {fmt(z_with, 2)} with vs {fmt(z_base, 2)} without",
            "inconclusive" if z_base is None or z_with is None else agrees(z_with < z_base),
        )
    )
    if base[1] == 0 or bf16[1] == 0 or (base[0] == 0 and bf16[0] == 0) or base[0] == base[1]:
        outcome = "inconclusive"  # neither diverged, or float32 always did: the setting cannot tell
    else:
        outcome = "agrees" if bf16[0] / bf16[1] > base[0] / base[1] else "disagrees"
    checks.append(
        Check(
            "A bfloat16 router diverges where a float32 router trains (Switch Table 2). Inconclusive when "
            "neither diverges or float32 always does.",
            f"{counts('float32 router')}; {counts('bf16 router')}",
            outcome,
        )
    )
    return checks
