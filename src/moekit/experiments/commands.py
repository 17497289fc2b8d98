"""`moekit experiment NAME|all [--smoke] [--out DIR] [--runs DIR] [--set K=V ...] [--budget-minutes M]
[--report-only]`: run experiments (or re-render their saved results) and rebuild OUT/results.md."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser(
        "experiment",
        help="run an experiment against a paper's claim (or 'all'), writing results and a verdict",
        description="Run one experiment (or 'all') and write its results table, plot and verdict "
        "to OUT/results/<name>.md, then rebuild OUT/results.md. Experiments: see --list.",
    )
    ex.add_argument("name", nargs="?", help="experiment name, or 'all'")
    ex.add_argument("--list", action="store_true", help="list the experiments and exit")
    ex.add_argument("--smoke", action="store_true", help="a few steps of a tiny model per variant (seconds)")
    ex.add_argument(
        "--out", default=None, help="results folder (default: docs; with --smoke a new temporary folder)"
    )
    ex.add_argument(
        "--runs", default=None, help="run folders (default: runs/experiments; with --smoke OUT/runs)"
    )
    ex.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every run"
    )
    ex.add_argument(
        "--budget-minutes",
        type=float,
        default=30.0,
        help="per experiment: runs that would start later are skipped and reported (0 = no limit)",
    )
    ex.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the tables, plot and verdict from OUT/results/<name>.json without training",
    )
    ex.set_defaults(func=run_experiment_command)


def run_experiment_command(args: argparse.Namespace) -> int:
    from moekit.experiments import all_experiments, get_experiment, run_experiment
    from moekit.experiments.experiment import rerender
    from moekit.experiments.report import write_results_index

    experiments = all_experiments()
    if args.list or not args.name:
        for e in experiments:
            print(f"{e.name:>16}  {e.title}")
        return 0 if args.list else 2
    chosen = experiments if args.name == "all" else [get_experiment(args.name)]
    out = Path(args.out) if args.out else None
    if out is None and args.smoke:
        out = Path(tempfile.mkdtemp(prefix="moekit-smoke-"))
    out = out or Path("docs")
    for experiment in chosen:
        if args.report_only:
            result = rerender(experiment, out)
            print(f"{experiment.name}: verdict {result.verdict}; results: {result.fragment}")
            continue
        run_experiment(
            experiment,
            out,
            smoke=args.smoke,
            runs_dir=Path(args.runs) if args.runs else None,
            overrides=tuple(args.set),
            budget_minutes=args.budget_minutes,
        )
    index = write_results_index(out, experiments)
    print(f"results: {index}")
    return 0
