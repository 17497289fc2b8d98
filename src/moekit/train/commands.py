"""`moekit train`, `moekit eval` and `moekit generate`: argument parsing and console output.

moekit train [--config FILE] [--set section.key=value ...] [--print-config]
torchrun --nproc-per-node W -m moekit train --set parallel.ep=P ...   (W processes, experts split P ways)
moekit eval --ckpt DIR [--data PATH ...] [--batches N]
moekit generate --ckpt DIR --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K] [--top-p P]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.toml"


def add_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train an MoE language model (the main job)")
    train.add_argument(
        "--config", default=None, help=f"TOML config (default: {DEFAULT_CONFIG.name}, shipped)"
    )
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value"
    )
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=run_train)

    ev = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    ev.add_argument("--ckpt", required=True, help="checkpoint or run folder")
    ev.add_argument(
        "--data", nargs="*", default=None, help="files or globs to evaluate on (default: the run's data)"
    )
    ev.add_argument(
        "--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)"
    )
    ev.set_defaults(func=run_eval)

    gen = sub.add_parser("generate", help="sample text from a checkpoint (KV cache)")
    gen.add_argument("--ckpt", required=True, help="checkpoint or run folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=run_generate)


def run_train(args: argparse.Namespace) -> int:
    """One process, or each of the W processes `torchrun --nproc-per-node W -m moekit train` starts
    (rank 0 prints and writes the report; errors are printed by every rank, which all exit non-zero)."""
    from moekit.train.config import load_config, to_toml
    from moekit.train.distributed import barrier, env_rank, stop_process_group
    from moekit.train.report import write_report
    from moekit.train.trainer import Trainer

    cfg = load_config(args.config or DEFAULT_CONFIG, args.set)
    if args.print_config:
        print(to_toml(cfg))
        return 0
    rank, world = env_rank()
    if rank == 0:
        processes = (
            f" ({world} processes, parallel.ep={cfg.parallel.ep}, data parallel: {cfg.parallel.data_parallel})"
            if world > 1
            else ""
        )
        print(f"moekit train: run folder {Path(cfg.train.out_dir) / cfg.train.run_name}{processes}")
    try:
        trainer = Trainer(cfg)
        if trainer.is_main:
            print(
                f"data: {trainer.data.corpus.name} corpus, {len(trainer.data.tokens.train):,} train / "
                f"{len(trainer.data.tokens.validation):,} validation tokens, vocabulary {trainer.tokenizer.vocab_size}"
            )
        result = trainer.fit()
        if trainer.is_main:
            summary_path = write_report(result.run_dir, result.summary, result.checkpoint_dir)
        barrier(trainer.layout)  # torchrun stops every rank once one exits non-zero (130): report first
    finally:
        stop_process_group()
    if not trainer.is_main:
        return 130 if result.interrupted else 0
    s = result.summary
    print()
    state = "interrupted" if result.interrupted else "done"
    print(f"{state}: {s['step']} steps, {s['tokens_seen']:,} tokens in {s['training_seconds']:.0f} s")
    print(
        f"validation loss {s['val_loss']:.4f} (perplexity {s['val_ppl']:.1f}); "
        f"unigram baseline {s['unigram_val_loss']:.4f}"
    )
    print(f"checkpoint: {result.checkpoint_dir}")
    print(f"report:     {summary_path}")
    print(f"try:        moekit generate --ckpt {result.checkpoint_dir} --prompt 'def '")
    return 130 if result.interrupted else 0


def _load(ckpt: str):
    from moekit.data import Tokenizer
    from moekit.train.checkpoint import TOKENIZER_FILE, load_model

    model, config = load_model(ckpt)
    tok_path = Path(config["folder"]) / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"{str(tok_path)!r} is missing: the checkpoint has no tokenizer")
    return model, Tokenizer.from_file(tok_path), config


def run_eval(args: argparse.Namespace) -> int:
    from moekit.train.config import RunConfig
    from moekit.train.trainer import EvalTrainer

    model, tokenizer, config = _load(args.ckpt)
    cfg = RunConfig.from_dict(config["run"])
    cfg.data.tokenizer = str(Path(config["folder"]) / "tokenizer.json")
    if args.batches is not None:
        cfg.train.eval_batches = args.batches
    cfg.train.device = "cpu"
    trainer = EvalTrainer(cfg, model=model, eval_paths=args.data)
    metrics = trainer.evaluate()
    print(f"validation loss {metrics['val_loss']:.4f}  perplexity {metrics['val_ppl']:.2f}")
    return 0 if math.isfinite(metrics["val_loss"]) else 1


def run_generate(args: argparse.Namespace) -> int:
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens={args.max_tokens} is invalid: expected an integer >= 0")
    model, tokenizer, config = _load(args.ckpt)
    if config["arch"] != "decoder":
        raise ValueError(f"generate needs a decoder-only checkpoint; {args.ckpt!r} is {config['arch']!r}")
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens: give a non-empty prompt")
    room = model.config.max_seq_len - len(ids)
    if room <= 0:
        raise ValueError(
            f"the prompt has {len(ids)} tokens; the model's max_seq_len is {model.config.max_seq_len}"
        )
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=min(args.max_tokens, room),
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    sys.stdout.write(tokenizer.decode(out[0].tolist()) + "\n")
    return 0
