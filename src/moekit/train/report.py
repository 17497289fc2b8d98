"""End-of-run report: loss curves, expert load over time, and a Markdown summary.

Reads the run folder's metrics.jsonl (one JSON object per logged step) and writes
    report/loss_curves.png    train and validation loss against step (and the unigram baseline)
    report/expert_load.png    one heatmap per MoE layer: share of routed assignments per expert over time
    report/summary.md         the final numbers, where the checkpoint is, and commands to try it
Plots use matplotlib's non-interactive Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _save_figure(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_losses(records: list[dict[str, Any]], path: Path, unigram: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (cross-entropy)")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    if unigram is not None:
        ax.axhline(unigram, color="gray", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)
    plt.close(fig)


def plot_expert_load(records: list[dict[str, Any]], path: Path) -> bool:
    """Heatmaps of per-expert load share over logged steps; False when the model has no MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    logged = [r for r in records if r.get("load")]
    if not logged:
        return False
    num_layers = len(logged[0]["load"])
    steps = [r["step"] for r in logged]
    fig, axes = plt.subplots(num_layers, 1, figsize=(8, 1.6 + 1.4 * num_layers), squeeze=False)
    for i in range(num_layers):
        load_SE = np.array([r["load"][i] for r in logged])  # [logged steps, E]
        ax = axes[i][0]
        num_experts = load_SE.shape[1]
        im = ax.imshow(
            load_SE.T,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, num_experts - 0.5, -0.5),
            vmin=0,
            vmax=max(2.0 / num_experts, load_SE.max()),
        )
        ax.set_ylabel(f"MoE layer {i}\nexpert")
        fig.colorbar(im, ax=ax, label="load share")
    axes[-1][0].set_xlabel("step")
    fig.suptitle("Expert load over training (share of routed assignments; 1/E = balanced)")
    _save_figure(fig, path)
    plt.close(fig)
    return True


def write_report(run_dir: Path, summary: dict[str, Any], checkpoint_dir: Path) -> Path:
    """Plots and summary.md into run_dir/report; returns the summary path."""
    report_dir = Path(run_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    unigram = summary.get("unigram_val_loss")
    plot_losses(records, report_dir / "loss_curves.png", unigram)
    has_load = plot_expert_load(records, report_dir / "expert_load.png")
    last = next((r for r in reversed(records) if "loss" in r), {})
    lines = [
        "# moekit training run",
        "",
        "| metric | value |",
        "|---|---|",
        f"| steps | {summary.get('step')} |",
        f"| tokens seen | {summary.get('tokens_seen'):,} |",
        f"| training time | {summary.get('training_seconds', 0):.0f} s |",
        f"| final train loss | {last.get('loss', float('nan')):.4f} |",
        f"| validation loss | {summary.get('val_loss', float('nan')):.4f} |",
        f"| validation perplexity | {summary.get('val_ppl', float('nan')):.2f} |",
    ]
    if unigram is not None:
        lines.append(f"| unigram baseline loss | {unigram:.4f} |")
    lines += [
        f"| parameters (total / active per token) | {summary.get('params_total'):,} / {summary.get('params_active'):,} |",
        f"| dropped-token fraction (last log) | {last.get('dropped_fraction', 0):.4f} |",
        f"| max load violation (last log) | {last.get('max_load_violation', 0):.3f} |",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    if has_load:
        lines += ["![expert load](expert_load.png)", ""]
    lines += [
        f"Checkpoint: `{checkpoint_dir}`",
        "",
        "Try it:",
        "",
        "```bash",
        f"moekit generate --ckpt {checkpoint_dir} --prompt 'def '",
        f"moekit eval --ckpt {checkpoint_dir}",
        "```",
        "",
    ]
    path = report_dir / "summary.md"
    tmp = path.with_name(".summary.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path
