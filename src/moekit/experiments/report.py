"""Writing experiment results: one Markdown fragment, JSON and PNG per experiment, and the
collected results.md.

Layout under an output folder OUT (docs/ for `make experiments`):

    OUT/results.md              every experiment's fragment in order, "not yet run" for the rest
    OUT/results/<name>.md       the fragment: claim, verdict, checks, tables, plot, commands
    OUT/results/<name>.json     the same numbers, machine-readable (every run's record)
    OUT/results/<name>.png      the plot
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.experiments.core import RunRecord, Summary, Table, record_to_dict

if TYPE_CHECKING:
    from moekit.experiments.experiment import Experiment

RESULTS_FILE = "results.md"


def results_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "results"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(table: Table) -> list[str]:
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table.rows]
    return lines + [""]


def machine_line(wall_seconds: float) -> str:
    import torch

    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = f"{os.getloadavg()[0]:.1f}"
    return (
        f"Ran {datetime.date.today().isoformat()} with moekit {code_version()} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}), torch {torch.__version__}, in {wall_seconds / 60:.1f} min of wall-clock; "
        f"1-minute load average at the end: {load} (the CPU is shared, so times are only comparable within "
        "one experiment)."
    )


def code_version() -> str:
    """The source checkout's commit, with "+ uncommitted changes" when src/ differs from it; the
    numbers of a run depend on the exact code (e.g. the order of sums in the expert kernels)."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "--short=10", "HEAD")
        dirty = git("status", "--porcelain", "--", "src", "experiments")
    except (OSError, subprocess.SubprocessError):
        return "(version unknown)"
    if not commit:
        return "(not a git checkout)"
    return f"commit {commit}" + (" + uncommitted changes" if dirty else "")


def write_fragment(
    experiment: Experiment,
    out_dir: Path,
    records: list[RunRecord],
    summary: Summary,
    verdict: str,
    wall_seconds: float,
    *,
    smoke: bool,
    png: Path | None,
    budget_minutes: float,
    machine: str,
    context: dict[str, Any],
) -> Path:
    """Write results/<name>.md and results/<name>.json; return the Markdown path."""
    folder = results_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = experiment.name
    lines = [f"## {experiment.title} (`moekit experiment {name}`)", ""]
    if smoke:
        lines += ["> **Smoke run**: a few steps of a tiny model, to test the pipeline. Not evidence.", ""]
    lines += [f"**Paper** ({experiment.paper}): {experiment.claim}", "", f"**Verdict: {verdict}.**", ""]
    if summary.checks:
        lines += ["| claim (paper) | ours | outcome |", "|---|---|---|"]
        lines += [f"| {c.claim} | {c.ours} | {c.outcome} |" for c in summary.checks]
        lines.append("")
    for table in summary.tables:
        lines += markdown_table(table)
    if png is not None:
        lines += [f"![{name}](results/{png.name})", ""]
    for i, r in enumerate(records, 1):
        if r.status == "failed":
            lines += [f"**Run #{i} ({r.label}) failed**: {r.error}", ""]
    skipped = [(i, r) for i, r in enumerate(records, 1) if r.status == "skipped"]
    if skipped:
        reasons = "; ".join(f"#{i} {r.label}: {r.error}" for i, r in skipped)
        lines += [
            f"**{len(skipped)} of {len(records)} runs were not run** (budget {budget_minutes:g} min per "
            f"experiment): {reasons}. Their rows are empty; the checks use only the runs that ran.",
            "",
        ]
    for note in summary.notes:
        lines += [f"- {note}"]
    if summary.notes:
        lines.append("")
    if records:
        lines += ["Commands (from the repository root; run # as in the tables):", "", "```bash"]
        for i, r in enumerate(records, 1):
            lines += [f"# {i}: {r.label}, seed {r.seed}", r.command]
        lines += ["```", ""]
    lines += [machine, ""]
    md = folder / f"{name}.md"
    _write(md, "\n".join(lines))
    data: dict[str, Any] = {
        "name": name,
        "title": experiment.title,
        "paper": experiment.paper,
        "claim": experiment.claim,
        "verdict": verdict,
        "smoke": smoke,
        "wall_seconds": wall_seconds,
        "budget_minutes": budget_minutes,
        "machine": machine,
        **context,
        "checks": [vars(c) for c in summary.checks],
        "tables": [vars(t) for t in summary.tables],
        "notes": summary.notes,
        "records": [record_to_dict(r) for r in records],
    }
    _write(folder / f"{name}.json", json.dumps(data, indent=1))
    return md


def write_results_index(out_dir: Path, experiments: list[Experiment]) -> Path:
    """results.md: every experiment's fragment in order; those without results say so."""
    out_dir = Path(out_dir)
    lines = [
        "# Experiments: moekit against the papers' claims",
        "",
        "Each experiment is a base config in `experiments/<name>.toml` plus variants given as "
        "`--set` overrides; `make experiments` (or `moekit experiment all`) reruns everything and "
        "rewrites this page, `moekit experiment NAME` one experiment. Models are small (dim 128, "
        "2 layers, a few hundred steps on the stdlib corpus, one torch thread) so each experiment fits "
        "in about ten minutes on a 2-core CPU: the verdicts say whether the papers' direction holds at "
        "this scale, not their magnitudes. Verdicts are computed from the numbers by fixed rules in "
        "`src/moekit/experiments/` (each check states its rule). One seed unless a table shows several; "
        "the multi-seed tables (stability, balance) show how far seeds alone move the numbers, so read "
        "small differences elsewhere with that in mind.",
        "",
    ]
    status = []
    for exp in experiments:
        fragment = results_dir(out_dir) / f"{exp.name}.md"
        data_file = results_dir(out_dir) / f"{exp.name}.json"
        verdict = json.loads(data_file.read_text())["verdict"] if data_file.exists() else "not yet run"
        status.append(f"| [{exp.title}](#{_anchor(exp)}) | `{exp.name}` | {verdict} |")
    lines += ["| experiment | name | verdict |", "|---|---|---|", *status, ""]
    for exp in experiments:
        fragment = results_dir(out_dir) / f"{exp.name}.md"
        if fragment.exists():
            lines.append(fragment.read_text(encoding="utf-8"))
        else:
            lines += [
                f"## {exp.title} (`moekit experiment {exp.name}`)",
                "",
                f"**Paper** ({exp.paper}): {exp.claim}",
                "",
                f"**Not yet run.** Run it with `moekit experiment {exp.name}`.",
                "",
            ]
    path = out_dir / RESULTS_FILE
    _write(path, "\n".join(lines))
    return path


def _anchor(exp: Experiment) -> str:
    """GitHub's anchor of the fragment's heading."""
    text = f"{exp.title} (moekit experiment {exp.name})".lower()
    return "".join(ch for ch in text.replace(" ", "-") if ch.isalnum() or ch in "-_")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
