"""moe-vs-dense: does an MoE reach the dense model's quality sooner at equal active FLOPs?

Three runs: the dense model of the same active FLOPs per token (`dense_baseline`), the 8-expert
top-2 MoE of experiments/moe-vs-dense.toml, and a top-1 (Switch router) MoE whose experts are
twice as wide, so all three spend the same FFN FLOPs per token. For each MoE: the step (and
training seconds) at which its validation curve first reaches the dense model's final validation
loss, interpolated between evaluations; the speedup is the dense run's steps (seconds) over that.
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
    dense_ffn_hidden,
    fmt,
    steps_to_reach,
)
from moekit.experiments.experiment import Experiment
from moekit.experiments.report import pyplot


class MoEVsDense(Experiment):
    name = "moe-vs-dense"
    title = "MoE vs dense at equal active FLOPs"
    paper = "Switch Transformers (Fedus et al. 2022), Figure 1 and section 3"
    claim = (
        "At equal FLOPs per token, sparse models reach the dense model's quality much sooner: "
        "Switch-Base (128 experts) reaches T5-Base's quality 7x faster in wall-clock time, and more "
        "experts give larger speedups."
    )

    def variants(self, ctx: Context) -> list[Variant]:
        base = ctx.base_config()
        hidden = base.moe["hidden_dim"]
        dense_hidden = dense_ffn_hidden(base)  # the top-2 model's FFN FLOPs (top-1 below matches)
        return [
            Variant("dense", ("moe.enabled=false", f"model.ffn_hidden_dim={dense_hidden}")),
            Variant("MoE top-2", ("moe.top_k=2", "moe.router=topk", f"moe.hidden_dim={hidden}")),
            Variant("MoE top-1", ("moe.top_k=1", "moe.router=switch", f"moe.hidden_dim={2 * hidden}")),
        ]

    def summarize(self, ctx: Context, records: list[RunRecord]) -> Summary:
        dense = records[0]
        target = dense.val_loss
        rows, step_speedups, time_speedups = [], [], []
        for i, r in enumerate(records, 1):
            reach = steps_to_reach(r.val_curve, target) if target is not None and r.ok else None
            step_up = time_up = None
            if reach is not None and r is not dense and dense.steps and dense.training_seconds:
                step_up = dense.steps / max(reach[0], 1e-9)
                time_up = dense.training_seconds / max(reach[1], 1e-9)
            if r is not dense:
                step_speedups.append(step_up)
                time_speedups.append(time_up)
            rows.append(
                [
                    str(i),
                    r.label,
                    _millions(r.params_active),
                    _millions(r.params_total),
                    _millions(r.flops_per_token),
                    fmt(r.val_loss),
                    "-" if reach is None else f"{reach[0]:.0f}",
                    "-" if reach is None else f"{reach[1]:.0f}",
                    "-" if step_up is None else f"{step_up:.2f}x",
                    "-" if time_up is None else f"{time_up:.2f}x",
                    fmt(r.seconds_per_step),
                ]
            )
        table = Table(
            "",
            [
                "#",
                "model",
                "active params (M)",
                "total params (M)",
                "fwd FLOPs/token (M)",
                "final val loss",
                "step reaching dense final",
                "seconds to reach",
                "speedup (steps)",
                "speedup (time)",
                "s/step",
            ],
            rows,
        )
        names = [r.label for r in records[1:]]
        checks = [
            _speedup_check("in fewer steps", names, step_speedups),
            _speedup_check("in less wall-clock time", names, time_speedups),
        ]
        notes = [
            "Speedup = the dense run's steps (training seconds) over the MoE run's steps (seconds) to "
            "reach the dense run's final validation loss; '-' = never reached within the run.",
            "Switch's 7x is for 128 experts at T5-Base scale on TPUs; here 8 experts, a 2-layer model "
            "and a CPU, where routing and dispatch add per-step overhead that accelerators hide.",
        ]
        return Summary([table], checks, notes)

    def plot(self, records: list[RunRecord], path: Path) -> None:
        plt = pyplot()
        fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
        for r in records:
            if r.val_curve:
                steps, losses, seconds = zip(*r.val_curve)
                by_step.plot(steps, losses, marker=".", label=r.label)
                by_time.plot(seconds, losses, marker=".", label=r.label)
        if records and records[0].val_loss is not None:
            for ax in (by_step, by_time):
                ax.axhline(records[0].val_loss, color="grey", linestyle=":", label="dense final")
        by_step.set(xlabel="step", ylabel="validation loss (nats)", title="per step")
        by_time.set(xlabel="training seconds", ylabel="validation loss (nats)", title="per second")
        by_step.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _millions(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _speedup_check(how: str, names: list[str], speedups: list[float | None]) -> Check:
    ours = ", ".join(f"{n}: {'not reached' if s is None else f'{s:.2f}x'}" for n, s in zip(names, speedups))
    return Check(
        f"MoE reaches the dense model's final quality {how} (Switch: 7x with 128 experts)",
        ours,
        agrees(bool(speedups) and all(s is not None and s > 1.0 for s in speedups)),
    )
