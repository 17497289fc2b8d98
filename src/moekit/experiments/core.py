"""The pieces every experiment is made of: variants, in-process runs, records, checks and verdicts.

An experiment is a base config (`experiments/<name>.toml`) and a list of `Variant`s, each a few
`--set SECTION.KEY=VALUE` overrides on top of it. `train_variant` runs one variant in this process
through `Trainer(load_config(toml, overrides)).fit()` and records the exact equivalent command,
`moekit train --config experiments/<name>.toml --set ...`, so every number in the results can be
reproduced from the command line. Its `RunRecord` holds what the experiments compare: final
validation loss, step time, dropped fraction, load violation, and the validation curve.

The experiment's `summarize` turns records into tables and `Check`s (the paper's claim, our
number, whether they agree); `overall_verdict` combines the checks. Checks are computed from the
numbers with thresholds fixed in the code, never adjusted to a result.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moekit.model.flops import flops_per_token
from moekit.train.config import RunConfig, load_config

OUTCOMES = ("agrees", "disagrees", "inconclusive")

# The tiny scale of smoke mode: every variant runs a few steps in seconds (structure, not evidence).
SMOKE_OVERRIDES = (
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn_hidden_dim=64",
    "model.max_seq_len=32",
    "moe.hidden_dim=32",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.eval_every=2",
    "train.eval_batches=1",
)


@dataclass(frozen=True)
class Variant:
    """One configuration of an experiment: overrides on its base config, and a seed."""

    label: str  # the table's row name, e.g. "top-1, CF 1.25"
    overrides: tuple[str, ...] = ()  # SECTION.KEY=VALUE, applied after the base config
    seed: int = 1337
    group: str = ""  # runs with the same group are seeds of one setting; "" = the label
    source: str = ""  # the label of the run whose checkpoint this one starts from ("" = from scratch)

    @property
    def key(self) -> str:
        return self.group or self.label


@dataclass
class RunRecord:
    """What one run produced (a diverged run keeps what it logged before it stopped)."""

    label: str
    group: str
    seed: int
    command: str
    run_dir: str
    status: str = "ok"  # ok | nonfinite (training raised on NaN/Inf) | skipped | failed
    error: str = ""
    steps: int = 0
    val_loss: float | None = None
    unigram_val_loss: float | None = None
    training_seconds: float | None = None
    seconds_per_step: float | None = None
    tokens_per_s: float | None = None
    dropped_fraction: float | None = None  # mean over the logged steps
    dropped_fraction_end: float | None = None  # mean over the last quarter of the logged steps
    max_load_violation: float | None = None  # mean over the last quarter of the logged steps
    params_total: int | None = None
    params_active: int | None = None
    flops_per_token: int | None = None  # forward FLOPs per token (decoder-only models)
    val_curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, val_loss, elapsed_s)
    train_curve: list[float] = field(default_factory=list)  # ce loss of every step
    extra: dict[str, Any] = field(default_factory=dict)  # experiment-specific numbers

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Check:
    """One claim of a paper held against our number."""

    claim: str  # what the paper says, with its number
    ours: str  # what we measured
    outcome: str  # agrees | disagrees | inconclusive

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"Check.outcome={self.outcome!r} is invalid: expected one of {list(OUTCOMES)}")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Summary:
    tables: list[Table]
    checks: list[Check]
    notes: list[str] = field(default_factory=list)


def agrees(condition: bool) -> str:
    return "agrees" if condition else "disagrees"


def overall_verdict(checks: list[Check]) -> str:
    """agrees / disagrees when every decided check does; partly agrees when mixed; inconclusive
    when no check could be decided. Undecided checks are counted in the verdict."""
    decided = [c.outcome for c in checks if c.outcome != "inconclusive"]
    if not decided:
        return "inconclusive"
    if all(o == "agrees" for o in decided):
        verdict = "agrees"
    elif all(o == "disagrees" for o in decided):
        verdict = "disagrees"
    else:
        verdict = "partly agrees"
    undecided = len(checks) - len(decided)
    return f"{verdict} ({undecided} of {len(checks)} checks inconclusive)" if undecided else verdict


@dataclass
class Context:
    """Where and how an experiment runs."""

    name: str  # the experiment's name, e.g. "capacity"
    config_path: Path  # experiments/<name>.toml
    runs_dir: Path  # run folders go to runs_dir/<name>/<run name>
    smoke: bool = False
    overrides: tuple[str, ...] = ()  # the user's --set values, applied to every run
    deadline: float = math.inf  # time.monotonic() after which the remaining runs are skipped

    @property
    def scale_overrides(self) -> tuple[str, ...]:
        """Overrides that come before every variant's own: smoke scale, then the user's."""
        return (SMOKE_OVERRIDES if self.smoke else ()) + self.overrides

    def base_config(self, extra: tuple[str, ...] = ()) -> RunConfig:
        """The resolved config every variant starts from (what variants compute their sizes from)."""
        return load_config(self.config_path, [*self.scale_overrides, *extra])

    def run_overrides(self, variant: Variant, run_name: str) -> list[str]:
        return [
            *self.scale_overrides,
            *variant.overrides,
            f"train.seed={variant.seed}",
            f"train.run_name={run_name}",
            f"train.out_dir={self.runs_dir / self.name}",
            "train.resume=false",
            "train.progress=false",
        ]

    def run_name(self, variant: Variant) -> str:
        return run_name(variant.label, variant.seed)

    def run_dir(self, label: str, seed: int) -> Path:
        """The run folder of the variant `label` with `seed` (how later stages find a checkpoint)."""
        return self.runs_dir / self.name / run_name(label, seed)


def run_name(label: str, seed: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return f"{slug}-s{seed}"


def display_path(path: Path) -> str:
    """`path` relative to the working directory when it is below it (how commands are shown)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def train_command(config_path: Path, overrides: list[str]) -> str:
    """The `moekit train` command line equivalent to load_config(config_path, overrides)."""
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    return f"moekit train --config {shlex.quote(display_path(config_path))} {sets}"


def skipped_record(ctx: Context, variant: Variant, reason: str) -> RunRecord:
    """A run that did not happen; a from-scratch run still shows the command that would run it."""
    command = f"# {reason}"
    if not variant.source:
        command = train_command(ctx.config_path, ctx.run_overrides(variant, ctx.run_name(variant)))
    return RunRecord(
        label=variant.label,
        group=variant.key,
        seed=variant.seed,
        command=command,
        run_dir="",
        status="skipped",
        error=reason,
    )


def train_variant(
    ctx: Context, variant: Variant, *, before_fit=None, keep: dict[str, Any] | None = None
) -> RunRecord:
    """Train one variant in this process and record it. `before_fit(trainer)` runs before
    training; `keep`, when given, receives the trainer (key "trainer") for a look afterwards."""
    from moekit.train.trainer import Trainer

    overrides = ctx.run_overrides(variant, ctx.run_name(variant))
    cfg = load_config(ctx.config_path, overrides)
    trainer = Trainer(cfg)
    record = new_record(variant, train_command(ctx.config_path, overrides), trainer)
    if keep is not None:
        keep["trainer"] = trainer
    if before_fit is not None:
        before_fit(trainer)
    return fit_and_record(trainer, record)


def new_record(variant: Variant, command: str, trainer) -> RunRecord:
    """The record of a run about to start with `trainer`."""
    cfg = trainer.cfg
    record = RunRecord(
        label=variant.label,
        group=variant.key,
        seed=variant.seed,
        command=command,
        run_dir=str(Path(cfg.train.out_dir) / cfg.train.run_name),
    )
    if cfg.arch == "decoder":
        record.flops_per_token = flops_per_token(trainer.model_cfg, cfg.data.seq_len).total
    return record


def fit_and_record(trainer, record: RunRecord) -> RunRecord:
    """`trainer.fit()`, with what it produced (or logged before diverging) written into `record`."""
    result = None
    try:
        result = trainer.fit()
        if result.interrupted:  # Ctrl-C: the trainer saved its checkpoint; stop the experiment too
            raise KeyboardInterrupt
    except FloatingPointError as exc:  # the trainer's NaN/Inf loss check
        record.status, record.error = "nonfinite", str(exc)
    except ValueError as exc:  # the router's NaN/Inf logits check
        if "NaN/Inf" not in str(exc):
            raise
        record.status, record.error = "nonfinite", f"at step {trainer.step + 1}: {exc}"
    fill_from_metrics(record, Path(record.run_dir) / "metrics.jsonl")
    record.steps = trainer.step
    if result is not None:
        s = result.summary
        record.val_loss = result.val_loss
        record.unigram_val_loss = s["unigram_val_loss"]
        record.training_seconds = s["training_seconds"]
        record.params_total, record.params_active = s["params_total"], s["params_active"]
        record.train_curve = list(result.train_losses)
        if record.steps:
            record.seconds_per_step = s["training_seconds"] / record.steps
            record.tokens_per_s = s["tokens_seen"] / max(s["training_seconds"], 1e-9)
    return record


def fill_from_metrics(record: RunRecord, path: Path) -> None:
    """Validation curve, dropped fraction and load violation from a run's metrics.jsonl."""
    if not path.exists():
        return
    logged, elapsed, record.val_curve = [], 0.0, []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        elapsed = m.get("elapsed_s", elapsed)
        if "loss" in m:
            logged.append(m)
        if "val_loss" in m:
            record.val_curve.append((int(m["step"]), float(m["val_loss"]), float(elapsed)))
    if logged:
        tail = logged[len(logged) - max(1, len(logged) // 4) :]
        record.dropped_fraction = float(sum(m["dropped_fraction"] for m in logged) / len(logged))
        record.dropped_fraction_end = float(sum(m["dropped_fraction"] for m in tail) / len(tail))
        record.max_load_violation = float(sum(m["max_load_violation"] for m in tail) / len(tail))
        if not record.train_curve:  # a run that raised: its logged losses are what is left
            record.train_curve = [float(m["loss"]) for m in logged]


def run_variants(ctx: Context, variants: list[Variant], run=train_variant) -> list[RunRecord]:
    """Run the variants one after another; those that would start past the deadline are skipped."""
    records = []
    for i, variant in enumerate(variants, 1):
        if time.monotonic() > ctx.deadline:
            records.append(skipped_record(ctx, variant, "not run: the experiment's time budget was spent"))
            continue
        start = time.perf_counter()
        try:
            record = run(ctx, variant)
        except Exception as exc:  # one broken run must not lose the others: recorded, reported
            traceback.print_exc()
            record = skipped_record(ctx, variant, f"failed: {type(exc).__name__}: {exc}")
            record.status = "failed"
        print(
            f"  [{i}/{len(variants)}] {variant.label} (seed {variant.seed}): {record.status}, "
            f"val {fmt(record.val_loss)}, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        records.append(record)
    return records


# ---------------------------------------------------------------------- numbers


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def by_group(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Records grouped by setting (the seeds of one variant), in first-seen order."""
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    return groups


def steps_to_reach(curve: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(step, elapsed seconds) at which a validation curve first reaches `target`, interpolated
    linearly between evaluations; None when it never does."""
    prev = None
    for step, loss, elapsed in curve:
        if loss <= target:
            if prev is None or prev[1] <= loss:
                return float(step), float(elapsed)
            s0, l0, e0 = prev
            frac = (l0 - target) / (l0 - loss)
            return s0 + frac * (step - s0), e0 + frac * (elapsed - e0)
        prev = (step, loss, elapsed)
    return None


def dense_ffn_hidden(cfg: RunConfig) -> int:
    """ffn_hidden_dim of the dense model with cfg's MoE model's active FFN FLOPs per token."""
    from moekit.model.flops import dense_baseline

    return dense_baseline(cfg.model_config(cfg.data.vocab_size)).ffn_hidden_dim


def record_to_dict(record: RunRecord) -> dict[str, Any]:
    return asdict(record)


def record_from_dict(d: dict[str, Any]) -> RunRecord:
    record = RunRecord(**d)
    record.val_curve = [tuple(point) for point in record.val_curve]
    return record
