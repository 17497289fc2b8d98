"""Tiny corpora, configs and checkpoints shared by the fine-tuning, upcycling and distillation tests."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

from moekit.model import ModelConfig
from moekit.moe import MoEConfig
from moekit.train import Trainer, load_config


def stdlib_corpus(out: Path, count: int, min_bytes: int, max_bytes: int, val_every: int) -> Path:
    """`count` stdlib modules of min_bytes..max_bytes copied as text files into `out`, every
    `val_every`-th into `out/val` (small corpora that tokenize in a second)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    (out / "val").mkdir(parents=True)
    chosen = sorted(p for p in root.glob("*.py") if min_bytes < p.stat().st_size < max_bytes)[:count]
    for i, p in enumerate(chosen):
        shutil.copy(p, out / ("val" if i % val_every == 0 else ".") / (p.stem + ".txt"))
    return out


def tiny_corpus(out: Path, files: int = 14) -> Path:
    """A few stdlib modules as text files, every 5th in val/ (tokenizes in a second)."""
    return stdlib_corpus(out, files, 4000, 20000, val_every=5)


def tiny_run_overrides(corpus: Path, tmp: Path, **extra: str) -> list[str]:
    """`--set` overrides of a 2-layer, 4-expert run of 40 steps on `corpus` (val in corpus/val),
    writing under `tmp`; `extra` replaces or adds keys."""
    base = {
        "data.paths": f'["{corpus}/*.txt"]',
        "data.validation_paths": f'["{corpus}/val/*.txt"]',
        "data.cache_dir": f'"{tmp / "cache"}"',
        "data.vocab_size": "300",
        "data.seq_len": "32",
        "data.batch_size": "4",
        "data.eval_batch_size": "4",
        "model.dim": "32",
        "model.n_layers": "2",
        "model.n_heads": "4",
        "model.n_kv_heads": "2",
        "model.ffn_hidden_dim": "64",
        "model.max_seq_len": "64",
        "moe.num_experts": "4",
        "moe.hidden_dim": "32",
        "train.steps": "40",
        "train.lr": "1e-2",
        "train.warmup_steps": "5",
        "train.log_every": "5",
        "train.eval_every": "20",
        "train.eval_batches": "2",
        "train.save_every": "1000",
        "train.out_dir": f'"{tmp / "runs"}"',
        "train.progress": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# the adaptation tests' base runs: 3 steps, hidden sizes 48
ADAPT_RUN = {
    "model.ffn_hidden_dim": "48",
    "moe.hidden_dim": "48",
    "train.steps": "3",
    "train.warmup_steps": "1",
    "train.log_every": "1",
    "train.eval_every": "1000",
    "train.eval_batches": "1",
}


def tiny_overrides(corpus: Path, tmp: Path, **extra: str) -> list[str]:
    return tiny_run_overrides(corpus, tmp, **{**ADAPT_RUN, **extra})


def train_checkpoint(corpus: Path, tmp: Path, name: str, **extra: str) -> Path:
    """Train a tiny model for a few steps; returns its checkpoint folder."""
    cfg = load_config(None, tiny_overrides(corpus, tmp, **{"train.run_name": f'"{name}"', **extra}))
    return Trainer(cfg).fit().checkpoint_dir


def finetune_sets(corpus: Path, tmp: Path, name: str, steps: int = 2) -> list[str]:
    """--set overrides for a short fine-tuning run on the tiny corpus."""
    sets = {
        "data.paths": f'["{corpus}/*.txt"]',
        "data.validation_paths": f'["{corpus}/val/*.txt"]',
        "data.cache_dir": f'"{tmp / "cache"}"',
        "train.steps": str(steps),
        "train.warmup_steps": "1",
        "train.eval_batches": "1",
        "train.out_dir": f'"{tmp / "runs"}"',
        "train.run_name": f'"{name}"',
        "train.progress": "false",
    }
    return [f"{k}={v}" for k, v in sets.items()]


def tiny_model_config(moe: bool = True, **kw) -> ModelConfig:
    moe_kw = kw.pop("moe_kw", {})
    moe_cfg = MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2, **moe_kw) if moe else None
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=40, max_seq_len=32)
    return ModelConfig(**{**base, **kw}, moe=moe_cfg)
