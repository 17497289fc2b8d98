"""Checkpoints derived from another one (extracted, merged, pruned, quantized): written safely.

A derived checkpoint is an ordinary moekit checkpoint folder: the new model's tensors and config,
the source's tokenizer, the source's run config with its [moe] section rewritten to the new layer
config (so `moekit eval` rebuilds the data exactly), and a `derived_from` history naming every step.
The input is never touched: an output folder equal to the input, inside it, or above it (its run
folder) is refused, and the output is swapped in atomically (`save_folder_atomically`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from moekit.moe import MoEConfig
from moekit.train.checkpoint import TOKENIZER_FILE, save_folder_atomically, save_model_files

RUN_MOE_EXCLUDED = ("dim", "causal", "inner", "extra")  # set by RunConfig itself or not TOML-able


def check_output_folder(source: str | Path, out: str | Path) -> Path:
    """`out` as a Path, after refusing any folder whose writing would change `source`."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise ValueError(
            f"--out {str(out)!r} would overwrite the input checkpoint {str(source)!r} "
            "(same folder, inside it, or a folder containing it): choose another output folder"
        )
    return Path(out)


def run_moe_section(moe: MoEConfig) -> dict[str, Any]:
    """The run config's [moe] table describing `moe` (what `moekit eval` rebuilds from)."""
    d = {k: v for k, v in moe.to_dict().items() if k not in RUN_MOE_EXCLUDED}
    return {"enabled": True, **d}


def save_derived_checkpoint(
    model: nn.Module, source_config: dict[str, Any], out: str | Path, step: dict[str, Any], **entries: Any
) -> Path:
    """Write `model` as a checkpoint derived from the one `source_config` (from load_model) describes.

    `step` records what was done (e.g. {"op": "prune", "keep": 4}); `entries` are extra top-level
    config.json entries (e.g. quantization=...). Returns the output folder.
    """
    folder = Path(source_config["folder"])
    out = check_output_folder(folder, out)
    config = {k: v for k, v in source_config.items() if k not in ("folder", "tied")}
    config["model"] = model.config.to_dict()
    if isinstance(config.get("run"), dict) and model.config.moe is not None:
        config["run"] = {**config["run"], "moe": run_moe_section(model.config.moe)}
    config["derived_from"] = [*config.get("derived_from", []), {"source": str(folder), **step}]
    config.update(entries)

    def write(tmp: Path) -> None:
        save_model_files(tmp, model, config)
        if (folder / TOKENIZER_FILE).is_file():
            shutil.copy2(folder / TOKENIZER_FILE, tmp / TOKENIZER_FILE)

    return save_folder_atomically(out, write)
