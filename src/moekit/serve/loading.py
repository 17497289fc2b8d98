"""Load a checkpoint folder for serving: find out what it holds, then call the loader for that kind.

    loaded = load_for_serving("runs/default/checkpoint", device="cpu")
    loaded.model, loaded.tokenizer, loaded.eos_ids, loaded.format, loaded.name

Formats, told apart by the folder's contents (config.json and the files beside it):
    quantized    config.json has a "quantization" / "quantization_config" entry (what `moekit
                 quantize` adds), or the folder has one of QUANT_FILES; loaded by the first
                 importable function in QUANT_LOADERS, else by `load_model` if that can
    moekit       config.json has "arch" and "model" (what `moekit train` writes; a run folder or a
                 `<name>.old` left by an interrupted save resolve to it); `load_model`
    huggingface  config.json has "model_type" or "architectures"; the first importable function in
                 HF_LOADERS (`moekit.from_pretrained`)
The quantized and Hugging Face loaders live elsewhere in moekit and may be absent from an install;
then the error names the formats this install can serve. Every format needs a tokenizer.json in the
folder: moekit's own (with `<|endoftext|>`) or any Hugging Face one, whose end-of-text ids come from
generation_config.json or config.json.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from moekit.data.tokenizer import EOS_TOKEN, Tokenizer
from moekit.train.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    load_model,
    read_json,
    resolve,
)

# (module, function) pairs tried in order; each takes the folder path (and `device=` when it has that
# parameter) and returns a model, or a tuple whose first item is the model, with `new_cache` and
# `forward(ids, cache=...)`.
HF_LOADERS = (("moekit", "from_pretrained"), ("moekit.hf", "from_pretrained"))
QUANT_LOADERS = (("moekit.compress", "load_quantized"), ("moekit.compress.quantize", "load_quantized"))
QUANT_KEYS = ("quantization", "quantization_config")
QUANT_FILES = ("quantization.json", "quant_config.json")
GENERATION_CONFIG_FILE = "generation_config.json"


class UnsupportedCheckpointError(CheckpointError):
    """A folder this install cannot serve; the message says which formats it can."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any  # encode(str) -> ids, decode(ids) -> str
    eos_ids: tuple[int, ...]
    format: str  # "moekit" | "huggingface" | "quantized"
    folder: Path
    name: str


class HFTokenizerAdapter:
    """A Hugging Face tokenizer.json: special tokens added on encode (BOS), dropped on decode."""

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)


def find_loader(candidates: Sequence[tuple[str, str]]) -> Callable[..., Any] | None:
    """The first (module, function) of `candidates` that imports; None when none does."""
    for module_name, attr in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        loader = getattr(module, attr, None)
        if callable(loader):
            return loader
    return None


def supported_formats() -> list[str]:
    formats = ["moekit checkpoints and run folders (config.json with 'arch' and 'model')"]
    if find_loader(HF_LOADERS):
        formats.append("Hugging Face model folders (config.json with 'model_type')")
    if find_loader(QUANT_LOADERS):
        formats.append("quantized moekit checkpoints")
    return formats


def _unsupported(folder: Path, what: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        f"{str(folder)!r} {what}; this install serves: {'; '.join(supported_formats())}"
    )


def find_config_folder(path: str | Path) -> Path:
    """The folder holding config.json: `path` itself, its `.old` twin, or a run folder's checkpoint/."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint folder {str(p)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{str(p)!r} is a file; --ckpt takes a checkpoint folder")
    try:
        return resolve(p)
    except CheckpointError:
        raise _unsupported(p, f"has no {CONFIG_FILE}") from None


def detect_format(folder: Path, config: dict[str, Any]) -> str:
    if any(k in config for k in QUANT_KEYS) or any((folder / f).is_file() for f in QUANT_FILES):
        return "quantized"
    if "arch" in config and "model" in config:
        return "moekit"
    if "model_type" in config or "architectures" in config:
        return "huggingface"
    raise _unsupported(folder, f"has a {CONFIG_FILE} of no known format")


def load_tokenizer(folder: Path) -> tuple[Any, tuple[int, ...]]:
    """(tokenizer, end-of-text ids) from the folder's tokenizer.json."""
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: serving needs the checkpoint's tokenizer")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise CheckpointError(f"cannot load tokenizer {str(path)!r}: {exc}") from exc
    if backend.token_to_id(EOS_TOKEN) is not None:
        tokenizer = Tokenizer(backend)
        return tokenizer, (tokenizer.eos_id,)
    return HFTokenizerAdapter(backend), hf_eos_ids(folder)


def hf_eos_ids(folder: Path) -> tuple[int, ...]:
    """`eos_token_id` (an id or a list) of generation_config.json, else of config.json."""
    for name in (GENERATION_CONFIG_FILE, CONFIG_FILE):
        if (folder / name).is_file():
            eos = read_json(folder / name).get("eos_token_id")
            if eos is not None:
                return tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    return ()


def _names(loaders: Sequence[tuple[str, str]]) -> str:
    return " or ".join(f"{module}.{function}" for module, function in loaders)


def _call_loader(loader: Callable[..., Any], folder: Path, device: torch.device) -> torch.nn.Module:
    """loader(folder[, device=...]): the model, or the first item of a tuple, on `device`."""
    takes_device = "device" in inspect.signature(loader).parameters
    result = loader(str(folder), device=device) if takes_device else loader(str(folder))
    model = result[0] if isinstance(result, tuple) else result
    return model.to(device)


def default_name(folder: Path) -> str:
    """The model id clients see: the folder's name, or the run's name for `<run>/checkpoint`."""
    return folder.parent.name if folder.name in ("checkpoint", "checkpoint.old") else folder.name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_for_serving(path: str | Path, device: str = "cpu", name: str | None = None) -> LoadedModel:
    """Detect the checkpoint's format, load its model (eval mode, on `device`) and its tokenizer."""
    folder = find_config_folder(path)
    fmt = detect_format(folder, read_json(folder / CONFIG_FILE))
    dev = resolve_device(device)
    loaders = {"moekit": (), "quantized": QUANT_LOADERS, "huggingface": HF_LOADERS}[fmt]
    loader = find_loader(loaders)
    if loader is not None:
        model = _call_loader(loader, folder, dev).eval()
    elif fmt == "huggingface":
        raise _unsupported(folder, f"is a Hugging Face folder, but {_names(loaders)} is not available")
    else:  # a quantized checkpoint may still load with load_model, if that learns its format
        try:
            model, config = load_model(folder, dev)
        except CheckpointError as exc:
            if fmt == "moekit":
                raise
            raise _unsupported(
                folder, f"is a quantized checkpoint, but {_names(loaders)} is not available"
            ) from exc
        if config["arch"] != "decoder":
            raise CheckpointError(
                f"serve needs a decoder-only checkpoint; {str(folder)!r} is {config['arch']!r}"
            )
    if not hasattr(model, "new_cache"):
        raise _unsupported(folder, f"loads as {type(model).__name__}, which has no KV cache (new_cache)")
    tokenizer, eos_ids = load_tokenizer(folder)
    return LoadedModel(model, tokenizer, eos_ids, fmt, folder, name or default_name(folder))
