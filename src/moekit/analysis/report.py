"""The routing report: a self-contained HTML page (PNG plots embedded as data URIs, opens offline)
and a Markdown summary with the same numbers.

Sections: per-layer load table (tokens per expert, dropped fraction, router entropy, max load
violation), load per expert and load over training (from the run's metrics.jsonl), expert
specialization over Python token categories with the mutual information I(expert; category) per
layer, the most frequent tokens of each expert, and a passage with every token coloured by its
top-1 expert. Encoder-decoder models show encoder and decoder side by side.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from moekit.analysis.categories import CATEGORIES
from moekit.analysis.routing import RoutingAnalysis, entropy_bits, mutual_information
from moekit.data import Tokenizer

PALETTE = [
    "#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
    "#d9d9d9", "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#fb9a99", "#cab2d6", "#b2df8a",
]  # fmt: skip


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_summary(analysis: RoutingAnalysis) -> list[dict[str, Any]]:
    """The numbers of every layer, as plain Python values (what the Markdown and tests read)."""
    rows = []
    for layer in analysis.layers:
        joint = analysis.joint_counts(layer)
        rows.append(
            {
                "layer": layer.name,
                "side": layer.side,
                "tokens_per_expert": layer.kept_per_expert.astype(int).tolist(),
                "routed_per_expert": layer.routed_per_expert.astype(int).tolist(),
                "dropped_fraction": layer.dropped_fraction,
                "router_entropy": layer.router_entropy,
                "max_load_violation": layer.max_load_violation,
                "mutual_information_bits": mutual_information(joint),
                "category_entropy_bits": entropy_bits(joint.sum(axis=0)),
            }
        )
    return rows


def plot_load(analysis: RoutingAnalysis) -> str:
    plt = _pyplot()
    n = len(analysis.layers)
    fig, axes = plt.subplots(1, n, figsize=(max(4, 3.2 * n), 3), squeeze=False)
    for ax, layer in zip(axes[0], analysis.layers):
        share = layer.routed_per_expert / max(layer.routed_per_expert.sum(), 1)
        ax.bar(range(layer.num_experts), share, color="#4c72b0")
        ax.axhline(1 / layer.num_experts, color="gray", linestyle="--", linewidth=1)
        ax.set_title(layer.name, fontsize=9)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("share of routed assignments")
    fig.suptitle("Load per expert (dashed: perfect balance)", y=1.04)
    return _png(fig)


def plot_specialization(analysis: RoutingAnalysis) -> str:
    plt = _pyplot()
    n = len(analysis.layers)
    fig, axes = plt.subplots(1, n, figsize=(max(5, 3.6 * n), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], analysis.layers):
        joint = analysis.joint_counts(layer).astype(float)
        cat_share = joint.sum(axis=0) / max(joint.sum(), 1)
        per_expert = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1)
        with np.errstate(divide="ignore", invalid="ignore"):  # absent categories stay blank (NaN)
            lift = np.where(
                cat_share > 0, per_expert / cat_share, np.nan
            )  # > 1: over-represented in the expert
        im = ax.imshow(lift, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2)
        ax.set_yticks(range(layer.num_experts))
        ax.set_xticks(range(len(CATEGORIES)), CATEGORIES, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("expert")
        ax.set_title(f"{layer.name}\nMI {mutual_information(joint.astype(int)):.3f} bits", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="share in expert / share overall")
    fig.suptitle("Expert specialization over Python token categories (top-1 expert)", y=1.06)
    return _png(fig)


def plot_mutual_information(rows: list[dict[str, Any]]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    colors = {"encoder": "#dd8452", "decoder": "#4c72b0"}
    ax.bar(
        range(len(rows)),
        [r["mutual_information_bits"] for r in rows],
        color=[colors[r["side"]] for r in rows],
    )
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("I(expert; category), bits")
    ax.set_title("How much the expert choice says about the token category")
    return _png(fig)


def plot_load_over_training(metrics_path: Path | None) -> str | None:
    if metrics_path is None or not metrics_path.exists():
        return None
    from moekit.train.report import plot_expert_load, read_metrics

    tmp = metrics_path.parent / ".analysis_load_over_training.png"
    try:
        if not plot_expert_load(read_metrics(metrics_path), tmp):
            return None
        return base64.b64encode(tmp.read_bytes()).decode("ascii")
    finally:
        tmp.unlink(missing_ok=True)


def coloured_passage(
    analysis: RoutingAnalysis, tokenizer: Tokenizer, layer_index: int, max_tokens: int = 400
) -> str:
    """The first analysed document, every token coloured by its top-1 expert in the layer; tokens
    the layer did not see (an encoder-decoder's other side) stay grey."""
    if analysis.passage is None:
        return ""
    text, offsets, ids = analysis.passage
    layer = analysis.layers[layer_index]
    where = analysis.passage_index[layer.side]
    top1 = layer.top1_N
    parts = []
    for (start, end), at in list(zip(offsets, where))[:max_tokens]:
        piece = html.escape(text[start:end])
        if at < 0:
            parts.append(
                f'<span style="background:#e0e0e0" title="not on the {layer.side} side">{piece}</span>'
            )
            continue
        e = int(top1[at])
        color = PALETTE[e % len(PALETTE)] if e >= 0 else "#ffffff"
        parts.append(f'<span style="background:{color}" title="expert {e}">{piece}</span>')
    legend = " ".join(
        f'<span style="background:{PALETTE[e % len(PALETTE)]};padding:0 4px">expert {e}</span>'
        for e in range(layer.num_experts)
    )
    return f"<p>{legend}</p><pre class='passage'>{''.join(parts)}</pre>"


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]).replace("\n", "\\n") or f"<{token_id}>"


def write_analysis_report(
    analysis: RoutingAnalysis,
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    title: str,
    metrics_path: Path | None = None,
) -> dict[str, Any]:
    """Write report.html and summary.md into out_dir; return the numbers (also saved as analysis.json)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = layer_summary(analysis)
    images = {
        "load per expert": plot_load(analysis),
        "expert specialization": plot_specialization(analysis),
        "mutual information per layer": plot_mutual_information(rows),
    }
    over_time = plot_load_over_training(metrics_path)
    if over_time is not None:
        images["load over training"] = over_time
    top_tokens = {
        layer.name: [
            [(_token_text(tokenizer, t), c) for t, c in experts] for experts in analysis.top_tokens(layer)
        ]
        for layer in analysis.layers
    }
    # the passage coloured by the last layer of each side (encoder and decoder side by side)
    passage_layers = {layer.side: i for i, layer in enumerate(analysis.layers)}
    sides = sorted({r["side"] for r in rows})
    side_mi = {
        s: float(np.mean([r["mutual_information_bits"] for r in rows if r["side"] == s])) for s in sides
    }

    table = "".join(
        f"<tr><td>{r['layer']}</td><td>{r['side']}</td><td>{r['tokens_per_expert']}</td>"
        f"<td>{r['dropped_fraction']:.4f}</td><td>{r['router_entropy']:.3f}</td><td>{r['max_load_violation']:.3f}</td>"
        f"<td>{r['mutual_information_bits']:.4f}</td></tr>"
        for r in rows
    )
    tokens_html = ""
    for name, experts in top_tokens.items():
        cells = "".join(
            f"<tr><td>{e}</td><td>{html.escape(', '.join(f'{t!r} ({c})' for t, c in toks))}</td></tr>"
            for e, toks in enumerate(experts)
        )
        tokens_html += f"<h3>{html.escape(name)}</h3><table><tr><th>expert</th><th>most frequent tokens (count)</th></tr>{cells}</table>"
    figures = "".join(
        f'<figure><img alt="{html.escape(k)}" src="data:image/png;base64,{v}"/><figcaption>{html.escape(k)}</figcaption></figure>'
        for k, v in images.items()
    )
    passages = "".join(
        f"<h2>A passage coloured by top-1 expert ({html.escape(analysis.layers[i].name)})</h2>"
        + coloured_passage(analysis, tokenizer, i)
        for i in passage_layers.values()
    )
    side_text = ", ".join(f"{s}: {v:.4f} bits" for s, v in side_mi.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}img{{max-width:100%}}
pre.passage{{white-space:pre-wrap;font-size:13px;line-height:1.5}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Per layer</h2><table><tr><th>layer</th><th>side</th><th>tokens per expert</th><th>dropped fraction</th>
<th>router entropy (nats)</th><th>max load violation</th><th>I(expert; category) bits</th></tr>{table}</table>
<p>Mean mutual information by side: {html.escape(side_text)}</p>
<h2>Plots</h2>{figures}
<h2>Most frequent tokens per expert</h2>{tokens_html}
{passages}
</body></html>
"""
    md = [
        f"# {title}",
        "",
        "| layer | side | tokens per expert | dropped | entropy | max load violation | MI (bits) |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['layer']} | {r['side']} | {r['tokens_per_expert']} | {r['dropped_fraction']:.4f} | {r['router_entropy']:.3f} "
        f"| {r['max_load_violation']:.3f} | {r['mutual_information_bits']:.4f} |"
        for r in rows
    ]
    md += [
        "",
        f"Mean I(expert; category) by side: {side_text}.",
        "",
        "## Most frequent tokens per expert",
        "",
    ]
    for name, experts in top_tokens.items():
        md.append(
            f"**{name}**: "
            + "; ".join(f"e{e}: " + ", ".join(repr(t) for t, _ in toks[:5]) for e, toks in enumerate(experts))
        )
        md.append("")
    md.append("Plots and the coloured passage: report.html.")
    _write(out_dir / "report.html", page)
    _write(out_dir / "summary.md", "\n".join(md) + "\n")
    numbers = {"layers": rows, "mean_mutual_information_by_side": side_mi, "top_tokens": top_tokens}
    import json

    _write(out_dir / "analysis.json", json.dumps(numbers, indent=2))
    return numbers


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
