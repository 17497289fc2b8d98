"""Experiments: every experiment's smoke mode end to end (tables, plot, checks, verdict, commands),
recorded commands reproduce their runs, smoke output never lands in docs/, and the pure helpers."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import sysconfig
from collections import Counter
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


def test_specialization_analysis_is_what_its_recorded_command_writes(tiny, tmp_path):
    """The specialization run's `moekit analyze` command reproduces its numbers, and the run's
    report has every plot, the load over training included."""
    result = run_experiment(get_experiment("specialization"), tmp_path / "out", smoke=True, overrides=tiny)
    for record in result.records:
        analyze = record.command.splitlines()[-1]
        args = shlex.split(analyze)
        assert args[:2] == ["moekit", "analyze"]
        args[args.index("--out") + 1] = str(tmp_path / "again" / record.label)
        assert cli_main(args[1:]) == 0
        again = json.loads((tmp_path / "again" / record.label / "analysis.json").read_text())["layers"]
        layers = record.extra["layers"]
        assert [row["layer"] for row in again] == [layer["layer"] for layer in layers]
        for row, layer in zip(again, layers):
            assert row["mutual_information_bits"] == pytest.approx(layer["mi_bits"], abs=1e-9)
            assert row["category_entropy_bits"] == pytest.approx(layer["category_entropy_bits"], abs=1e-9)
        page = (Path(record.run_dir) / "analysis" / "report.html").read_text()
        for alt in (
            "load per expert",
            "expert specialization",
            "mutual information per layer",
            "load over training",
        ):
            assert f'alt="{alt}" src="data:image/png;base64,' in page


def _resolved(name: str) -> list[tuple[Variant, object]]:
    """Every from-scratch variant of a full (not smoke) experiment with the config its run gets."""
    from moekit.experiments.core import Context
    from moekit.train.config import load_config

    experiment = get_experiment(name)
    ctx = Context(name, REPO / "experiments" / f"{name}.toml", Path("runs-not-written"))
    return [
        (v, load_config(ctx.config_path, ctx.run_overrides(v, ctx.run_name(v))))
        for v in experiment.variants(ctx)
        if not v.source
    ]


def _active_ffn_params(cfg) -> int:
    """Parameters of the feed-forward path one token goes through, counted on the built model:
    a dense FFN whole, an MoE layer's top_k experts (the router left out)."""
    from moekit.moe import MoE
    from moekit.train.checkpoint import build_model

    model = build_model(cfg.arch, cfg.model_config(cfg.data.vocab_size))
    total = 0
    for block in model.layers:
        if isinstance(block.ffn, MoE):
            bank = sum(p.numel() for p in block.ffn.experts.parameters())
            total += block.ffn.config.top_k * bank // block.ffn.config.num_experts
        else:
            total += sum(p.numel() for p in block.ffn.parameters())
    return total


def test_moe_vs_dense_and_num_experts_compare_at_equal_active_flops():
    runs = _resolved("moe-vs-dense")
    shape = [
        (v.label, c.moe.get("enabled", True), c.moe.get("num_experts"), c.moe.get("top_k")) for v, c in runs
    ]
    assert shape == [("dense", False, 8, 2), ("MoE top-2", True, 8, 2), ("MoE top-1", True, 8, 1)]
    assert len({_active_ffn_params(c) for _, c in runs}) == 1

    runs = _resolved("num-experts")
    experts = [c.moe["num_experts"] if c.moe.get("enabled", True) else 1 for _, c in runs]
    assert experts == [1, 2, 4, 8, 16, 32]
    assert len({_active_ffn_params(c) for _, c in runs}) == 1


def test_capacity_stability_and_balance_run_the_listed_settings():
    grid = [(c.moe["top_k"], c.moe["router"], c.moe["capacity_factor"]) for _, c in _resolved("capacity")]
    assert sorted(grid, key=str) == sorted(
        [(1, "switch", cf) for cf in (1.0, 1.25, 2.0, None)]
        + [(2, "topk", cf) for cf in (1.0, 1.25, 2.0, None)],
        key=str,
    )

    runs = _resolved("stability")
    settings = Counter((c.moe["router_dtype"], c.moe["z_loss_coef"] > 0) for _, c in runs)
    assert settings == {(d, z): 3 for d in ("float32", "bfloat16") for z in (False, True)}  # 3 seeds each
    assert len({(c.moe["router_dtype"], c.moe["z_loss_coef"], c.train.seed) for _, c in runs}) == 12
    other = dict(_resolved("moe-vs-dense"))  # "a high learning rate": above the other experiments'
    assert all(c.train.lr >= 5 * max(o.train.lr for o in other.values()) for _, c in runs)

    runs = _resolved("balance")
    kinds = Counter((c.moe["router"], c.moe["load_balance_coef"] > 0) for _, c in runs)
    none, aux, free = ("topk", False), ("topk", True), ("sigmoid_bias", False)  # free: the bias alone
    assert set(kinds) == {none, aux, free} and min(kinds.values()) >= 2  # several seeds each
    assert all(c.moe["bias_update_rate"] > 0 for _, c in runs if c.moe["router"] == "sigmoid_bias")


def test_docs_results_are_full_runs_rendered_by_the_current_rules(tmp_path):
    """docs/results.md holds a full (not smoke) run of every experiment within its budget, with its
    plot, and every table and verdict is what today's rules make of the saved numbers."""
    docs = REPO / "docs"
    (tmp_path / "results").mkdir()
    for e in all_experiments():
        saved = json.loads((docs / "results" / f"{e.name}.json").read_text())
        assert not saved["smoke"] and saved["wall_seconds"] <= 60 * saved["budget_minutes"]
        assert saved["records"] and all(r["status"] == "ok" for r in saved["records"])
        assert (docs / "results" / f"{e.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        shutil.copy(docs / "results" / f"{e.name}.json", tmp_path / "results")
        again = rerender(e, tmp_path)
        assert again.fragment.read_text() == (docs / "results" / f"{e.name}.md").read_text()
        assert again.verdict == saved["verdict"]
        assert f"![{e.name}](results/{e.name}.png)" in again.fragment.read_text()
    index = write_results_index(tmp_path, all_experiments())
    assert index.read_text() == (docs / "results.md").read_text()
    assert "Not yet run" not in index.read_text()
