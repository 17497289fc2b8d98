"""`moekit finetune`, `moekit upcycle` and `moekit distill`: argument parsing and console output.

moekit finetune --ckpt DIR --data FILE... [--freeze STRATEGY] [--lora-rank R] [--instruct]
                [--expert-dropout P] [--aux-loss on|off] [--out RUN_DIR] [--config F] [--set K=V ...]
moekit upcycle  --ckpt DENSE --out DIR --experts E [--top-k K] [--noise S] [--layers every|every_other]
moekit distill  --teacher DIR --out RUN_DIR [--alpha 0.25] [--ffn-init average|fresh] [--config F] [--set ...]

--out of finetune/distill is the run folder (train.out_dir/train.run_name); `moekit eval --ckpt RUN_DIR`
reads its checkpoint. No command writes into its input checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from moekit.adapt.freeze import STRATEGIES
from moekit.adapt.lora import TARGETS


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML config applied over the defaults of this command")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value"
    )
    p.add_argument("--data", nargs="+", default=None, help="training files or globs (sets data.paths)")
    p.add_argument(
        "--val-data", nargs="+", default=None, help="validation files (sets data.validation_paths)"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_commands(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a checkpoint (freezing, LoRA, instruction data)")
    ft.add_argument("--ckpt", required=True, help="checkpoint or run folder to start from (never written)")
    ft.add_argument(
        "--freeze",
        default=None,
        help=f"what to freeze: {', '.join(STRATEGIES)} (default: none; all with LoRA)",
    )
    ft.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0 = none)")
    ft.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    ft.add_argument("--lora-targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    ft.add_argument(
        "--instruct", action="store_true", help="data are JSONL prompt/response pairs (loss on responses)"
    )
    ft.add_argument("--prompt-field", default="prompt")
    ft.add_argument("--response-field", default="response")
    ft.add_argument(
        "--expert-dropout", type=float, default=None, help="dropout inside experts (sets moe.expert_dropout)"
    )
    ft.add_argument(
        "--aux-loss", choices=("on", "off"), default=None, help="off sets every balance-loss coefficient to 0"
    )
    ft.add_argument("--out", default=None, help="run folder (default: train.out_dir/train.run_name)")
    _config_args(ft)
    ft.set_defaults(func=run_finetune)

    up = sub.add_parser("upcycle", help="turn a dense checkpoint into an MoE (sparse upcycling)")
    up.add_argument("--ckpt", required=True, help="dense checkpoint or run folder (never written)")
    up.add_argument("--out", required=True, help="folder for the upcycled checkpoint")
    up.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
    up.add_argument("--top-k", type=int, default=2)
    up.add_argument(
        "--noise", type=float, default=0.0, help="relative std of noise added to each expert copy"
    )
    up.add_argument("--layers", default="every", help="every | every_other (layers 1, 3, 5, ...)")
    up.add_argument("--router", default="topk", help="topk | topk_then_softmax")
    up.add_argument("--seed", type=int, default=0)
    up.set_defaults(func=run_upcycle)

    di = sub.add_parser("distill", help="distill an MoE checkpoint into a dense student")
    di.add_argument("--teacher", required=True, help="MoE checkpoint or run folder (never written)")
    di.add_argument("--out", required=True, help="run folder of the student")
    di.add_argument(
        "--alpha", type=float, default=0.25, help="weight of the teacher's probabilities (Switch: 0.25)"
    )
    di.add_argument("--temperature", type=float, default=1.0)
    di.add_argument("--ffn-init", default="average", help="average (of the experts) | fresh")
    _config_args(di)
    di.set_defaults(func=run_distill)


def _flags(args: argparse.Namespace, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    flags: dict[str, dict[str, Any]] = {"data": {}, "train": {}, "moe": {}, **extra}
    if args.data:
        flags["data"]["paths"] = list(args.data)
    if args.val_data:
        flags["data"]["validation_paths"] = list(args.val_data)
    if getattr(args, "out", None):
        out = Path(args.out)
        flags["train"].update(out_dir=str(out.parent), run_name=out.name)
    return {k: v for k, v in flags.items() if v}


def _train_and_report(trainer, what: str) -> int:
    from moekit.train.report import write_report

    t = trainer.cfg.train
    print(f"moekit {what}: run folder {trainer.run_dir}")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(f"parameters: {trainable:,} trainable of {total:,}; {t.steps} steps at lr {t.lr}")
    result = trainer.fit()
    write_report(result.run_dir, result.summary, result.checkpoint_dir)
    s = result.summary
    state = "interrupted" if result.interrupted else "done"
    print(f"{state}: {s['step']} steps in {s['training_seconds']:.0f} s; validation loss {s['val_loss']:.4f}")
    print(f"checkpoint: {result.checkpoint_dir}")
    return 130 if result.interrupted else 0


def run_finetune(args: argparse.Namespace) -> int:
    from moekit.adapt.checkpoints import AUX_LOSS_KEYS, Source
    from moekit.adapt.finetune import (
        MERGED_DIR,
        FinetuneOptions,
        FinetuneTrainer,
        finetune_config,
        load_finetune_model,
    )
    from moekit.train.config import to_toml

    options = FinetuneOptions(
        freeze=args.freeze,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        instruct=args.instruct,
        prompt_field=args.prompt_field,
        response_field=args.response_field,
    )
    options.validate()  # an unknown strategy fails before any data is read
    source = Source.open(args.ckpt)
    moe: dict[str, Any] = {}
    if args.expert_dropout is not None:
        moe["expert_dropout"] = args.expert_dropout
    if args.aux_loss == "off":
        moe.update(dict.fromkeys(AUX_LOSS_KEYS, 0.0))
    if moe and source.model_config.moe is None:
        raise ValueError("--expert-dropout/--aux-loss need an MoE checkpoint; this one is dense")
    cfg = finetune_config(source, args.config, args.set, _flags(args, moe=moe))
    if args.print_config:
        print(to_toml(cfg))
        return 0
    trainer = FinetuneTrainer(cfg, load_finetune_model(source, cfg), options)
    print(
        f"freeze {options.strategy!r}: {len(trainer.frozen)} parameter tensors frozen; LoRA modules: {len(trainer.lora_modules)}"
    )
    code = _train_and_report(trainer, "finetune")
    if trainer.lora_modules:
        print(f"merged model (LoRA folded in): {trainer.run_dir / MERGED_DIR}")
    return code


def run_upcycle(args: argparse.Namespace) -> int:
    from moekit.adapt.upcycle import upcycle_checkpoint
    from moekit.model import count_params

    folder, dense, model = upcycle_checkpoint(
        args.ckpt,
        args.out,
        args.experts,
        args.top_k,
        noise=args.noise,
        layers=args.layers,
        router=args.router,
        seed=args.seed,
    )
    before, after = count_params(dense), count_params(model)
    moe_layers = [i for i in range(model.config.n_layers) if model.config.is_moe_layer(i)]
    print(
        f"upcycled {len(moe_layers)} FFN layers {moe_layers} into {args.experts} experts (top-{args.top_k}, noise {args.noise})"
    )
    print(
        f"parameters: {before.total:,} -> {after.total:,} total; {before.active:,} -> {after.active:,} active per token"
    )
    if model.config.max_seq_len >= 2 and hasattr(model, "generate"):
        probe = torch.randint(
            0,
            model.config.vocab_size,
            (2, min(16, model.config.max_seq_len)),
            generator=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():
            diff = (model(probe).logits - dense(probe).logits).abs().max().item()
        print(f"max |logit difference| to the dense model on a random probe: {diff:.2e}")
    print(f"checkpoint: {folder}")
    print(f"continue training: moekit finetune --ckpt {folder} --data FILES --out RUN_DIR")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from moekit.adapt.checkpoints import Source, refuse_overwrite, run_config_for
    from moekit.adapt.distill import DistillTrainer, check_alpha, dense_student, dense_student_config
    from moekit.train.checkpoint import build_model
    from moekit.train.config import to_toml

    check_alpha(args.alpha)
    source = Source.open(args.teacher)
    refuse_overwrite(source.folder, Path(args.out))
    student_cfg = dense_student_config(source.model_config)
    defaults = {"train": {"run_name": "distill"}, "data": {"tokenizer": str(source.tokenizer_file)}}
    cfg = run_config_for(
        source.arch,
        student_cfg,
        source.run,
        defaults=defaults,
        path=args.config,
        overrides=args.set,
        flags=_flags(args),
    )
    if args.print_config:
        print(to_toml(cfg))
        return 0
    teacher = source.load_weights(build_model(source.arch, source.model_config))
    student = dense_student(teacher, source.arch, args.ffn_init, seed=cfg.train.seed)
    record = {"teacher": str(source.folder), "ffn_init": args.ffn_init}
    trainer = DistillTrainer(cfg, student, teacher, args.alpha, args.temperature, record)
    print(f"teacher {source.folder} -> dense student (FFN init {args.ffn_init!r}), alpha {args.alpha}")
    return _train_and_report(trainer, "distill")
