"""`moekit prune`, `moekit merge` and `moekit quantize`: compress a checkpoint into a new folder.

moekit prune    --ckpt DIR --keep N --out DIR [--calib FILE ...] [--eval-batches N]
moekit merge    --ckpt DIR --keep N --out DIR [--grouping router|output|weight] [--router-rows dominant|mean]
                [--no-align] [--calib FILE ...] [--eval-batches N]
moekit quantize --ckpt DIR --method int8|int4|ternary --out DIR [--group-size G] [--calib FILE ...]

Calibration data defaults to the checkpoint's own training data. The input folder is never
written: --out equal to it, inside it or above it is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint or run folder")
    p.add_argument("--out", required=True, help="output checkpoint folder (never the input)")
    p.add_argument(
        "--calib", nargs="+", default=None, help="calibration files/globs (default: the run's data)"
    )
    p.add_argument("--calib-sequences", type=int, default=32, help="calibration sequences")
    p.add_argument(
        "--eval-batches", type=int, default=0, help="report validation loss before/after (0 = skip)"
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    from moekit.compress.merge import GROUPINGS, ROUTER_ROWS

    prune = sub.add_parser("prune", help="drop the least used experts of every MoE layer")
    _common(prune)
    prune.add_argument("--keep", type=int, required=True, help="experts to keep per MoE layer")
    prune.set_defaults(func=run_prune)

    merge = sub.add_parser("merge", help="merge similar experts (MC-SMoE) down to --keep per MoE layer")
    _common(merge)
    merge.add_argument("--keep", type=int, required=True, help="experts to keep per MoE layer")
    merge.add_argument("--grouping", choices=GROUPINGS, default="router", help="similarity that forms groups")
    merge.add_argument("--router-rows", choices=ROUTER_ROWS, default="dominant", help="router row of a group")
    merge.add_argument("--no-align", action="store_true", help="average without aligning hidden units")
    merge.set_defaults(func=run_merge)

    quant = sub.add_parser(
        "quantize", help="int8 / int4 / ternary (sub-1-bit) experts; router and norms stay float32"
    )
    _common(quant)
    quant.add_argument("--method", required=True, help="int8, int4 or ternary")
    quant.add_argument("--group-size", type=int, default=32, help="int4: inputs per scale and zero point")
    quant.add_argument("--no-gptq", action="store_true", help="ternary: plain rounding, no error feedback")
    quant.add_argument(
        "--damp", type=float, default=0.01, help="ternary: GPTQ dampening (fraction of mean diag)"
    )
    quant.add_argument("--dead-zone", type=float, default=0.5, help="ternary: round to 0 below this * level")
    quant.add_argument("--code-bits", type=int, default=16, help="ternary: dictionary codeword width")
    quant.set_defaults(func=run_quantize)


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from moekit.compress.derived import check_output_folder
    from moekit.train.checkpoint import load_model

    model, config = load_model(args.ckpt)
    check_output_folder(config["folder"], args.out)  # before any work
    return model, config


def _calibrate(model: Any, config: dict[str, Any], args: argparse.Namespace) -> list:
    from moekit.compress.calibrate import calibration_batches, record_routing

    return record_routing(model, calibration_batches(config, args.calib, args.calib_sequences))


def _report(model: Any, new: Any, config: dict[str, Any], args: argparse.Namespace, out: Any) -> None:
    from moekit.model import count_params

    before, after = count_params(model).total, count_params(new).total
    print(f"parameters {before:,} -> {after:,} ({after / before:.1%})")
    if args.eval_batches > 0:
        from moekit.compress.evaluate import validation_loss

        old_loss = validation_loss(model, config, args.eval_batches)["val_loss"]
        new_loss = validation_loss(new, config, args.eval_batches)["val_loss"]
        print(f"validation loss {old_loss:.4f} -> {new_loss:.4f} ({new_loss - old_loss:+.4f})")
    print(f"checkpoint: {out}")


def _print_plans(plans: list, records: list) -> None:
    for i, (plan, record) in enumerate(zip(plans, records)):
        usage = record.usage_E if record is not None else None
        line = f"  MoE layer {i}: {plan.groups}"
        if usage is not None and usage.sum() > 0:
            share = sum(float(usage[g[0]]) for g in plan.groups) / float(usage.sum())
            line += f"  (the kept/dominant experts took {share:.0%} of the calibration assignments)"
        print(line)


def run_prune(args: argparse.Namespace) -> int:
    from moekit.compress.derived import save_derived_checkpoint
    from moekit.compress.merge import check_keep, prune_model

    model, config = _load(args)
    check_keep(model, args.keep)
    records = _calibrate(model, config, args)
    new, plans = prune_model(model, records, args.keep)
    step = {"op": "prune", "keep": args.keep, "experts_kept": [[g[0] for g in p.groups] for p in plans]}
    out = save_derived_checkpoint(new, config, args.out, step)
    print(f"pruned to {args.keep} experts per MoE layer; kept:")
    _print_plans(plans, records)
    _report(model, new, config, args, out)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from moekit.compress.derived import save_derived_checkpoint
    from moekit.compress.merge import check_keep, merge_model

    model, config = _load(args)
    check_keep(model, args.keep)
    records = _calibrate(model, config, args)  # usage decides the dominant experts and the weights
    new, plans = merge_model(model, records, args.keep, args.grouping, args.router_rows, not args.no_align)
    step = {
        "op": "merge",
        "keep": args.keep,
        "grouping": args.grouping,
        "router_rows": args.router_rows,
        "align": not args.no_align,
        "groups": [p.groups for p in plans],
    }
    out = save_derived_checkpoint(new, config, args.out, step)
    print(
        f"merged to {args.keep} experts per MoE layer (grouping by {args.grouping}); groups, dominant first:"
    )
    _print_plans(plans, records)
    _report(model, new, config, args, out)
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from moekit.compress.calibrate import calibration_batches
    from moekit.compress.quantize import QuantSpec, quantize_model, save_quantized
    from moekit.train.checkpoint import MODEL_FILE

    spec = QuantSpec(
        args.method, args.group_size, not args.no_gptq, args.damp, args.dead_zone, args.code_bits
    )
    model, config = _load(args)
    if config.get("quantization"):
        raise ValueError(
            f"{config['folder']!r} is already quantized ({config['quantization'].get('method')}): "
            "quantize its float source checkpoint"
        )
    batches = (
        calibration_batches(config, args.calib, args.calib_sequences) if spec.needs_calibration else None
    )
    qmodel, report = quantize_model(model, spec, batches)
    out = save_quantized(qmodel, config, args.out, spec)
    print(
        f"quantized the experts to {spec.method}: {report['bits_per_expert_param']:.3f} bits per expert weight"
    )
    if spec.method == "ternary":
        print(
            f"  zeros {report['zero_fraction']:.1%}, codewords {report['code_bits_per_param']:.3f} bits/weight "
            f"(pair entropy {report['entropy_bits_per_param']:.3f}), the rest are the row levels"
        )
    before = (Path(config["folder"]) / MODEL_FILE).stat().st_size
    after = (Path(out) / MODEL_FILE).stat().st_size
    print(f"model file {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({before / after:.2f}x smaller)")
    if args.eval_batches > 0:
        from moekit.compress.evaluate import validation_loss

        old_loss = validation_loss(model, config, args.eval_batches)["val_loss"]
        new_loss = validation_loss(qmodel, config, args.eval_batches)["val_loss"]
        print(f"validation loss {old_loss:.4f} -> {new_loss:.4f} ({new_loss - old_loss:+.4f})")
    print(f"checkpoint: {out}")
    return 0
