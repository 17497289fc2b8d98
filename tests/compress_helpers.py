"""Shared set-up of the compression tests: a tiny trained checkpoint, and small models."""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.model import ModelConfig, MoETransformer
from moekit.moe import MoEConfig
from moekit.train import Trainer, load_config
from tests.adapt_helpers import stdlib_corpus, tiny_run_overrides


def tiny_checkpoint(tmp: Path, **extra: str) -> Path:
    """Train a 2-layer, 4-expert model for a few steps on 12 stdlib files; return its checkpoint."""
    corpus = stdlib_corpus(tmp / "corpus", 12, 3000, 40000, val_every=6)
    run = {  # the tiny run's defaults but 4 steps, one evaluation at the end, default logging/saving
        "train.steps": "4",
        "train.warmup_steps": "1",
        "train.log_every": "10",
        "train.eval_every": "4",
        "train.eval_batches": "1",
        "train.save_every": "250",
    }
    overrides = tiny_run_overrides(corpus, tmp, **{**run, **extra})
    trainer = Trainer(load_config(None, overrides))
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
