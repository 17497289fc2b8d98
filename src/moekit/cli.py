"""The `moekit` command line: one subcommand per job, each implemented next to its feature.

    moekit demo                 run the MoE layer on random data and print its losses and stats
    moekit train [--config F]   train an MoE language model (the main job)
    moekit eval / generate      evaluate or sample from a checkpoint
    moekit convert --from-hf DIR | --to-hf CKPT --out P   Hugging Face folders <-> moekit checkpoints
    moekit finetune / upcycle / distill   adapt a trained checkpoint (see moekit.adapt)
    moekit serve --ckpt DIR     OpenAI-compatible HTTP server for a checkpoint (serve extra)
    moekit train-tasks / extract   task-level routing: multi-task training, one task's sub-network
    moekit prune / merge / quantize   fewer experts, or int8/int4/ternary experts, in a new checkpoint
    moekit experiment NAME|all  run experiments against the papers' claims (docs/results.md)
    moekit bench [--quick] [--suite layer|e2e|all]   speed against transformers (docs/benchmarks.md)

Every subcommand registers its arguments in `_build_parser` and returns an exit code.
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from moekit.moe import MoE, MoEConfig

    torch.manual_seed(args.seed)
    cfg = MoEConfig(dim=64, hidden_dim=128, num_experts=args.experts, top_k=args.top_k, router=args.router)
    moe = MoE(cfg)
    x = torch.randn(4, 32, cfg.dim)
    out = moe(x)
    print(moe)
    print(
        f"output {tuple(out.output.shape)}  aux_loss {out.aux_loss.item():.4f}  z_loss {out.z_loss.item():.5f}"
    )
    for name, value in out.stats.to_dict().items():
        print(f"  {name}: {value}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts transformers in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run one MoE layer on random data")
    demo.add_argument("--router", default="topk")
    demo.add_argument("--experts", type=int, default=8)
    demo.add_argument("--top-k", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    from moekit.train.commands import add_commands as add_train_commands

    add_train_commands(sub)  # train, eval, generate

    from moekit.hf.commands import add_commands as add_hf_commands

    add_hf_commands(sub)  # convert
    from moekit.adapt.commands import add_commands as add_adapt_commands

    add_adapt_commands(sub)  # finetune, upcycle, distill

    from moekit.serve.commands import add_commands as add_serve_commands

    add_serve_commands(sub)  # serve

    from moekit.analysis.commands import add_commands as add_analysis_commands

    add_analysis_commands(sub)  # analyze

    from moekit.tasks.commands import add_commands as add_task_commands

    add_task_commands(sub)  # train-tasks, extract

    from moekit.compress.commands import add_commands as add_compress_commands

    add_compress_commands(sub)  # prune, merge, quantize

    from moekit.experiments.commands import add_commands as add_experiment_commands

    add_experiment_commands(sub)  # experiment

    from moekit.bench import add_commands as add_bench_commands

    add_bench_commands(sub)  # bench
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # bad input: a clear message, not a traceback
        print(f"moekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
