"""num-experts: does quality improve with the number of experts at equal FLOPs per token?

1 (the dense model of equal active FLOPs), 2, 4, 8, 16 and 32 experts with Switch top-1 routing
and experts as wide as the dense FFN (experiments/num-experts.toml), so only the parameter count
grows. Checks: the loss falls with more experts, and the gain per doubling shrinks.
"""

from __future__ import annotations

import math
from pathlib import Path

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
)
from moekit.experiments.experiment import Experiment
from moekit.experiments.report import pyplot

EXPERT_COUNTS = (1, 2, 4, 8, 16, 32)


class NumExperts(Experiment):
    name = "num-experts"
    title = "Number of experts at equal FLOPs"
    paper = "Switch Transformers (Fedus et al. 2022), Figure 4 and section 3.1"
    claim = (
        "At a fixed FLOP budget per token, more experts keep improving quality (Switch-Base from 1 to "
        "256 experts), with diminishing returns as the count grows."
    )

    def variants(self, ctx: Context) -> list[Variant]:
        base = ctx.base_config()
        out = []
        for n in EXPERT_COUNTS:
            if n == 1:
                out.append(
                    Variant(
                        "1 (dense)", ("moe.enabled=false", f"model.ffn_hidden_dim={dense_ffn_hidden(base)}")
                    )
                )
            else:
                out.append(Variant(f"{n} experts", (f"moe.num_experts={n}",)))
        return out

    def summarize(self, ctx: Context, records: list[RunRecord]) -> Summary:
        losses = [r.val_loss if r.ok else None for r in records]
        rows = []
        for i, (n, r) in enumerate(zip(EXPERT_COUNTS, records), 1):
            prev = losses[i - 2] if i > 1 else None
            gain = None if prev is None or losses[i - 1] is None else prev - losses[i - 1]
            rows.append(
                [
                    str(i),
                    str(n),
                    "-" if r.params_total is None else f"{r.params_total / 1e6:.2f}",
                    "-" if r.flops_per_token is None else f"{r.flops_per_token / 1e6:.2f}",
                    fmt(r.val_loss),
                    "-" if gain is None else f"{gain:+.3f}",
                    fmt(r.dropped_fraction),
                    fmt(r.seconds_per_step),
                ]
            )
        table = Table(
            "",
            [
                "#",
                "experts",
                "total params (M)",
                "fwd FLOPs/token (M)",
                "final val loss",
                "gain over half as many",
                "dropped",
                "s/step",
            ],
            rows,
        )
        notes = []
        trained = [(n, r) for n, r in zip(EXPERT_COUNTS, records) if n > 1 and r.ok and r.tokens_per_s]
        if trained:
            per_expert = ", ".join(
                f"{n}: {r.tokens_per_s * r.training_seconds / n / 1e3:.0f}k" for n, r in trained
            )
            notes.append(
                f"Tokens each expert trained on (per MoE layer, on average): {per_expert}; Switch's "
                "models saw orders of magnitude more, so many experts may be under-trained here."
            )
        return Summary([table], _checks(losses), notes)

    def plot(self, records: list[RunRecord], path: Path) -> None:
        plt = pyplot()
        fig, (final, curves) = plt.subplots(1, 2, figsize=(11, 4))
        points = [(n, r.val_loss) for n, r in zip(EXPERT_COUNTS, records) if r.val_loss is not None]
        if points:
            final.plot(*zip(*points), marker="o")
        final.set_xscale("log", base=2)
        final.set(xlabel="experts (1 = dense)", ylabel="final validation loss", title="equal FLOPs per token")
        for n, r in zip(EXPERT_COUNTS, records):
            if r.val_curve:
                steps, vals, _ = zip(*r.val_curve)
                curves.plot(steps, vals, marker=".", label=f"{n}")
        curves.set(xlabel="step", ylabel="validation loss", title="validation curves")
        curves.legend(title="experts")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _checks(losses: list[float | None]) -> list[Check]:
    if any(v is None for v in losses):
        ran = ", ".join(fmt(v) for v in losses)
        return [Check("More experts help, with diminishing returns", f"missing runs: {ran}", "inconclusive")]
    gains = [a - b for a, b in zip(losses, losses[1:])]  # 1->2, 2->4, ..., 16->32
    improving = sum(g > 0 for g in gains)
    helps = losses[-1] < losses[0] and improving >= len(gains) - 1
    curve = " -> ".join(f"{v:.3f}" for v in losses)
    first, last = sum(gains[:2]) / 2, sum(gains[-2:]) / 2
    help_check = Check(
        "More experts improve quality at equal FLOPs (Switch Figure 4: steadily better from 1 to 256 "
        "experts). Rule: 32 experts beat dense and at most one doubling fails to improve.",
        f"val loss for {', '.join(map(str, EXPERT_COUNTS))} experts: {curve} ({improving}/{len(gains)} "
        "doublings improve)",
        agrees(helps),
    )
    diminishing = Check(
        "Diminishing returns. Rule: the mean gain of the last two doublings (8->16->32) is smaller "
        "than that of the first two (1->2->4).",
        f"mean gain per doubling: first two {first:+.3f}, last two {last:+.3f} nats",
        agrees(last < first) if helps else "inconclusive",
    )
    return [help_check, diminishing] if math.isfinite(first) else [help_check]
