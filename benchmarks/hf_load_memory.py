"""Peak memory of loading a Hugging Face MoE checkpoint with moekit, against the checkpoint's size.

Builds a Mixtral-shaped model of a few hundred MB with transformers at random init, saves it in
both expert layouts (per-expert keys and fused), then loads each in a fresh subprocess and reports
the peak resident set size (VmHWM) above the resident size after imports (VmRSS):

    moekit   moekit.from_pretrained (streams one tensor at a time into a model allocated once)
    mmap     the same model filled through safetensors' safe_open, for comparison: every mapped
             page it touches stays resident until the file closes
    hf       transformers' AutoModelForCausalLM.from_pretrained (with --transformers)

Run:  python benchmarks/hf_load_memory.py [--dir /tmp/moekit-mem] [--transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ARCH = dict(  # ~226M parameters, ~450 MB in bfloat16
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
)

CHILD = r"""
import sys, json, torch
mode, folder = sys.argv[1], sys.argv[2]
def status_mb(field):  # VmRSS: resident now; VmHWM: peak resident (per process, reset by exec)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
import moekit.hf
from moekit.model import ModelConfig, MoETransformer
from moekit.moe import MoEConfig
if mode == "hf":
    import transformers
with torch.device("meta"):  # warm-up: torch's meta kernels import lazily (~70 MB of Python, once)
    tiny = ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, moe=MoEConfig(dim=8, hidden_dim=8, num_experts=2))
    MoETransformer(tiny).state_dict()
    torch.empty(3, 4)[torch.tensor([0, 1])]
base = status_mb("VmRSS")
if mode == "moekit":
    model = moekit.hf.from_pretrained(folder)
elif mode == "mmap":
    from safetensors import safe_open
    from moekit.hf import plan_for, config_from_hf, empty_model, family
    from moekit.hf.io import DTYPES, read_config
    from moekit.hf.plan import load_plan
    hf = read_config(folder)
    cfg = config_from_hf(hf)
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        plan = plan_for(cfg, family(hf["model_type"]), list(f.keys()))
        model = empty_model(cfg, torch.bfloat16)
        class Source:
            def dtype(self, key):
                return DTYPES[f.get_slice(key).get_dtype()]
            def read(self, key):
                return f.get_tensor(key)
        load_plan(plan, Source(), dict(model.state_dict()))
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"base_mb": base, "peak_mb": status_mb("VmHWM"), "model_mb": params}))
"""


def build(folder: Path) -> None:
    import torch
    import transformers

    if (folder / "per_expert" / "config.json").is_file() and (folder / "fused" / "config.json").is_file():
        return
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**ARCH)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder / "per_expert")
    model.save_pretrained(folder / "fused", save_original_format=False)


def measure(mode: str, folder: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(folder)], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="/tmp/moekit-hf-memory")
    parser.add_argument("--transformers", action="store_true", help="also measure transformers' loader")
    args = parser.parse_args()
    root = Path(args.dir)
    build(root)
    modes = ["moekit", "mmap"] + (["hf"] if args.transformers else [])
    print("| layout | loader | checkpoint MB | model MB | peak RSS above baseline MB | ratio to checkpoint |")
    print("|---|---|---|---|---|---|")
    for layout in ("per_expert", "fused"):
        folder = root / layout
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        for mode in modes:
            if mode == "mmap" and layout == "fused":
                continue
            r = measure(mode, folder)
            extra = r["peak_mb"] - r["base_mb"]
            print(
                f"| {layout} | {mode} | {size:.0f} | {r['model_mb']:.0f} | {extra:.0f} | {extra / size:.2f} |"
            )


if __name__ == "__main__":
    main()
