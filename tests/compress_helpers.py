"""Shared set-up of the compression tests: a tiny trained checkpoint, and small models."""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.model import ModelConfig, MoETransformer
from moekit.moe import MoEConfig
from moekit.train import Trainer, load_config
from tests.adapt_helpers import stdlib_corpus


def tiny_checkpoint(tmp: Path, **extra: str) -> Path:
    """Train a 2-layer, 4-expert model for a few steps on 12 stdlib files; return its checkpoint."""
    corpus = stdlib_corpus(tmp / "corpus", 12, 3000, 40000, val_every=6)
    sets = {
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
        "train.steps": "4",
        "train.lr": "1e-2",
        "train.warmup_steps": "1",
        "train.eval_every": "4",
        "train.eval_batches": "1",
        "train.out_dir": f'"{tmp / "runs"}"',
        "train.progress": "false",
        **extra,
    }
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in sets.items()]))
    trainer.fit()
    return trainer.ckpt_dir


def small_model(seed: int = 0, n_layers: int = 2, **moe_kw) -> MoETransformer:
    torch.manual_seed(seed)
    moe = dict(dim=32, hidden_dim=16, num_experts=6, top_k=2)
    moe.update(moe_kw)
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        n_layers=n_layers,
        n_heads=4,
        ffn_hidden_dim=48,
        max_seq_len=32,
        moe=MoEConfig(**moe),
    )
    return MoETransformer(cfg).eval()
