"""Checkpoints as safetensors plus JSON, written atomically, never unpickled.

A checkpoint folder holds:
    model.safetensors       the model's tensors (tied weights stored once, see config.json "tied")
    config.json             moekit version, architecture, ModelConfig and the run's resolved config
    tokenizer.json          the tokenizer, so eval/generate need nothing else
    optimizer.safetensors   optimizer moments and the RNG states (training checkpoints only)
    trainer_state.json      step, data position, optimizer hyper-parameters, metrics so far

Saving writes a sibling temp folder, fsyncs it, then swaps it in with renames: an interrupted save
leaves the previous checkpoint whole (at worst under `<name>.old`, which `resolve` falls back to).
Loading checks every key and shape and names the file, key and shapes when something is off.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from moekit.model import ModelConfig, MoEEncoderDecoder, MoETransformer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or for another model."""


# ---------------------------------------------------------------------- tensors <-> files
def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias -> the earlier key whose tensor it shares storage with (tied weights)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tied = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen and t.numel() > 0:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
    return tied


def dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier key; return (tensors, alias -> kept key)."""
    tied = tied_aliases(state)
    tensors = {key: t.detach().contiguous().cpu() for key, t in state.items() if key not in tied}
    return tensors, tied


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file; a corrupt or truncated file raises CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated: {exc}") from exc


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated: {exc}") from exc


def load_model_tensors(model: nn.Module, path: Path, tied: dict[str, str] | None = None) -> None:
    """Copy a model.safetensors into `model`, checking the key set and every shape first."""
    load_state_checked(model, read_model_state(path, tied), path)


def read_model_state(path: Path, tied: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict a model.safetensors holds, tied aliases (config.json "tied") restored."""
    tensors = read_safetensors(path)
    for alias, source in (tied or {}).items():
        if source in tensors:
            tensors[alias] = tensors[source]
    return tensors


def load_state_checked(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy `tensors` (read from `path`) into `model`, checking the key set and every shape first."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{str(path)!r} does not match this model: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} (was it saved from another model config?)"
        )
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{str(path)!r}: tensor {key!r} has shape {tuple(t.shape)} but the model expects "
                f"{tuple(expected[key].shape)} (was it saved from another model config?)"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])


# ---------------------------------------------------------------------- optimizer state
def optimizer_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able param groups."""
    return optimizer_state_tensors(optimizer.state_dict())


def optimizer_state_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer state dict (e.g. one gathered over expert-parallel ranks) into tensors and
    JSON-able param groups; `optimizer_state_dict` is the inverse."""
    tensors = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{pid}.{name}"] = t.detach().contiguous().cpu()
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, groups


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    groups: list[dict[str, Any]],
    load: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Restore an optimizer from `optimizer_state_tensors` output. `load(state_dict)` replaces
    `optimizer.load_state_dict` (under expert parallelism it slices the expert moments)."""
    try:
        (load or optimizer.load_state_dict)(optimizer_state_dict(tensors, groups))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"optimizer state does not match this model's parameters: {exc}") from exc


def optimizer_state_dict(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The optimizer state dict that `optimizer_state_tensors` split into tensors and groups."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("state."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    fixed_groups = []
    for g in groups:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        fixed_groups.append(g)
    return {"state": state, "param_groups": fixed_groups}


# ---------------------------------------------------------------------- atomic folders
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, payload: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_folder_atomically(
    target: Path, write: Any, carry_over: Callable[[Path, Path], None] | None = None
) -> Path:
    """Call write(tmp_folder), then swap tmp_folder in as `target`; the old one survives until then
    (as `target.old`, which `resolve` reads if the swap was cut short).

    carry_over(existing, tmp_folder): with an existing `target`, copies what it should keep into
    the new folder before the swap (the Hugging Face save keeps tokenizer files, ...). A failure
    anywhere before the swap leaves `target` untouched and removes the partial folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f"{target.name}.old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if carry_over is not None and target.is_dir():
            carry_over(target, tmp)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def resolve(path: str | Path) -> Path:
    """The checkpoint folder to read: `path`, or `path.old` left by a save that was cut short."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    old = p.with_name(f"{p.name}.old")
    if (old / CONFIG_FILE).is_file():
        return old
    if (p / "checkpoint" / CONFIG_FILE).is_file():  # a run folder
        return p / "checkpoint"
    if not p.exists():
        raise CheckpointError(f"checkpoint folder {str(p)!r} does not exist")
    raise CheckpointError(f"{str(p)!r} is not a moekit checkpoint (no {CONFIG_FILE} in it)")


def save_model_files(folder: Path, model: nn.Module, config: dict[str, Any]) -> None:
    """model.safetensors and config.json (with the tied-weight aliases) into `folder`."""
    save_state_files(folder, model.state_dict(), config)


def save_state_files(folder: Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """`save_model_files` for a state dict (e.g. gathered from expert-parallel ranks): tied weights
    are the entries that share storage, so re-tie a copied state dict before saving it."""
    tensors, tied = dedupe_tied(state_dict)
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt", "producer": "moekit"})
    write_json(folder / CONFIG_FILE, {**config, "tied": tied})


# ---------------------------------------------------------------------- models from checkpoints
def build_model(arch: str, model_cfg: ModelConfig) -> nn.Module:
    """The moekit model class for `arch` ("decoder" or "encdec")."""
    if arch == "decoder":
        return MoETransformer(model_cfg)
    if arch == "encdec":
        return MoEEncoderDecoder(model_cfg)
    raise CheckpointError(f"unknown architecture {arch!r}: expected 'decoder' or 'encdec'")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, its config.json) from a checkpoint or run folder."""
    folder = resolve(path)
    config = read_json(folder / CONFIG_FILE)
    for key in ("arch", "model"):
        if key not in config:
            raise CheckpointError(
                f"{str(folder / CONFIG_FILE)!r} has no {key!r} entry: not a moekit checkpoint"
            )
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r}: invalid model config: {exc}") from exc
    model = build_model(config["arch"], model_cfg)
    if config.get("quantization") and (folder / MODEL_FILE).is_file():  # experts saved by `moekit quantize`
        from moekit.compress.qexperts import install_quantized_banks

        install_quantized_banks(model, folder / MODEL_FILE, config["quantization"])
    load_model_tensors(model, folder / MODEL_FILE, config.get("tied"))
    return model.to(device).eval(), {**config, "folder": str(folder)}
