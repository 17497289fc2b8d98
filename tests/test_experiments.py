"""Experiments: every experiment's smoke mode end to end (tables, plot, checks, verdict, commands),
recorded commands reproduce their runs, smoke output never lands in docs/, and the pure helpers."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import sysconfig
from pathlib import Path

import pytest

from moekit.cli import main as cli_main
from moekit.experiments import Experiment, all_experiments, get_experiment, run_experiment
from moekit.experiments.core import (
    OUTCOMES,
    Check,
    RunRecord,
    Summary,
    Table,
    Variant,
    overall_verdict,
    steps_to_reach,
)
from moekit.experiments.experiment import rerender
from moekit.experiments.report import write_results_index

REPO = Path(__file__).resolve().parents[1]
VERDICTS = ("agrees", "disagrees", "partly agrees", "inconclusive", "not run")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, ...]:
    """--set overrides for a small corpus (40 stdlib modules, vocab 300) and a private cache."""
    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "val").mkdir()
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)[:45]
    for i, p in enumerate(files):
        shutil.copy(p, corpus / ("val" if i % 9 == 0 else ".") / (p.stem + ".txt"))
    cache = tmp_path_factory.mktemp("cache")
    return (
        f'data.paths=["{corpus}/*.txt"]',
        f'data.validation_paths=["{corpus}/val/*.txt"]',
        f"data.cache_dir={cache}",
        "data.vocab_size=300",
    )


def _docs_fingerprint() -> str:
    docs = REPO / "docs"
    h = hashlib.sha256()
    for p in sorted(docs.rglob("*")) if docs.exists() else []:
        if p.is_file():
            h.update(str(p.relative_to(docs)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", [e.name for e in all_experiments()])
def test_smoke_run_writes_table_plot_checks_and_commands(name, tiny, tmp_path):
    experiment = get_experiment(name)
    out = tmp_path / "out"
    result = run_experiment(experiment, out, smoke=True, overrides=tiny, budget_minutes=0)
    assert result.verdict.split(" (")[0] in VERDICTS
    if experiment.missing():  # e.g. the fine-tuning data is not installed here
        assert result.verdict == "not run" and not result.records
        return
    assert result.records and all(r.status in ("ok", "nonfinite") for r in result.records)
    assert len({r.run_dir for r in result.records}) == len(result.records)  # no run overwrote another
    assert result.summary.checks and all(c.outcome in OUTCOMES for c in result.summary.checks)
    assert result.summary.tables and all(
        len(row) == len(t.columns) for t in result.summary.tables for row in t.rows
    )
    assert all(r.command.startswith("moekit ") and str(tmp_path) in r.command for r in result.records)

    md = (out / "results" / f"{name}.md").read_text()
    assert f"**Verdict: {result.verdict}.**" in md and "Smoke run" in md
    assert md.count("\n# ") >= len(result.records)  # every run's command is listed
    assert (out / "results" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results" / f"{name}.json").read_text())
    assert data["verdict"] == result.verdict and len(data["records"]) == len(result.records)


def test_recorded_command_reproduces_the_run(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # commands name the config relative to the repository root
    result = run_experiment(get_experiment("moe-vs-dense"), tmp_path / "out", smoke=True, overrides=tiny)
    dense = result.records[0]
    args = shlex.split(dense.command)
    assert args[:4] == ["moekit", "train", "--config", "experiments/moe-vs-dense.toml"]
    metrics = Path(dense.run_dir) / "metrics.jsonl"
    metrics.unlink()
    assert cli_main(args[1:]) == 0
    again = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["val_loss"] for m in again if "val_loss" in m][-1] == dense.val_loss


def test_smoke_from_the_cli_goes_to_a_temporary_folder(tiny, capsys):
    before = _docs_fingerprint()
    sets = [x for o in tiny for x in ("--set", o)]
    assert cli_main(["experiment", "moe-vs-dense", "--smoke", *sets]) == 0
    printed = capsys.readouterr().out
    results = Path(printed.strip().splitlines()[-1].split("results: ", 1)[1])
    assert results.exists() and (REPO / "docs") not in results.resolve().parents
    assert _docs_fingerprint() == before
    assert cli_main(["experiment", "moe-vs-dense", "--smoke", "--out", str(REPO / "docs"), *sets]) == 2
    assert _docs_fingerprint() == before
    shutil.rmtree(results.parent)


def test_results_index_lists_every_experiment_and_says_what_has_not_run(tmp_path):
    path = write_results_index(tmp_path, all_experiments())
    text = path.read_text()
    for e in all_experiments():
        assert f"`moekit experiment {e.name}`" in text
    assert text.count("**Not yet run.**") == len(all_experiments())


def test_overall_verdict():
    def c(outcome: str) -> Check:
        return Check("claim", "ours", outcome)

    assert overall_verdict([c("agrees"), c("agrees")]) == "agrees"
    assert overall_verdict([c("agrees"), c("inconclusive")]) == "agrees (1 of 2 checks inconclusive)"
    assert overall_verdict([c("disagrees"), c("disagrees")]) == "disagrees"
    assert overall_verdict([c("agrees"), c("disagrees")]) == "partly agrees"
    assert overall_verdict([c("inconclusive")]) == "inconclusive"
    with pytest.raises(ValueError, match="outcome"):
        c("maybe")


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(10, 5.0, 1.0), (20, 4.0, 2.0), (30, 3.0, 3.0)]
    assert steps_to_reach(curve, 3.5) == pytest.approx((25.0, 2.5))
    assert steps_to_reach(curve, 6.0) == (10.0, 1.0)
    assert steps_to_reach(curve, 2.0) is None


class _Toy(Experiment):
    """Two runs without training: the first raises, the second returns a record."""

    name = "toy"
    title = "Toy"
    paper = "none"
    claim = "none"

    def variants(self, ctx):
        return [Variant("broken"), Variant("fine")]

    def run(self, ctx, variant):
        if variant.label == "broken":
            raise RuntimeError("boom")
        return RunRecord(variant.label, variant.key, variant.seed, "moekit train", "", val_loss=1.0)

    def summarize(self, ctx, records):
        return Summary([Table("", ["run", "status"], [[r.label, r.status] for r in records])], [])

    def plot(self, records, path):
        path.write_bytes(b"\x89PNG\r\n\x1a\n")


def test_a_failing_run_is_recorded_and_the_others_still_run(tmp_path):
    (tmp_path / "toy.toml").write_text("")
    result = run_experiment(_Toy(), tmp_path / "out", config_dir=tmp_path, runs_dir=tmp_path / "runs")
    assert [r.status for r in result.records] == ["failed", "ok"]
    assert "boom" in result.records[0].error
    assert "**Run #1 (broken) failed**" in result.fragment.read_text()
    assert result.verdict == "inconclusive"  # no checks


def test_runs_past_the_budget_are_skipped_and_reported(tmp_path):
    (tmp_path / "toy.toml").write_text("")
    result = run_experiment(
        _Toy(), tmp_path / "out", config_dir=tmp_path, runs_dir=tmp_path / "runs", budget_minutes=1e-9
    )
    assert [r.status for r in result.records] == ["skipped", "skipped"]
    assert "2 of 2 runs were not run" in result.fragment.read_text()


def test_report_only_rebuilds_the_fragment_from_the_saved_records(tmp_path):
    (tmp_path / "toy.toml").write_text("")
    first = run_experiment(_Toy(), tmp_path / "out", config_dir=tmp_path, runs_dir=tmp_path / "runs")
    text = first.fragment.read_text()
    first.fragment.unlink()
    again = rerender(_Toy(), tmp_path / "out", config_dir=tmp_path)
    assert again.fragment.read_text() == text
    assert [r.status for r in again.records] == ["failed", "ok"]
