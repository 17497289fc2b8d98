"""capacity: quality, dropped tokens and step time against the capacity factor (Switch Table 1).

Capacity factor 1.0, 1.25, 2.0 and dropless for top-1 (Switch router) and top-2 routing, experts
of the same size (so top-2 spends twice the expert FLOPs, as in Switch's Table 1). Dropped
fraction is the mean over the logged training steps; step time is training seconds per step.
"""

from __future__ import annotations

from pathlib import Path

from moekit.experiments.core import Check, Context, RunRecord, Summary, Table, Variant, agrees, fmt
from moekit.experiments.experiment import Experiment
from moekit.experiments.report import pyplot

FACTORS = (1.0, 1.25, 2.0, None)  # None = dropless
ROUTERS = (("top-1", ("moe.top_k=1", "moe.router=switch")), ("top-2", ("moe.top_k=2", "moe.router=topk")))
QUALITY_SPREAD = 0.05  # nats: twice Switch's largest spread over CF 1.0-2.0 (0.025, top-2)


def _cf_name(cf: float | None) -> str:
    return "dropless" if cf is None else f"CF {cf:g}"


class Capacity(Experiment):
    name = "capacity"
    title = "Capacity factor: quality, dropped tokens, step time"
    paper = "Switch Transformers (Fedus et al. 2022), Table 1 and section 2.2"
    claim = (
        "Quality depends little on the capacity factor (neg. log perplexity, Switch top-1 CF 1.0/1.25/2.0: "
        "-1.561/-1.553/-1.554; top-2: -1.572/-1.559/-1.547), Switch top-1 beats top-2 at the low "
        "factors 1.0 and 1.25, a larger capacity costs time (hours to the quality threshold 62.8/65.0/72.8), "
        "and typically fewer than 1% of tokens are dropped."
    )

    def variants(self, ctx: Context) -> list[Variant]:
        out = []
        for router, router_sets in ROUTERS:
            for cf in FACTORS:
                value = "none" if cf is None else f"{cf}"
                out.append(
                    Variant(f"{router}, {_cf_name(cf)}", (*router_sets, f"moe.capacity_factor={value}"))
                )
        return out

    def summarize(self, ctx: Context, records: list[RunRecord]) -> Summary:
        rows = [
            [
                str(i),
                r.label.split(",")[0],
                _cf_name(cf),
                fmt(r.val_loss),
                _percent(r.dropped_fraction),
                _percent(r.dropped_fraction_end),
                fmt(r.seconds_per_step),
                "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
            ]
            for i, (r, cf) in enumerate(zip(records, FACTORS * len(ROUTERS)), 1)
        ]
        table = Table(
            "",
            [
                "#",
                "routing",
                "capacity",
                "final val loss",
                "dropped (training mean)",
                "dropped (last quarter)",
                "s/step",
                "tokens/s",
            ],
            rows,
        )
        grid = {(r.label.split(",")[0], cf): r for r, cf in zip(records, FACTORS * len(ROUTERS))}
        notes = [
            "Routers start from moekit's default init (moe.router_init_scale=1.0); Switch used 0.1x. "
            "Dropped fractions are over training batches (position priority); the training mean and the last "
            "quarter show how the load settles.",
        ]
        return Summary([table], _checks(grid), notes)

    def plot(self, records: list[RunRecord], path: Path) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        names = [_cf_name(cf) for cf in FACTORS]
        for router, _ in ROUTERS:
            rows = [r for r in records if r.label.startswith(router + ",")]
            for ax, values in zip(
                axes,
                (
                    [r.val_loss for r in rows],
                    [100 * (r.dropped_fraction or 0.0) for r in rows],
                    [r.seconds_per_step for r in rows],
                ),
            ):
                ax.plot(names, [float("nan") if v is None else v for v in values], marker="o", label=router)
        for ax, label in zip(axes, ("final validation loss", "dropped tokens (%)", "seconds per step")):
            ax.set(xlabel="capacity", ylabel=label)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _checks(grid: dict[tuple[str, float | None], RunRecord]) -> list[Check]:
    def val(router: str, cf: float | None) -> float | None:
        r = grid.get((router, cf))
        return r.val_loss if r is not None and r.ok else None

    checks = []
    spreads = {}
    for router, _ in ROUTERS:
        values = [val(router, cf) for cf in FACTORS]
        spreads[router] = None if None in values else max(values) - min(values)
    checks.append(
        Check(
            f"Quality depends little on the capacity factor (Switch: spread 0.008 top-1, 0.025 top-2 over CF "
            f"1.0-2.0). Rule: spread over CF 1.0, 1.25, 2.0, dropless <= {QUALITY_SPREAD} nats for both.",
            ", ".join(f"{k}: {fmt(v)} nats" for k, v in spreads.items()),
            "inconclusive" if None in spreads.values() else agrees(max(spreads.values()) <= QUALITY_SPREAD),
        )
    )
    pairs = [(cf, val("top-1", cf), val("top-2", cf)) for cf in (1.0, 1.25)]
    checks.append(
        Check(
            "Switch top-1 beats top-2 at capacity factors 1.0 and 1.25 (-1.561 vs -1.572, -1.553 vs -1.559).",
            "; ".join(f"CF {cf:g}: top-1 {fmt(a)} vs top-2 {fmt(b)}" for cf, a, b in pairs),
            "inconclusive"
            if any(a is None or b is None for _, a, b in pairs)
            else agrees(all(a < b for _, a, b in pairs)),
        )
    )
    times = {
        router: (grid[(router, 1.0)].seconds_per_step, grid[(router, 2.0)].seconds_per_step)
        for router, _ in ROUTERS
        if (router, 1.0) in grid and (router, 2.0) in grid
    }
    decided = times and all(a is not None and b is not None for a, b in times.values())
    checks.append(
        Check(
            "A larger capacity costs time (Switch top-1: 62.8 h at CF 1.0 vs 72.8 h at CF 2.0 to the same "
            "quality). Rule: seconds per step at CF 2.0 above CF 1.0 for both routings.",
            "; ".join(f"{k}: CF 2.0 {fmt(b)} s vs CF 1.0 {fmt(a)} s" for k, (a, b) in times.items()),
            agrees(all(b > a for a, b in times.values())) if decided else "inconclusive",
        )
    )
    drops = {router: grid[(router, 1.25)].dropped_fraction for router, _ in ROUTERS if (router, 1.25) in grid}
    checks.append(
        Check(
            "Few tokens are dropped: typically under 1% (Switch section 2.2). Rule: under 1% at CF 1.25.",
            ", ".join(f"{k} at CF 1.25: {'-' if v is None else f'{100 * v:.2f}%'}" for k, v in drops.items()),
            agrees(all(v < 0.01 for v in drops.values()))
            if drops and None not in drops.values()
            else "inconclusive",
        )
    )
    return checks
