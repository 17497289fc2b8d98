"""RunConfig: everything a training run needs, from a TOML file plus `--set section.key=value`.

Sections (see configs/default.toml for every key with its default):
    [model]     ModelConfig fields (vocab_size is taken from the tokenizer) plus `arch`
                ("decoder" or "encdec")
    [moe]       MoEConfig fields (dim comes from model.dim) plus `enabled` (false = dense model)
    [data]      corpus, tokenizer, sequence length and batch size
    [train]     optimizer, schedule, logging, evaluation, checkpoints, seed, device
    [parallel]  multi-process training: expert-parallel size (ep), collective timeout

Values are type-checked against the dataclass fields: an unknown section or key fails with the
list of valid ones, a wrong type names the key, the value and the expected type. The resolved
config is saved with every run (config.json), so a run can always be rebuilt exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.model import ModelConfig
from moekit.moe import MoEConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # text/JSONL/parquet files or globs; empty = stdlib corpus
    validation_paths: list[str] = field(default_factory=list)  # empty = split `paths` by stable hash
    validation_fraction: float = 0.05
    text_field: str = "text"  # JSONL field / parquet column holding the text
    tokenizer: str = ""  # an existing tokenizer.json; empty = train a byte-level BPE on the training split
    vocab_size: int = 4096
    tokenizer_max_chars: int = 8_000_000
    cache_dir: str = ""  # empty = $MOEKIT_CACHE_DIR or ~/.cache/moekit
    seq_len: int = 256
    batch_size: int = 16
    eval_batch_size: int = 16


@dataclass
class TrainConfig:
    steps: int = 1000
    time_limit_minutes: float = 0.0  # stop training (and save) after this long; 0 = no limit
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 autocast on GPU) | float32 | bfloat16 | float64
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 16
    save_every: int = 250
    out_dir: str = "runs"
    run_name: str = "default"
    resume: bool = True  # continue from the run folder's checkpoint when there is one
    progress: bool = True  # progress bar
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard package)


@dataclass
class ParallelConfig:
    """Multi-process training (`torchrun --nproc-per-node W -m moekit train`); one process: ep = 1."""

    ep: int = 1  # expert-parallel size; must divide the world size and the number of experts
    # How the replicated (non-expert) parameters' gradients are averaged over the ranks: "ddp"
    # (torch's DistributedDataParallel, its bucketed all-reduces overlapping the backward; expert
    # parameters are left out of it and reduced over their expert-data-parallel group), or
    # "allreduce" (one flat all-reduce per dtype after the last micro-batch). Same gradients.
    data_parallel: str = "ddp"
    # Limit of every collective: a rank that hangs makes the others fail after this long instead of
    # waiting forever. It also bounds the wait while rank 0 prepares (tokenizes) uncached data.
    timeout_s: float = 600.0


DATA_PARALLEL_MODES = ("ddp", "allreduce")
MODEL_EXTRA = {"arch": "decoder"}
MOE_EXTRA = {"enabled": True}
ARCHS = ("decoder", "encdec")


def _model_defaults() -> dict[str, Any]:
    return {
        "arch": "decoder",
        "dim": 256,
        "n_layers": 4,
        "n_heads": 8,
        "n_kv_heads": 4,
        "ffn_hidden_dim": 1024,
        "max_seq_len": 1024,
        "dropout": 0.0,
        "tie_embeddings": True,
    }


def _moe_defaults() -> dict[str, Any]:
    return {"enabled": True, "num_experts": 8, "top_k": 2, "hidden_dim": 512}


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=_model_defaults)
    moe: dict[str, Any] = field(default_factory=_moe_defaults)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    # ------------------------------------------------------------------ building
    def model_config(self, vocab_size: int) -> ModelConfig:
        """The ModelConfig this run trains, with the tokenizer's vocabulary size."""
        model = {k: v for k, v in self.model.items() if k not in MODEL_EXTRA}
        model["vocab_size"] = vocab_size
        moe = None
        if self.moe.get("enabled", True):
            moe_kw = {k: v for k, v in self.moe.items() if k not in MOE_EXTRA}
            moe_kw["dim"] = model.get("dim", ModelConfig.dim)
            moe_kw["causal"] = self.arch == "decoder"
            moe = MoEConfig(**moe_kw)
        return ModelConfig(**model, moe=moe)

    @property
    def arch(self) -> str:
        return self.model.get("arch", "decoder")

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is invalid: expected one of {list(ARCHS)}")
        self.model_config(vocab_size=max(self.data.vocab_size, 1))  # builds and validates both configs
        for name, minimum in (("seq_len", 1), ("batch_size", 1), ("eval_batch_size", 1), ("vocab_size", 1)):
            if getattr(self.data, name) < minimum:
                raise ValueError(
                    f"data.{name}={getattr(self.data, name)!r} is invalid: expected an integer >= {minimum}"
                )
        t = self.train
        for name in ("steps", "grad_accum", "log_every", "eval_every", "save_every", "eval_batches"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name}={getattr(t, name)!r} is invalid: expected an integer >= 1")
        if t.lr <= 0 or not 0 <= t.min_lr_ratio <= 1 or t.warmup_steps < 0 or t.grad_clip < 0:
            raise ValueError(
                f"train: lr={t.lr}, min_lr_ratio={t.min_lr_ratio}, warmup_steps={t.warmup_steps}, "
                f"grad_clip={t.grad_clip}: expected lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0, grad_clip >= 0"
            )
        if t.dtype not in ("auto", "float32", "bfloat16", "float64"):
            raise ValueError(
                f"train.dtype={t.dtype!r} is invalid: expected auto, float32, bfloat16 or float64 (float64: "
                "exact comparisons, e.g. of multi-process runs with one process)"
            )
        if self.data.seq_len > self.model.get("max_seq_len", ModelConfig.max_seq_len):
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.get('max_seq_len')}"
            )
        if self.parallel.ep < 1:
            raise ValueError(f"parallel.ep={self.parallel.ep!r} is invalid: expected an integer >= 1")
        if self.parallel.data_parallel not in DATA_PARALLEL_MODES:
            raise ValueError(
                f"parallel.data_parallel={self.parallel.data_parallel!r} is invalid: expected one of "
                f"{list(DATA_PARALLEL_MODES)}"
            )
        if not self.parallel.timeout_s > 0:
            raise ValueError(
                f"parallel.timeout_s={self.parallel.timeout_s!r} is invalid: expected a number > 0"
            )

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "moe": dict(self.moe),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "parallel": dataclasses.asdict(self.parallel),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        cfg = cls()
        apply_updates(cfg, d)
        return cfg


# ---------------------------------------------------------------------- schema and type checking
SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
}
EXCLUDED_KEYS = {"model": {"moe", "vocab_size"}, "moe": {"dim", "causal", "inner", "extra"}}


def section_schema(section: str) -> dict[str, Any]:
    """key -> type annotation of one section."""
    cls = SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    schema = {
        f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in EXCLUDED_KEYS.get(section, ())
    }
    if section == "model":
        schema["arch"] = str
    if section == "moe":
        schema["enabled"] = bool
    return schema


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against annotation `tp`; return it converted (int -> float, str -> [str])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            with contextlib.suppress(ValueError):
                return coerce(key, value, option)
        raise ValueError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{key}={value!r}: expected a list of {_type_name(item_tp)}")
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}={value!r}: expected a bool (true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}={value!r}: expected a string")
    return value  # Any / dict: taken as is


def apply_updates(cfg: RunConfig, updates: dict[str, Any], source: str = "config") -> None:
    """Merge a {section: {key: value}} mapping into cfg, checking every section, key and type."""
    for section, values in updates.items():
        if section not in SECTION_TYPES:
            raise ValueError(
                f"{source}: unknown section [{section}]; valid sections are {sorted(SECTION_TYPES)}"
            )
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{section}] must be a table of key = value")
        schema = section_schema(section)
        for key, value in values.items():
            if key not in schema:
                raise ValueError(f"{source}: unknown key {section}.{key}; valid keys are {sorted(schema)}")
            try:
                checked = coerce(f"{section}.{key}", value, schema[key])
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
            target = getattr(cfg, section)
            if isinstance(target, dict):
                target[key] = checked
            else:
                setattr(target, key, checked)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); the value is read as TOML, else as a plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. train.lr=1e-3")
    lhs, raw = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: RunConfig | None = None
) -> RunConfig:
    """Defaults (or `base`, e.g. a checkpoint's run), then the TOML file, then each --set override; validated."""
    cfg = RunConfig() if base is None else base
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc
        apply_updates(cfg, data, source=str(p))
    for text in overrides:
        section, key, value = parse_override(text)
        schema = section_schema(section) if section in SECTION_TYPES else {}
        if schema.get(key) is str and not isinstance(value, str):
            value = text.split("=", 1)[1].strip()  # a string key given a number-looking value
        apply_updates(cfg, {section: {key: value}}, source=f"--set {text}")
    cfg.validate()
    return cfg


def to_toml(cfg: RunConfig) -> str:
    """The config as TOML text (what `moekit train --print-config` shows)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"cannot write {v!r} as TOML")
