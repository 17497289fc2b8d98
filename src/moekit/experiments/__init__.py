"""Experiments that hold moekit's models against the papers' claims, with a verdict each.

    moekit experiment NAME [--smoke] [--out DIR]     one experiment (results in DIR, default docs/)
    moekit experiment all                            every experiment, then docs/results.md
    make experiments                                 the same as `moekit experiment all`

Each experiment (one module here) is a base config `experiments/<name>.toml` plus variants given
as `--set` overrides, run in-process through the Trainer; its results table lists the equivalent
`moekit train` command of every run. core.py holds the shared pieces (variants, records, checks),
experiment.py the base class and the runner, report.py the Markdown/JSON/PNG output.
"""

from __future__ import annotations

from moekit.experiments.experiment import Experiment, ExperimentResult, run_experiment


def all_experiments() -> list[Experiment]:
    """Every experiment, in the order `moekit experiment all` runs them and results.md lists them."""
    from moekit.experiments.balance import Balance
    from moekit.experiments.capacity import Capacity
    from moekit.experiments.distill import Distill
    from moekit.experiments.finetune import Finetune
    from moekit.experiments.moe_vs_dense import MoEVsDense
    from moekit.experiments.num_experts import NumExperts
    from moekit.experiments.specialization import Specialization
    from moekit.experiments.stability import Stability
    from moekit.experiments.upcycle import Upcycle

    return [
        MoEVsDense(),
        NumExperts(),
        Capacity(),
        Stability(),
        Balance(),
        Finetune(),
        Distill(),
        Upcycle(),
        Specialization(),
    ]


def get_experiment(name: str) -> Experiment:
    experiments = {e.name: e for e in all_experiments()}
    if name not in experiments:
        raise ValueError(f"unknown experiment {name!r}: expected one of {sorted(experiments)} or 'all'")
    return experiments[name]


__all__ = ["Experiment", "ExperimentResult", "all_experiments", "get_experiment", "run_experiment"]
