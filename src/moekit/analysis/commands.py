"""`moekit analyze --ckpt DIR [--data PATH ...] [--out DIR] [--max-tokens N]`: the routing report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    an = sub.add_parser("analyze", help="routing analysis report (HTML + Markdown) of a checkpoint")
    an.add_argument("--ckpt", required=True, help="checkpoint or run folder")
    an.add_argument(
        "--data", nargs="*", default=None, help="text files or globs (default: the run's validation split)"
    )
    an.add_argument("--out", default=None, help="output folder (default: <run folder>/analysis)")
    an.add_argument("--max-tokens", type=int, default=20_000)
    an.add_argument("--seq-len", type=int, default=None)
    an.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from moekit.analysis.report import write_analysis_report
    from moekit.analysis.routing import analyze_routing
    from moekit.data import expand_paths, load_corpus, read_documents
    from moekit.train.commands import _load
    from moekit.train.config import RunConfig

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens={args.max_tokens} is invalid: expected an integer >= 1")
    model, tokenizer, config = _load(args.ckpt)
    folder = Path(config["folder"])
    run = RunConfig.from_dict(config["run"]) if "run" in config else RunConfig()
    if args.data:  # every document of the given files (as `moekit eval --data` reads them)
        texts = [
            d.text for f in expand_paths(list(args.data)) for d in read_documents(f, run.data.text_field)
        ]
    else:
        d = run.data
        corpus = load_corpus(
            d.paths or None,
            validation_paths=d.validation_paths or None,
            validation_fraction=d.validation_fraction,
            text_field=d.text_field,
        )
        texts = list(corpus.validation_texts())
    seq_len = args.seq_len or run.data.seq_len
    analysis = analyze_routing(model, tokenizer, texts, seq_len=seq_len, max_tokens=args.max_tokens)
    out = Path(args.out) if args.out else folder.parent / "analysis"
    metrics = folder.parent / "metrics.jsonl"
    numbers = write_analysis_report(
        analysis,
        tokenizer,
        out,
        title=f"moekit routing analysis: {folder}",
        metrics_path=metrics if metrics.exists() else None,
    )
    for row in numbers["layers"]:
        print(
            f"{row['layer']:>18}: dropped {row['dropped_fraction']:.4f}  entropy {row['router_entropy']:.3f}  "
            f"max load violation {row['max_load_violation']:.3f}  I(expert; category) {row['mutual_information_bits']:.4f} bits"
        )
    print(f"report: {out / 'report.html'}  summary: {out / 'summary.md'}")
    return 0
