"""balance: no balancing vs the Switch auxiliary loss vs DeepSeek-V3's auxiliary-loss-free bias.

Three settings, two seeds each (experiments/balance.toml, top-2 of 8 experts): softmax top-k
without any balancing loss; softmax top-k with the Switch loss (coefficient 1e-2); and the
sigmoid_bias router without a balancing loss, whose per-expert bias the trainer nudges after every
step (b_i += 1e-3 * sign(mean load - load_i)). The max load violation (max load / mean load - 1 on
the training batches, averaged over MoE layers) is the mean over the last quarter of training.
"""

from __future__ import annotations

from pathlib import Path

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
)
from moekit.experiments.experiment import Experiment
from moekit.experiments.report import pyplot

SEEDS = (1, 2)
NONE, AUX, FREE = "no balancing", "Switch aux loss", "aux-loss-free bias"
SETTINGS = (
    (NONE, ("moe.router=topk", "moe.load_balance_coef=0.0")),
    (AUX, ("moe.router=topk", "moe.load_balance_coef=0.01")),
    (FREE, ("moe.router=sigmoid_bias", "moe.load_balance_coef=0.0", "moe.bias_update_rate=0.001")),
)


class Balance(Experiment):
    name = "balance"
    title = "Load balancing: none, auxiliary loss, auxiliary-loss-free bias"
    paper = "DeepSeek-V3 (2024), sections 2.1.2 and 4.5.2; Wang et al. 2024 (Loss-Free Balancing)"
    claim = (
        "Auxiliary-loss-free balancing (a per-expert bias on the selection, updated from the load) "
        "balances the experts better than an auxiliary loss and gives a better model, because no "
        "balancing gradient interferes with the language-modelling loss."
    )

    def variants(self, ctx: Context) -> list[Variant]:
        return [
            Variant(label, overrides, seed=s, group=label) for label, overrides in SETTINGS for s in SEEDS
        ]

    def summarize(self, ctx: Context, records: list[RunRecord]) -> Summary:
        rows = [
            [str(i), r.group, str(r.seed), fmt(r.max_load_violation), fmt(r.val_loss)]
            for i, r in enumerate(records, 1)
        ]
        runs = Table("Runs", ["#", "balancing", "seed", "max load violation", "final val loss"], rows)
        stats = {
            g: (mean([r.max_load_violation for r in rs if r.ok]), mean([r.val_loss for r in rs if r.ok]))
            for g, rs in by_group(records).items()
        }
        settings = Table(
            "Means over seeds",
            ["balancing", "max load violation", "final val loss"],
            [[g, fmt(v), fmt(loss)] for g, (v, loss) in stats.items()],
        )
        return Summary([settings, runs], _checks(stats))

    def plot(self, records: list[RunRecord], path: Path) -> None:
        plt = pyplot()
        fig, (vio, val) = plt.subplots(1, 2, figsize=(11, 4))
        groups = by_group(records)
        names = list(groups)
        for i, rs in enumerate(groups.values()):
            for r in rs:
                if r.max_load_violation is not None:
                    vio.scatter([i], [r.max_load_violation], color=f"C{i}")
                if r.val_loss is not None:
                    val.scatter([i], [r.val_loss], color=f"C{i}")
        for ax, label in ((vio, "max load violation (last quarter)"), (val, "final validation loss")):
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=10)
            ax.set(ylabel=label)
        fig.suptitle("every seed of every setting")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _checks(stats: dict[str, tuple[float | None, float | None]]) -> list[Check]:
    (v_none, _), (v_aux, l_aux), (v_free, l_free) = (stats.get(g, (None, None)) for g in (NONE, AUX, FREE))
    checks = []
    if v_aux is None or v_free is None:
        outcome = "inconclusive"
    else:
        outcome = agrees(v_free < v_aux)
    checks.append(
        Check(
            "Aux-loss-free balancing balances better than the auxiliary loss (lower max load violation).",
            f"max load violation: aux-free {fmt(v_free)}, aux loss {fmt(v_aux)}, none {fmt(v_none)}",
            outcome,
        )
    )
    checks.append(
        Check(
            "Aux-loss-free balancing gives a better model than the auxiliary loss (lower validation loss).",
            f"val loss: aux-free {fmt(l_free)}, aux loss {fmt(l_aux)}",
            "inconclusive" if l_aux is None or l_free is None else agrees(l_free < l_aux),
        )
    )
    return checks
