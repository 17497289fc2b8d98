"""The `Experiment` base class and `run_experiment`, which runs one and writes its results.

A subclass names its paper claim and defines three things:

    variants(ctx)           the runs, as overrides on experiments/<name>.toml
    summarize(ctx, records) tables and checks (claim, our number, agrees or not)
    plot(records, path)     one PNG

and may replace `run(ctx, variant)` for runs that are more than one training (fine-tuning after
pre-training, distillation after a teacher), and `missing()` when it needs something this
install lacks. `run_experiment` runs the variants within a time budget and writes
results/<name>.{md,json,png} under the output folder; `rerender` rebuilds those from the saved
records; the command line then rebuilds the collected results.md (see report.py).
"""

from __future__ import annotations

import abc
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.experiments import report
from moekit.experiments.core import (
    Context,
    RunRecord,
    Summary,
    Variant,
    overall_verdict,
    record_from_dict,
    run_variants,
    train_variant,
)


class Experiment(abc.ABC):
    """One paper claim checked on this machine: subclasses say which runs to make (`variants`),
    how to judge them (`summarize`) and how to draw them (`plot`); running is shared."""

    name = ""
    title = ""
    paper = ""  # the source, e.g. "Switch Transformers (Fedus et al. 2022), Table 1"
    claim = ""  # the paper's claim with its numbers

    @abc.abstractmethod
    def variants(self, ctx: Context) -> list[Variant]:
        """The runs this experiment makes (a base config plus `--set` overrides each)."""

    def run(self, ctx: Context, variant: Variant) -> RunRecord:
        return train_variant(ctx, variant)

    @abc.abstractmethod
    def summarize(self, ctx: Context, records: list[RunRecord]) -> Summary:
        """The results table and the verdict on the paper's claim, by the experiment's fixed rule."""

    @abc.abstractmethod
    def plot(self, records: list[RunRecord], path: Path) -> None:
        """Draw the runs' curves or bars into the PNG at `path`."""

    def missing(self) -> str:
        """Why this experiment cannot run in this checkout ("" when it can)."""
        return ""


@dataclass
class ExperimentResult:
    name: str
    records: list[RunRecord]
    summary: Summary
    verdict: str
    wall_seconds: float
    out_dir: Path
    fragment: Path  # results/<name>.md


def default_config_dir() -> Path:
    """experiments/ of the source checkout (src/moekit/experiments -> repository root), else of
    the working directory."""
    checkout = Path(__file__).resolve().parents[3] / "experiments"
    return checkout if checkout.is_dir() else Path.cwd() / "experiments"


def guard_smoke_output(out_dir: Path) -> None:
    """Smoke results are not evidence: they never go into the repository's docs/ folder."""
    docs = (Path(__file__).resolve().parents[3] / "docs").resolve()
    out = out_dir.resolve()
    if out == docs or docs in out.parents:
        raise ValueError(f"--smoke writes to a temporary folder, never into {docs}: choose another --out")


def run_experiment(
    experiment: Experiment,
    out_dir: Path | None = None,
    *,
    smoke: bool = False,
    runs_dir: Path | None = None,
    overrides: tuple[str, ...] = (),
    budget_minutes: float = 30.0,
    config_dir: Path | None = None,
) -> ExperimentResult:
    """Run every variant of `experiment` and write its results under out_dir (default: docs/,
    or a new temporary folder in smoke mode); run folders go to runs_dir (default:
    runs/experiments, or out_dir/runs in smoke mode)."""
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="moekit-smoke-")) if smoke else Path("docs")
    if smoke:
        guard_smoke_output(out_dir)
    if runs_dir is None:
        runs_dir = out_dir / "runs" if smoke else Path("runs") / "experiments"
    config_path = (config_dir or default_config_dir()) / f"{experiment.name}.toml"
    if not config_path.is_file():
        raise FileNotFoundError(f"experiment config {str(config_path)!r} does not exist")
    start = time.monotonic()
    deadline = start + budget_minutes * 60 if budget_minutes > 0 else math.inf
    ctx = Context(experiment.name, config_path, runs_dir, smoke, tuple(overrides), deadline)
    print(f"experiment {experiment.name}{' (smoke)' if smoke else ''}: {experiment.title}", flush=True)
    records: list[RunRecord] = []
    if not experiment.missing():
        threads = torch.get_num_threads()  # runs may set train.threads; leave the process as found
        try:
            records = run_variants(ctx, experiment.variants(ctx), experiment.run)
        finally:
            torch.set_num_threads(threads)
    wall = time.monotonic() - start
    result = write_results(experiment, ctx, records, out_dir, wall, report.machine_line(wall), budget_minutes)
    print(f"  verdict: {result.verdict}; results: {result.fragment}", flush=True)
    return result


def write_results(
    experiment: Experiment,
    ctx: Context,
    records: list[RunRecord],
    out_dir: Path,
    wall: float,
    machine: str,
    budget_minutes: float,
) -> ExperimentResult:
    """Tables, checks, verdict, plot and fragment from the records of a run (or a saved one)."""
    missing = experiment.missing() if not records else ""
    if missing:
        summary = Summary(tables=[], checks=[], notes=[f"Not run: {missing}."])
    else:
        summary = experiment.summarize(ctx, records)
    verdict = "not run" if missing else overall_verdict(summary.checks)
    png = None
    if records:
        png = report.results_dir(out_dir) / f"{experiment.name}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        experiment.plot(records, png)
    fragment = report.write_fragment(
        experiment,
        out_dir,
        records,
        summary,
        verdict,
        wall,
        smoke=ctx.smoke,
        png=png,
        budget_minutes=budget_minutes,
        machine=machine,
        context={"overrides": list(ctx.overrides), "runs_dir": str(ctx.runs_dir)},
    )
    return ExperimentResult(experiment.name, records, summary, verdict, wall, out_dir, fragment)


def rerender(experiment: Experiment, out_dir: Path, config_dir: Path | None = None) -> ExperimentResult:
    """Rebuild results/<name>.{md,png} from the records saved in results/<name>.json (no training):
    what a change to a table or plot needs. The verdict rules are the same code as in a run."""
    saved = report.results_dir(out_dir) / f"{experiment.name}.json"
    if not saved.is_file():
        raise FileNotFoundError(
            f"no saved results {str(saved)!r}: run `moekit experiment {experiment.name}` first"
        )
    data = json.loads(saved.read_text(encoding="utf-8"))
    records = [record_from_dict(r) for r in data["records"]]  # the saved numbers, not the run folders
    config_path = (config_dir or default_config_dir()) / f"{experiment.name}.toml"
    ctx = Context(
        experiment.name,
        config_path,
        Path(data.get("runs_dir", "runs/experiments")),
        bool(data["smoke"]),
        tuple(data.get("overrides", ())),
    )
    return write_results(
        experiment, ctx, records, out_dir, data["wall_seconds"], data["machine"], data["budget_minutes"]
    )
