"""`moekit convert`: Hugging Face folders <-> moekit checkpoints.

    moekit convert --from-hf DIR --out CKPT [--dtype bfloat16]
        a transformers folder (config.json + safetensors) -> a moekit checkpoint folder
        (model.safetensors + config.json, the format `moekit eval/generate/finetune` read)
    moekit convert --to-hf CKPT --out DIR [--model-type mixtral] [--fused] [--max-shard-size 5GB]
        a moekit checkpoint (or run folder) -> a folder transformers' AutoModelForCausalLM loads

The work is done by `moekit.hf.from_pretrained` / `save_pretrained` and the checkpoint functions of
`moekit.train.checkpoint`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert between Hugging Face folders and moekit checkpoints")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a transformers model folder to read")
    source.add_argument("--to-hf", metavar="CKPT", help="a moekit checkpoint (or run) folder to write out")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--model-type", default=None, help="--to-hf: family to write (default: the one imported)")
    p.add_argument("--fused", action="store_true", help="--to-hf: fused expert tensors, not per-expert keys")
    p.add_argument("--max-shard-size", default="5GB", help="--to-hf: largest safetensors shard (e.g. 500MB)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="tensor dtype (default: the source's)"
    )
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from moekit import __version__
    from moekit.hf import from_pretrained, save_pretrained
    from moekit.hf.io import SafetensorsReader
    from moekit.train import checkpoint as ckpt

    dtype = DTYPES[args.dtype] if args.dtype else None
    out = Path(args.out)
    if args.from_hf:
        model = from_pretrained(args.from_hf, dtype=dtype)
        arch = "encdec" if type(model).__name__ == "MoEEncoderDecoder" else "decoder"
        config = {"moekit_version": __version__, "arch": arch, "model": model.config.to_dict()}
        ckpt.save_folder_atomically(out, lambda tmp: ckpt.save_model_files(tmp, model, config))
        print(
            f"wrote moekit checkpoint {str(out)!r} ({arch}, {model.config.extra['hf_config']['model_type']})"
        )
        return 0
    folder = ckpt.resolve(args.to_hf)
    model, _ = ckpt.load_model(folder)
    if dtype is None:  # the checkpoint's own dtype, not the float32 the model was rebuilt in
        reader = SafetensorsReader(folder)
        dtype = reader.dtype(reader.keys()[0])
    written = save_pretrained(
        model,
        out,
        model_type=args.model_type,
        fused=args.fused,
        max_shard_size=args.max_shard_size,
        dtype=dtype,
    )
    print(f"wrote Hugging Face folder {str(written)!r}")
    return 0
