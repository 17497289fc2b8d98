"""Fine-tuning a trained checkpoint: freezing strategies, LoRA, expert dropout, instruction data.

    source = Source.open("runs/base/checkpoint")
    cfg = finetune_config(source, overrides=["data.paths=['email/*.txt']", "moe.expert_dropout=0.4"])
    trainer = FinetuneTrainer(cfg, load_finetune_model(source, cfg), FinetuneOptions(freeze="moe"))
    result = trainer.fit()        # run folder: <train.out_dir>/<train.run_name>/

The run config starts from fine-tuning defaults (few steps, lower learning rate, the checkpoint's
tokenizer, sequence length and batch sizes) and takes a TOML file and `--set` overrides like
`moekit train`. The architecture comes from the checkpoint; only training knobs may change:
model.dropout, moe.expert_dropout (ST-MoE/Switch: a higher dropout inside experts, 0.4, than
elsewhere, 0.1, helps fine-tuning), the aux/z-loss coefficients (aux loss on or off), capacity.
Everything else fails with the key and the checkpoint's value (see checkpoints.py).

Options: a freezing strategy (freeze.py), LoRA adapters (lora.py; with LoRA the default strategy is
"all", so only the adapters train), instruction data (data/instruct.py: JSONL prompt/response
pairs, loss on the response only). A frozen router also keeps its non-gradient bias still.

The run folder is a normal training run (exact resume, Ctrl-C, metrics, report). Its
`checkpoint/` loads with `moekit eval`/`generate` unless LoRA was used: then the adapters are
merged into the weights and the plain model is written to `<run>/merged/` at the end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.adapt.checkpoints import Source, apply_tunables, export_model, refuse_overwrite, run_config_for
from moekit.adapt.freeze import check_strategy, freeze, frozen_router_buffers
from moekit.adapt.lora import TARGETS, apply_lora, check_targets, lora_parameters, merge_lora
from moekit.data import Corpus, PreparedData, Tokenizer, TokenSplits
from moekit.data.instruct import (
    PROMPT_FIELD,
    RESPONSE_FIELD,
    InstructionSampler,
    load_instruction_data,
    validation_batches,
)
from moekit.data.loader import IGNORE_INDEX
from moekit.train import checkpoint as ckpt
from moekit.train.checkpoint import build_model
from moekit.train.config import RunConfig
from moekit.train.trainer import Trainer, TrainResult, autocast_for

FINETUNE_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {
        "steps": 200,
        "lr": 1e-3,
        "warmup_steps": 10,
        "log_every": 10,
        "eval_every": 50,
        "save_every": 100,
        "run_name": "finetune",
        "time_limit_minutes": 0.0,
    },
    "data": {"paths": [], "validation_paths": []},
}
MERGED_DIR = "merged"


@dataclass
class FinetuneOptions:
    freeze: str | None = None  # a freeze.py strategy; None = "all" with LoRA, else "none"
    lora_rank: int = 0  # 0 = no adapters
    lora_alpha: float | None = None  # None = rank (scale 1)
    lora_targets: tuple[str, ...] = TARGETS
    instruct: bool = False  # data files are JSONL prompt/response pairs
    prompt_field: str = PROMPT_FIELD
    response_field: str = RESPONSE_FIELD
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the checkpoint's config.json

    @property
    def strategy(self) -> str:
        if self.freeze is not None:
            return self.freeze
        return "all" if self.lora_rank else "none"

    def validate(self) -> None:
        check_strategy(self.strategy)
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"--lora-rank={self.lora_rank!r} is invalid: expected an integer >= 0")
        if self.lora_rank:
            check_targets(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "freeze": self.strategy,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_targets": list(self.lora_targets) if self.lora_rank else [],
            "instruct": self.instruct,
            **self.extra,
        }


def finetune_config(
    source: Source,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, dict[str, Any]] | None = None,
) -> RunConfig:
    """The fine-tuning run config for `source` (see the module docstring); checks data and outputs."""
    data = {**FINETUNE_DEFAULTS["data"], "tokenizer": str(source.tokenizer_file)}
    defaults = {**FINETUNE_DEFAULTS, "data": data}
    cfg = run_config_for(
        source.arch,
        source.model_config,
        source.run,
        defaults=defaults,
        path=path,
        overrides=overrides,
        flags=flags,
    )
    if not cfg.data.paths:
        raise ValueError("fine-tuning needs training data: pass --data FILE ... or --set data.paths=[...]")
    if Path(cfg.data.tokenizer).resolve() != source.tokenizer_file.resolve():
        raise ValueError(
            f"data.tokenizer={cfg.data.tokenizer!r} cannot change: fine-tuning uses the checkpoint's "
            f"tokenizer {str(source.tokenizer_file)!r}"
        )
    refuse_overwrite(source.folder, Path(cfg.train.out_dir) / cfg.train.run_name, "the run folder")
    return cfg


def load_finetune_model(source: Source, cfg: RunConfig) -> nn.Module:
    """The checkpoint's model rebuilt with the run's knobs (dropouts, loss coefficients), weights loaded."""
    return source.load_weights(build_model(source.arch, apply_tunables(source.model_config, cfg)))


class FinetuneTrainer(Trainer):
    """A Trainer that freezes, adds LoRA adapters and reads instruction data before training."""

    def __init__(self, cfg: RunConfig, model: nn.Module, options: FinetuneOptions | None = None) -> None:
        self.options = options or FinetuneOptions()
        self.options.validate()
        if self.options.instruct and cfg.arch != "decoder":
            raise ValueError(f"instruction data needs a decoder-only checkpoint; this one is {cfg.arch!r}")
        self.frozen = freeze(model, self.options.strategy)
        self.lora_modules: list[str] = []
        if self.options.lora_rank:
            torch.manual_seed(cfg.train.seed)  # the adapters' A init
            self.lora_modules = apply_lora(
                model, self.options.lora_rank, self.options.lora_alpha, self.options.lora_targets
            )
        self._held_buffers = frozen_router_buffers(model, self.options.strategy)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"freezing strategy {self.options.strategy!r} leaves nothing to train; "
                "pick another strategy or add LoRA adapters (--lora-rank)"
            )
        self.instruct_data = None
        super().__init__(cfg, model=model)

    # -------------------------------------------------------------- data
    def _prepare_data(self) -> PreparedData:
        if not self.options.instruct:
            return super()._prepare_data()
        d = self.cfg.data
        if not d.tokenizer:
            raise ValueError("instruction data needs the checkpoint's tokenizer (data.tokenizer is empty)")
        tokenizer = Tokenizer.from_file(d.tokenizer)
        data = load_instruction_data(
            d.paths,
            tokenizer,
            d.seq_len,
            validation_paths=d.validation_paths or None,
            validation_fraction=d.validation_fraction,
            prompt_field=self.options.prompt_field,
            response_field=self.options.response_field,
        )
        self.instruct_data = data

        def response_tokens(examples) -> np.ndarray:  # what the loss is on: the unigram baseline's data
            return np.concatenate([ex.targets[ex.targets != IGNORE_INDEX] for ex in examples])

        tokens = TokenSplits(response_tokens(data.train), response_tokens(data.validation))
        return PreparedData(Corpus("instruct", (), (), data.fingerprint), tokenizer, tokens)

    def _train_sampler(self):
        if self.instruct_data is None:
            return super()._train_sampler()
        d, t = self.cfg.data, self.cfg.train
        return InstructionSampler(self.instruct_data.train, d.batch_size, self.tokenizer.pad_id, seed=t.seed)

    def _validation_batches(self):
        if self.instruct_data is None:
            return super()._validation_batches()
        d, t = self.cfg.data, self.cfg.train
        return validation_batches(
            self.instruct_data.validation,
            d.eval_batch_size,
            self.tokenizer.pad_id,
            t.eval_batches * d.eval_batch_size,
        )

    def forward_batch(self, batch: tuple[torch.Tensor, ...]) -> Any:
        if self.instruct_data is None:
            return super().forward_batch(batch)
        inputs, mask, targets = (b.to(self.device) for b in batch)
        with autocast_for(self.device, self.cfg.train.dtype):
            return self.forward_module(inputs, targets=targets, attention_mask=mask)

    # -------------------------------------------------------------- training
    def train_step(self) -> dict[str, Any]:
        held = [(b, b.clone()) for b in self._held_buffers]
        metrics = super().train_step()
        with torch.no_grad():
            for buffer, value in held:  # a frozen router's aux-loss-free bias stays where it was
                buffer.copy_(value)
        return metrics

    def try_resume(self) -> bool:
        """Resume only a run with the same options: another strategy would restore the wrong optimizer."""
        folder = self.ckpt_dir
        if self.cfg.train.resume and (folder / ckpt.CONFIG_FILE).is_file():
            saved = ckpt.read_json(folder / ckpt.CONFIG_FILE).get("finetune")
            if saved != self.options.to_dict():
                raise ckpt.CheckpointError(
                    f"{str(folder)!r} holds a run with other fine-tuning options ({saved}); use another "
                    "--out or train.run_name, or set train.resume=false to start over (nothing was overwritten)"
                )
        return super().try_resume()

    def checkpoint_config(self) -> dict[str, Any]:
        return {**super().checkpoint_config(), "finetune": self.options.to_dict()}

    def merged_model(self) -> nn.Module:
        """A copy of the model with every LoRA adapter folded in (the model itself when there are none)."""
        return merge_lora(copy.deepcopy(self.model)) if self.lora_modules else self.model

    def fit(self) -> TrainResult:
        result = super().fit()
        if self.lora_modules:
            self.export(self.run_dir / MERGED_DIR)
        return result

    def export(self, folder: Path) -> Path:
        """An inference checkpoint of the fine-tuned (merged) model."""
        return export_model(
            folder,
            self.merged_model().cpu(),
            self.cfg.arch,
            self.cfg,
            self.tokenizer,
            {"finetune": self.options.to_dict()},
        )

    def summary(self, val_loss: float | None) -> dict[str, Any]:
        out = super().summary(val_loss)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        out.update(
            freeze=self.options.strategy,
            params_trainable=trainable,
            params_lora=sum(p.numel() for p in lora_parameters(self.model)),
            frozen_tensors=len(self.frozen),
        )
        return out
