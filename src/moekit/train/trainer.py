"""The training loop: `moekit train` builds a Trainer from a RunConfig and calls `fit()`.

One step = `grad_accum` micro-batches, each `model(inputs, targets)` -> loss = ce + aux + z (the
MoE losses come back explicitly from every layer), backward, then global-norm clipping, AdamW with
the warmup + cosine learning rate of this step, and the aux-loss-free bias update (after the
optimizer step, with the step's summed routed load). Every `log_every` steps a JSONL line goes to
metrics.jsonl; every `eval_every` steps the validation loss; every `save_every` steps (and at the
end, at the time limit, and on Ctrl-C) an atomic checkpoint that a later run resumes from exactly:
model, optimizer moments, step, data position and RNG states.

Run folder: <out_dir>/<run_name>/ {config.toml (resolved), metrics.jsonl, checkpoint/, report/}.

Multi-process (`torchrun --nproc-per-node W -m moekit train --set parallel.ep=P`, helpers in
`distributed.py`): every rank builds the same full model, keeps its E/P experts of every MoE layer
(`moekit.parallel.shard_model`), and trains on its block of the global batch (W * batch_size *
grad_accum sequences per step). The replicated parameters' gradients are averaged by
DistributedDataParallel during the backward (`parallel.data_parallel="ddp"`, the default) or by
`sync_gradients` after the last micro step ("allreduce"); the experts' by `sync_gradients` over
their expert-data-parallel group; then all are clipped by the norm of the whole model. Rank 0
alone writes logs, metrics and the checkpoint, which has the single-process layout (experts
gathered), so any EP size resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moekit import __version__
from moekit.data import (
    Corpus,
    LMBatchSampler,
    PreparedData,
    SpanCorruptionSampler,
    Tokenizer,
    TokenizerConfig,
    TokenSplits,
    ValidationWindows,
    encode_documents,
    expand_paths,
    prepare_data,
    read_documents,
)
from moekit.model import MoEEncoderDecoder, count_params
from moekit.moe import MoE
from moekit.parallel import (
    ParallelLayout,
    check_consistent,
    clip_grad_norm,
    data_parallel,
    gather_full_state_dict,
    gather_optimizer_state,
    global_load,
    init_parallel,
    load_sharded_optimizer_state,
    mean_over_ranks,
    reduce_stats,
    shard_model,
    slice_experts,
    sync_gradients,
)
from moekit.train import checkpoint as ckpt
from moekit.train import distributed as D
from moekit.train.checkpoint import build_model
from moekit.train.config import RunConfig, to_toml

# ---------------------------------------------------------------------- building blocks


def moe_layers_of(model: nn.Module) -> list[MoE]:
    """The model's MoE layers in the order their stats appear in `router_stats_of`."""
    if isinstance(model, MoEEncoderDecoder):
        return list(model.encoder_moe_layers) + list(model.decoder_moe_layers)
    return [m for m in model.modules() if isinstance(m, MoE) and not _is_inner(m, model)]


def _is_inner(layer: MoE, model: nn.Module) -> bool:
    # Hierarchical MoE: inner layers live inside another MoE's experts and report through it.
    for m in model.modules():
        if isinstance(m, MoE) and m is not layer and any(sub is layer for sub in m.experts.modules()):
            return True
    return False


def router_stats_of(output: Any) -> list:
    if hasattr(output, "encoder_router_stats"):
        return list(output.encoder_router_stats) + list(output.decoder_router_stats)
    return list(output.router_stats)


def lr_at(step: int, cfg: RunConfig, total_steps: int | None = None) -> float:
    """Linear warmup to lr over warmup_steps (at most a fifth of the run), then cosine decay to
    lr * min_lr_ratio at the last step (`total_steps`, default train.steps; shorter when a time
    limit plans fewer steps)."""
    t = cfg.train
    total = t.steps if total_steps is None else total_steps
    warmup = min(t.warmup_steps, total // 5)  # a run planned short by a time limit still decays
    if warmup > 0 and step < warmup:
        return t.lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = t.lr * t.min_lr_ratio
    return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; matrices (and expert banks) decay, vectors (norms, biases) and embeddings do not.

    Fused (one kernel per parameter) where torch has it, on CPU and CUDA: on the 2-core CPU the
    default model's step took 10 ms against 65 ms with foreach (benchmarks/bench_e2e.py measures with
    it, as transformers' Trainer uses it by default); foreach elsewhere."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    params = decay + no_decay
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), **impl)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r}: no CUDA device is available here")
    return device


def autocast_for(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs (the MoE router still computes in float32); float32 elsewhere."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) of a unigram model fitted on the training tokens (add-one smoothed)."""
    counts = (
        np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    )
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val_tokens, dtype=np.int64)].mean())


# ---------------------------------------------------------------------- the run
PLAN_AFTER = 5  # timed steps before a time-limited run fixes its length


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint_dir: Path
    step: int
    train_losses: list[float] = field(default_factory=list)  # ce loss of every step of this process
    val_loss: float | None = None
    interrupted: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: RunConfig, *, model: nn.Module | None = None):
        """Prepare data, tokenizer, model and optimizer. `model` replaces the one cfg describes
        (fine-tuning an imported or upcycled model); its `config` is kept in the checkpoint."""
        cfg.validate()
        self.cfg = cfg
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = D.start_process_group(resolve_device(t.device), cfg.parallel.timeout_s)
        self.layout = self._init_layout(model)
        self.run_dir = Path(t.out_dir) / t.run_name
        self.ckpt_dir = self.run_dir / "checkpoint"

        with D.main_process_first(self.layout):
            self.data = self._prepare_data()
        self.tokenizer: Tokenizer = self.data.tokenizer
        if self.layout.distributed:  # a rank started with other settings or data fails on every rank
            fingerprint = {"run": cfg.to_dict(), "tokenizer": self.tokenizer.fingerprint}
            check_consistent(
                {**fingerprint, "train_tokens": len(self.data.tokens.train)}, what="run config or data"
            )

        torch.manual_seed(t.seed)  # the same on every rank: identical replicated weights
        self.model_cfg = cfg.model_config(self.tokenizer.vocab_size) if model is None else model.config
        if self.model_cfg.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"the model's vocab_size={self.model_cfg.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size}"
            )
        self.model = (model if model is not None else build_model(cfg.arch, self.model_cfg)).to(self.device)
        if t.dtype == "float64":  # parameters and activations in float64 (the MoE router follows)
            self.model.to(torch.float64)
        self.params = count_params(self.model)  # of the whole model, before sharding
        shard_model(self.model, self.layout)  # this rank's experts, all ranks' losses; one process: no-op
        # the module the training forward runs through: DDP averages the replicated parameters'
        # gradients during the backward (expert gradients: sync_gradients after the last micro batch)
        self.ddp = None
        if self.layout.distributed and cfg.parallel.data_parallel == "ddp":
            self.ddp = data_parallel(self.model, self.layout)
        self.optimizer = build_optimizer(self.model, cfg)  # over the local shards
        self.moe_layers = moe_layers_of(self.model)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        # With a time limit the run plans its length after PLAN_AFTER timed steps, so the cosine
        # schedule ends inside the budget on any machine; the plan is saved and kept on resume.
        self.total_steps = cfg.train.steps
        self.planned = cfg.train.time_limit_minutes <= 0
        self.sampler = self._train_sampler()
        if self.layout.distributed:
            self.sampler = D.RankRows(self.sampler, self.layout)
            torch.manual_seed(D.rank_seed(t.seed, self.layout.rank, 0))  # per-rank dropout and noise

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes files."""
        return self.layout.rank == 0

    def _init_layout(self, model: nn.Module | None) -> ParallelLayout:
        """Validate parallel.ep against the world and the model (the same error on every rank)."""
        ep = self.cfg.parallel.ep
        config = self.cfg.model_config(self.cfg.data.vocab_size) if model is None else model.config
        try:
            layout = init_parallel(ep, config, timeout=timedelta(seconds=self.cfg.parallel.timeout_s))
        except ValueError as exc:
            if ep > 1 and not dist.is_initialized():
                raise ValueError(
                    f"{exc}; start one process per rank: torchrun --nproc-per-node N -m moekit train "
                    f"--set parallel.ep={ep} (N a multiple of {ep})"
                ) from exc
            raise
        if model is not None and layout.ep > 1:
            raise ValueError(
                f"parallel.ep={ep}: expert parallelism shards models the run builds itself (moekit train); "
                "a given model (fine-tuning, distillation) trains with parallel.ep=1"
            )
        return layout

    # -------------------------------------------------------------- data
    def _prepare_data(self) -> PreparedData:
        """Corpus, tokenizer and token streams from cfg.data (fine-tuning on other data overrides it)."""
        d = self.cfg.data
        return prepare_data(
            d.paths or None,
            validation_paths=d.validation_paths or None,
            validation_fraction=d.validation_fraction,
            text_field=d.text_field,
            tokenizer_config=TokenizerConfig(vocab_size=d.vocab_size, max_train_chars=d.tokenizer_max_chars),
            tokenizer_file=d.tokenizer or None,
            cache_dir=d.cache_dir or None,
        )

    def _train_sampler(self):
        """The sampler of global batches: world_size * batch_size sequences (RankRows splits them)."""
        d, t = self.cfg.data, self.cfg.train
        tokens = self.data.tokens.train
        batch_size = d.batch_size * self.layout.world_size
        if self.cfg.arch == "encdec":
            tk = self.tokenizer
            return SpanCorruptionSampler(
                tokens,
                batch_size,
                d.seq_len,
                sentinel_ids=tk.sentinel_ids,
                eos_id=tk.eos_id,
                pad_id=tk.pad_id,
                seed=t.seed,
            )
        return LMBatchSampler(tokens, batch_size, d.seq_len, seed=t.seed)

    def _validation_batches(self):
        d, t = self.cfg.data, self.cfg.train
        tokens = self.data.tokens.validation
        if self.cfg.arch == "encdec":
            tk = self.tokenizer
            sampler = SpanCorruptionSampler(
                tokens,
                d.eval_batch_size,
                d.seq_len,
                sentinel_ids=tk.sentinel_ids,
                eos_id=tk.eos_id,
                pad_id=tk.pad_id,
                seed=0,
                shuffle=False,
            )
            return [sampler.next_batch() for _ in range(t.eval_batches)]
        return ValidationWindows(
            tokens, d.eval_batch_size, d.seq_len, max_windows=t.eval_batches * d.eval_batch_size
        )

    @property
    def forward_module(self) -> nn.Module:
        """What a forward runs through: the DDP wrapper while training with it, else the model.
        Subclasses that override `forward_batch` call this, not `self.model`, for the same reason."""
        return self.ddp if self.ddp is not None and self.model.training else self.model

    def forward_batch(self, batch: tuple[torch.Tensor, ...]) -> Any:
        batch = tuple(b.to(self.device) for b in batch)
        module = self.forward_module
        with autocast_for(self.device, self.cfg.train.dtype):
            if self.cfg.arch == "encdec":
                enc, dec_in, dec_target = batch
                return module(enc, dec_in, attention_mask=enc != self.tokenizer.pad_id, labels=dec_target)
            inputs, targets = batch
            return module(inputs, targets=targets)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation cross-entropy and perplexity.

        Multi-process: every rank runs every validation batch in lockstep on its block of rows (the
        forward of an expert-parallel model is a collective) and the sums are added over ranks.
        """
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in self._validation_batches():
            batch = D.rank_rows(batch, self.layout)
            out = self.forward_batch(batch)
            n = int((batch[-1] != -100).sum())
            if n:  # an empty block still runs its forward (and gives a NaN mean)
                total += float(out.ce_loss) * n
                count += n
        self.model.train(was_training)
        total, count = D.reduce_floats([total, count], self.layout)
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # -------------------------------------------------------------- checkpoints
    def checkpoint_config(self) -> dict[str, Any]:
        """config.json. Its run is the one-process run that continues the checkpoint exactly (the
        files have the one-process layout): a W-rank run is stored with data.batch_size W*B and
        parallel.ep 1, so `moekit eval`, fine-tuning and the like read it in one process."""
        run = self.cfg.to_dict()
        run["data"]["batch_size"] *= self.layout.world_size
        run["parallel"]["ep"] = 1
        return {
            "moekit_version": __version__,
            "arch": self.cfg.arch,
            "model": self.model_cfg.to_dict(),
            "run": run,
        }

    def save(self) -> Path:
        """Write the checkpoint atomically. Multi-process: every rank must call it (expert shards and
        RNG states are gathered); rank 0 writes the single-process layout, plus each rank's RNG state
        (`rng.rank<r>.torch`). The data position is the same on every rank (see RankRows)."""
        model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        if self.layout.ep > 1:  # every rank takes part in the gathers
            model_state = gather_full_state_dict(self.model, self.layout)
            for alias, source in ckpt.tied_aliases(self.model.state_dict()).items():
                model_state[alias] = model_state[source]  # re-tie the copies: stored once, as usual
            optimizer_state = gather_optimizer_state(self.optimizer, self.model, self.layout)
        rng_states = D.gather_objects(self._rng_state(), self.layout)
        if not self.is_main:  # wait for rank 0's write; fail with it rather than hang or go on
            if D.reduce_floats([1.0], self.layout, "min")[0] < 1.0:
                raise RuntimeError(f"rank 0 could not write the checkpoint {str(self.ckpt_dir)!r}")
            return self.ckpt_dir
        tensors, groups = ckpt.optimizer_state_tensors(optimizer_state)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and not self.layout.distributed:
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        if self.layout.distributed:
            for rank, states in enumerate(rng_states):
                tensors.update({f"rng.rank{rank}.{kind}": s for kind, s in states.items()})
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_seconds": self.elapsed,
            "total_steps": self.total_steps,
            "planned": self.planned,
            "sampler": self.sampler.state_dict(),
            "param_groups": groups,
            "world_size": self.layout.world_size,
            "ep": self.layout.ep,
        }

        def write(folder: Path) -> None:
            from safetensors.torch import save_file

            ckpt.save_state_files(folder, model_state, self.checkpoint_config())
            self.tokenizer.save(folder / ckpt.TOKENIZER_FILE)
            save_file(tensors, str(folder / ckpt.OPTIMIZER_FILE))
            ckpt.write_json(folder / ckpt.STATE_FILE, state)

        try:
            path = ckpt.save_folder_atomically(self.ckpt_dir, write)
        except BaseException:
            D.reduce_floats([0.0], self.layout, "min")  # the other ranks fail too instead of waiting
            raise
        D.reduce_floats([1.0], self.layout, "min")
        return path

    def _rng_state(self) -> dict[str, torch.Tensor]:
        """This rank's random state: torch's CPU generator and its CUDA device's."""
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def try_resume(self) -> bool:
        """Load the run folder's checkpoint if there is one; False when starting fresh."""
        try:
            folder = ckpt.resolve(self.ckpt_dir)
        except ckpt.CheckpointError:
            return False
        config = ckpt.read_json(folder / ckpt.CONFIG_FILE)
        if config.get("model") != self.model_cfg.to_dict() or config.get("arch") != self.cfg.arch:
            raise ckpt.CheckpointError(
                f"the checkpoint in {str(folder)!r} was trained with another model config; "
                f"use another train.run_name or train.out_dir, or set train.resume=false to start over "
                f"(nothing was overwritten)"
            )
        # The files hold the whole model (any EP size wrote them); each rank keeps its experts.
        model_file = folder / ckpt.MODEL_FILE
        full_state = ckpt.read_model_state(model_file, config.get("tied"))
        ckpt.load_state_checked(self.model, slice_experts(full_state, self.model, self.layout), model_file)
        state = ckpt.read_json(folder / ckpt.STATE_FILE)
        tensors = ckpt.read_safetensors(folder / ckpt.OPTIMIZER_FILE)
        ckpt.load_optimizer_state(
            self.optimizer,
            tensors,
            state["param_groups"],
            load=lambda sd: load_sharded_optimizer_state(self.optimizer, sd, self.model, self.layout),
        )
        self._restore_rng(tensors, int(state.get("world_size", 1)), int(state["step"]))
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed = float(state["elapsed_seconds"])
        self.total_steps = int(state.get("total_steps", self.cfg.train.steps))
        self.planned = bool(state.get("planned", True))
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as exc:
            saved_world = int(state.get("world_size", 1))
            if saved_world == self.layout.world_size:
                raise
            raise ckpt.CheckpointError(
                f"{exc}: the checkpoint was written by {saved_world} processes and this run has "
                f"{self.layout.world_size}; keep the global batch (processes * data.batch_size) to resume"
            ) from exc
        return True

    def _restore_rng(self, tensors: dict[str, torch.Tensor], saved_world: int, step: int) -> None:
        """This rank's random state as saved; a run resumed with another world size keeps the data
        order exactly but draws fresh per-rank streams (dropout masks) from the step on."""
        rank, world = self.layout.rank, self.layout.world_size
        if world == 1:
            torch.set_rng_state(tensors["rng.torch"])
            if torch.cuda.is_available():
                cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
                if cuda_states:
                    torch.cuda.set_rng_state_all(cuda_states)
        elif saved_world == world and f"rng.rank{rank}.torch" in tensors:
            torch.set_rng_state(tensors[f"rng.rank{rank}.torch"])
            if self.device.type == "cuda" and f"rng.rank{rank}.cuda" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.rank{rank}.cuda"], self.device)
        else:
            torch.manual_seed(D.rank_seed(self.cfg.train.seed, rank, step))

    # -------------------------------------------------------------- the loop
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics.

        Multi-process: each rank runs its block of every micro batch; losses and routing statistics
        are reduced over all ranks, so the metrics are those of the global batch. Nothing is scaled
        by the world size: the gradient mean over ranks (sync_gradients) averages the ranks' losses.
        """
        cfg = self.cfg
        accum = cfg.train.grad_accum
        lr = lr_at(self.step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        ce = aux = z = 0.0
        routed = [torch.zeros(m.config.num_experts) for m in self.moe_layers]
        dropped, maxvio = [], []
        tokens = 0
        for micro in range(accum):
            batch = self.sampler.next_batch()
            # DDP reduces in the backward of the last micro batch only (the others accumulate)
            last = micro == accum - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                out = self.forward_batch(batch)
                # aux/z are means per micro-batch: averaging keeps them unscaled
                (out.loss / accum).backward()
            ce += float(out.ce_loss.detach()) / accum
            aux += float(out.aux_loss.detach()) / accum
            z += float(out.z_loss.detach()) / accum
            tokens += int(batch[0].numel()) * self.layout.world_size
            for i, s in enumerate(router_stats_of(out)):
                routed[i] += s.routed_per_expert.float().cpu()
                s = reduce_stats(s, self.layout)  # over all ranks, for the metrics
                dropped.append(float(s.dropped_fraction))
                maxvio.append(float(s.max_load_violation))
        sync_gradients(
            self.model, self.layout, dense=self.ddp is None
        )  # mean over ranks (one process: no-op)
        grad_norm = 0.0
        if cfg.train.grad_clip > 0:  # the norm of the whole (unsharded) gradient
            grad_norm = float(clip_grad_norm(self.model, cfg.train.grad_clip, self.layout))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        comm = D.comm_device(self.layout)
        routed = [global_load(r.to(comm), self.layout).cpu() for r in routed]  # the same bias on all ranks
        for layer, load in zip(self.moe_layers, routed):
            layer.update_bias(load)  # aux-loss-free balancing; a no-op for other routers
        losses = mean_over_ranks(torch.tensor([ce, aux, z], dtype=torch.float64, device=comm), self.layout)
        ce, aux, z = losses.tolist()
        self.step += 1
        self.tokens_seen += tokens
        return {
            "step": self.step,
            "loss": ce,
            "aux_loss": aux,
            "z_loss": z,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "dropped_fraction": float(np.mean(dropped)) if dropped else 0.0,
            "max_load_violation": float(np.mean(maxvio)) if maxvio else 0.0,
            "load": [(r / r.sum().clamp_min(1)).tolist() for r in routed],
        }

    def fit(self) -> TrainResult:
        """Train to train.steps (or the time limit), evaluating, logging and saving on the way.

        Multi-process: every rank runs this loop in lockstep; rank 0 alone writes files and the
        progress bar. Ctrl-C is agreed on at the end of a step, then all ranks evaluate and save.
        """
        cfg, t = self.cfg, self.cfg.train
        resumed = t.resume and self.try_resume()
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_text_atomically(self.run_dir / "config.toml", to_toml(cfg))  # the resolved config
            _truncate_metrics(metrics_path, self.step if resumed else 0)
        log_path = metrics_path if self.is_main else Path(os.devnull)
        result = TrainResult(self.run_dir, self.ckpt_dir, self.step)
        tb = _tensorboard_writer(self.run_dir / "tensorboard") if t.tensorboard and self.is_main else None
        bar = _progress(
            t.progress and self.is_main, total=self.total_steps, initial=self.step, desc=f"train {t.run_name}"
        )
        time_limit = t.time_limit_minutes * 60 if t.time_limit_minutes > 0 else math.inf
        last_val = None
        window_tokens, window_start = 0, time.perf_counter()
        try:
            with (
                open(log_path, "a", encoding="utf-8") as log,
                D.StopRequests(self.layout.distributed) as stop,
            ):
                timed: list[float] = []
                while self.step < self.total_steps and self.elapsed < time_limit:
                    start = time.perf_counter()
                    m = self.train_step()
                    # The slowest rank's time and any rank's Ctrl-C: every rank decides alike.
                    seconds, stop_now = D.reduce_floats(
                        [time.perf_counter() - start, float(stop.requested)], self.layout, "max"
                    )
                    self.elapsed += seconds
                    if not self.planned:
                        timed.append(seconds)
                        if len(timed) > PLAN_AFTER:  # the first step (allocations, caches) is not timed
                            self.plan_length(time_limit, sum(timed[1:]) / PLAN_AFTER)
                            bar.total = self.total_steps
                    result.train_losses.append(m["loss"])
                    window_tokens += m["tokens"]
                    if not math.isfinite(m["loss"]):
                        raise FloatingPointError(f"training diverged at step {self.step}: loss {m['loss']}")
                    last_step = self.step == self.total_steps
                    if self.step % t.log_every == 0 or last_step:
                        now = time.perf_counter()
                        m["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
                        m["elapsed_s"] = self.elapsed
                        window_tokens, window_start = 0, now
                        if self.step % t.eval_every == 0 or last_step:
                            m.update(self.evaluate())
                            last_val = m["val_loss"]
                        log.write(json.dumps(m) + "\n")
                        log.flush()
                        if tb is not None:
                            for key, value in m.items():
                                if isinstance(value, (int, float)) and key != "step":
                                    tb.add_scalar(key, value, self.step)
                        bar.set_postfix(
                            loss=f"{m['loss']:.3f}",
                            tok_s=f"{m['tokens_per_s']:.0f}",
                            drop=f"{m['dropped_fraction']:.3f}",
                            maxvio=f"{m['max_load_violation']:.2f}",
                            **({"val": f"{last_val:.3f}"} if last_val is not None else {}),
                        )
                    elif self.step % t.eval_every == 0:
                        ev = self.evaluate()
                        last_val = ev["val_loss"]
                        log.write(json.dumps({"step": self.step, **ev}) + "\n")
                    bar.update(1)
                    if self.step % t.save_every == 0:
                        self.save()
                    if stop_now:
                        result.interrupted = True
                        break
        except KeyboardInterrupt:  # one process (several agree on Ctrl-C above)
            result.interrupted = True
        finally:
            bar.close()
            if tb is not None:
                tb.close()
        if result.interrupted and self.is_main:
            bar.write(f"interrupted at step {self.step}: saving a checkpoint to {self.ckpt_dir}")
        self.save()  # before the final evaluation: torchrun kills stopping workers after 30 s
        if last_val is None or result.interrupted or self.step % t.eval_every:
            ev = self.evaluate()
            last_val = ev["val_loss"]
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps({"step": self.step, "final": True, **ev}) + "\n")
        result.step = self.step
        result.val_loss = last_val
        result.summary = self.summary(last_val)
        return result

    def plan_length(self, time_limit_s: float, seconds_per_step: float) -> None:
        """Fit the run (and so the learning-rate schedule) into the time limit, leaving 3% spare.

        Never past `train.steps`, and never before the steps already taken (a plan made at the last
        configured step ends the run there)."""
        remaining = max(0.0, 0.97 * time_limit_s - self.elapsed)
        self.total_steps = max(
            self.step, min(self.cfg.train.steps, self.step + int(remaining / seconds_per_step))
        )
        self.planned = True

    def summary(self, val_loss: float | None) -> dict[str, Any]:
        params = self.params
        out = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "training_seconds": self.elapsed,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)) if val_loss is not None else None,
            "params_total": params.total,
            "params_active": params.active,
        }
        out["unigram_val_loss"] = unigram_loss(
            self.data.tokens.train, self.data.tokens.validation, self.tokenizer.vocab_size
        )
        return out


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _truncate_metrics(path: Path, keep_until_step: int) -> None:
    """Drop metric lines past the resumed step, so a resumed run's log has no duplicates."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= keep_until_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    _write_text_atomically(path, "".join(x + "\n" for x in kept))


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
        ) from exc
    return SummaryWriter(str(folder))


class _NullBar:
    def set_postfix(self, **kw: Any) -> None: ...
    def update(self, n: int) -> None: ...
    def write(self, s: str) -> None:
        print(s)

    def close(self) -> None: ...


def _progress(enabled: bool, **kw: Any):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kw)


class EvalTrainer(Trainer):
    """A Trainer that only evaluates (`moekit eval`): with `eval_paths`, every given document is
    validation data and the run's own training data is never read (it may not exist here)."""

    def __init__(self, cfg: RunConfig, *, model: nn.Module, eval_paths: list[str] | None = None):
        self.eval_paths = list(eval_paths) if eval_paths else None
        super().__init__(cfg, model=model)

    def _prepare_data(self) -> PreparedData:
        if self.eval_paths is None:
            return super()._prepare_data()
        tokenizer = Tokenizer.from_file(self.cfg.data.tokenizer)
        docs = tuple(
            d for f in expand_paths(self.eval_paths) for d in read_documents(f, self.cfg.data.text_field)
        )
        tokens = encode_documents(tokenizer, [d.text for d in docs])
        return PreparedData(
            Corpus("eval", docs, docs, "eval"), tokenizer, TokenSplits(train=tokens, validation=tokens)
        )
