"""Checkpoints in and out of fine-tuning, upcycling and distillation.

Each of these jobs reads a trained checkpoint (the source), derives a model from it, trains or
writes it, and must never touch the source. This module holds what they share:

- `Source`: a resolved checkpoint folder with its config.json, ModelConfig and tokenizer path;
- `run_config_for(...)`: a RunConfig whose [model]/[moe] sections describe a given ModelConfig,
  with the training settings taken from a base run, then a TOML file and `--set` overrides on top;
  architecture keys may not change (the weights fix them), only the `TUNABLE_*` knobs may;
- `refuse_overwrite(...)`: the output may not be, contain, or lie inside the source folder;
- `export_model(...)`: model + config.json + tokenizer.json written atomically (no optimizer state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moekit import __version__
from moekit.data import Tokenizer
from moekit.model import ModelConfig
from moekit.train import checkpoint as ckpt
from moekit.train.config import RunConfig, apply_updates, load_config, section_schema

# Knobs that change training, not the weights' meaning: a run may set them freely.
TUNABLE_MODEL_KEYS = frozenset({"dropout"})
TUNABLE_MOE_KEYS = frozenset(
    {
        "expert_dropout",
        "load_balance_coef",
        "z_loss_coef",
        "importance_coef",
        "load_coef",
        "seq_balance_coef",
        "capacity_factor",
        "eval_capacity_factor",
        "min_capacity",
        "drop_policy",
        "expert_capacity",
        "capacity_group",
        "jitter_eps",
        "noise_eps",
        "random_routing",
        "bias_update_rate",
        "check_finite",
    }
)
AUX_LOSS_KEYS = ("load_balance_coef", "importance_coef", "load_coef", "seq_balance_coef")


@dataclass(frozen=True)
class Source:
    """A checkpoint read by one of the adapt jobs."""

    folder: Path  # the resolved checkpoint folder (holding config.json)
    config: dict[str, Any]  # its config.json
    model_config: ModelConfig
    arch: str

    @property
    def tokenizer_file(self) -> Path:
        return self.folder / ckpt.TOKENIZER_FILE

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.tokenizer_file)

    @property
    def run(self) -> dict[str, Any]:
        return self.config.get("run") or {}

    @classmethod
    def open(cls, path: str | Path) -> Source:
        """Resolve and check a checkpoint or run folder; errors name the path."""
        folder = ckpt.resolve(path)
        config = ckpt.read_json(folder / ckpt.CONFIG_FILE)
        for key in ("arch", "model"):
            if key not in config:
                raise ckpt.CheckpointError(
                    f"{str(folder / ckpt.CONFIG_FILE)!r} has no {key!r} entry: not a moekit checkpoint"
                )
        try:
            model_cfg = ModelConfig.from_dict(config["model"])
        except (TypeError, ValueError) as exc:
            raise ckpt.CheckpointError(
                f"{str(folder / ckpt.CONFIG_FILE)!r}: invalid model config: {exc}"
            ) from exc
        if not (folder / ckpt.TOKENIZER_FILE).is_file():
            raise ckpt.CheckpointError(
                f"{str(folder)!r} has no {ckpt.TOKENIZER_FILE}: the checkpoint has no tokenizer"
            )
        return cls(folder, config, model_cfg, config["arch"])

    def load_weights(self, model: nn.Module) -> nn.Module:
        """Copy the checkpoint's tensors into `model` (same architecture; knobs may differ)."""
        ckpt.load_model_tensors(model, self.folder / ckpt.MODEL_FILE, self.config.get("tied"))
        return model


# ---------------------------------------------------------------------- run configs
def model_sections(arch: str, model_cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The [model] and [moe] sections of a RunConfig describing `model_cfg` (moe None: dense)."""
    full = model_cfg.to_dict()
    model = {k: full[k] for k in section_schema("model") if k in full}
    model["arch"] = arch
    if model_cfg.moe is None:
        return model, None
    moe_full = model_cfg.moe.to_dict()
    moe = {k: moe_full[k] for k in section_schema("moe") if k in moe_full}
    moe["enabled"] = True
    return model, moe


def run_config_for(
    arch: str,
    model_cfg: ModelConfig,
    base_run: dict[str, Any] | None,
    *,
    defaults: dict[str, dict[str, Any]] | None = None,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, dict[str, Any]] | None = None,
) -> RunConfig:
    """base run, then `defaults`, then the model sections of `model_cfg`, then the TOML file at `path`,
    `--set` overrides and `flags` (from command-line options), validated. Only TUNABLE_* keys of
    [model]/[moe] may differ from `model_cfg`; any other change fails naming the key."""
    base = RunConfig()
    if base_run:
        for section in ("data", "train", "parallel"):
            if section in base_run:
                apply_updates(base, {section: base_run[section]}, source="the checkpoint's run config")
    if defaults:
        apply_updates(base, defaults, source="defaults")
    model, moe = model_sections(arch, model_cfg)
    base.model = dict(model)
    base.moe = dict(moe) if moe is not None else {**base.moe, "enabled": False}
    cfg = load_config(path, overrides, base=base)
    if flags:
        apply_updates(cfg, flags, source="command line")
        cfg.validate()
    _check_architecture(cfg, model, moe)
    return cfg


def _check_architecture(cfg: RunConfig, model: dict[str, Any], moe: dict[str, Any] | None) -> None:
    def fail(key: str, value: Any, expected: Any, allowed: frozenset[str]) -> None:
        raise ValueError(
            f"{key}={value!r} cannot change: the checkpoint's weights have {key}={expected!r}. "
            f"Settable here: {sorted(allowed)}"
        )

    for key, expected in model.items():
        if key not in TUNABLE_MODEL_KEYS and cfg.model.get(key) != expected:
            fail(f"model.{key}", cfg.model.get(key), expected, TUNABLE_MODEL_KEYS)
    enabled = bool(cfg.moe.get("enabled", True))
    if enabled != (moe is not None):
        fail("moe.enabled", enabled, moe is not None, TUNABLE_MOE_KEYS)
    for key, expected in (moe or {}).items():
        if key not in TUNABLE_MOE_KEYS and cfg.moe.get(key) != expected:
            fail(f"moe.{key}", cfg.moe.get(key), expected, TUNABLE_MOE_KEYS)


def apply_tunables(model_cfg: ModelConfig, cfg: RunConfig) -> ModelConfig:
    """`model_cfg` with the run's tunable knobs (dropout, expert dropout, loss coefficients, ...)."""
    d = model_cfg.to_dict()
    for key in TUNABLE_MODEL_KEYS:
        d[key] = cfg.model.get(key, d[key])
    if d["moe"] is not None:
        for key in TUNABLE_MOE_KEYS:
            if key in cfg.moe:
                d["moe"][key] = cfg.moe[key]
    return ModelConfig.from_dict(d)


# ---------------------------------------------------------------------- outputs
def refuse_overwrite(source: Path, target: Path, what: str = "--out") -> None:
    """Fail unless `target` is disjoint from the source folder (not it, not above it, not inside it)."""
    src, dst = Path(source).resolve(), Path(target).resolve()
    if src == dst or dst in src.parents or src in dst.parents:
        raise ValueError(
            f"{what} {str(target)!r} would overwrite the input checkpoint {str(source)!r}; "
            f"choose a folder outside it"
        )


def export_model(
    folder: Path,
    model: nn.Module,
    arch: str,
    run_cfg: RunConfig,
    tokenizer: Tokenizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an inference checkpoint (model.safetensors, config.json, tokenizer.json) atomically."""
    config = {
        "moekit_version": __version__,
        "arch": arch,
        "model": model.config.to_dict(),
        "run": run_cfg.to_dict(),
        **(extra or {}),
    }

    def write(tmp: Path) -> None:
        ckpt.save_model_files(tmp, model, config)
        tokenizer.save(tmp / ckpt.TOKENIZER_FILE)

    return ckpt.save_folder_atomically(Path(folder), write)
