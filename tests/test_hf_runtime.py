"""Hugging Face interop at run time, without the transformers reference.

transformers is an optional extra (`hf`): a fresh interpreter with every `transformers` import
blocked builds a Mixtral-family and a Switch model from config.json dicts, saves them with
`save_pretrained`, loads them back with `moekit.from_pretrained`, runs `moekit convert` both ways
and generates; none of it may import transformers.

Loading streams: the peak resident memory of loading a ~120 MB checkpoint in a fresh process
(benchmarks/hf_load_memory.py's measurement) stays near one copy of the weights, in both layouts.

This file runs whether or not transformers is installed.

Run: python -m pytest tests/test_hf_runtime.py
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    r"""
    import sys

    class BlockTransformers:
        def find_spec(self, name, path=None, target=None):
            if name == "transformers" or name.startswith("transformers."):
                raise ImportError(f"{name} is blocked: moekit must not need transformers at run time")

    sys.meta_path.insert(0, BlockTransformers())
    from pathlib import Path

    import torch

    import moekit
    from moekit.cli import main
    from moekit.hf import config_from_hf
    from moekit.hf.switch import switch_config_from_hf
    from moekit.model import MoEEncoderDecoder, MoETransformer

    root = Path(sys.argv[1])
    torch.manual_seed(0)
    cfg = config_from_hf({
        "model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64,
    })
    model = MoETransformer(cfg).eval()
    model.save_pretrained(root / "mixtral", max_shard_size="20KB")
    back = moekit.from_pretrained(root / "mixtral")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert torch.equal(back.generate(ids, 5, temperature=0), model.generate(ids, 5, temperature=0))
    assert main(["convert", "--from-hf", str(root / "mixtral"), "--out", str(root / "ckpt")]) == 0
    assert main(["convert", "--to-hf", str(root / "ckpt"), "--out", str(root / "mixtral2")]) == 0
    with torch.no_grad():
        assert torch.equal(moekit.from_pretrained(root / "mixtral2")(ids).logits, model(ids).logits)

    switch = MoEEncoderDecoder(switch_config_from_hf({
        "vocab_size": 50, "d_model": 32, "d_kv": 8, "d_ff": 16, "num_layers": 2, "num_decoder_layers": 2,
        "num_heads": 4, "num_experts": 4, "expert_capacity": 4, "num_sparse_encoder_layers": 1,
        "num_sparse_decoder_layers": 1, "dropout_rate": 0.0,
    })).eval()
    switch.save_pretrained(root / "switch")
    again = moekit.from_pretrained(root / "switch")
    x, y = torch.randint(2, 50, (2, 9)), torch.randint(2, 50, (2, 5))
    with torch.no_grad():
        assert torch.equal(again(x, y).logits, switch(x, y).logits)

    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "transformers")
    assert not loaded, loaded
    print("ok")
    """
)


def test_interop_runs_without_transformers(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc")
@pytest.mark.parametrize("fused", [False, True])
def test_loading_holds_one_copy_of_the_weights(tmp_path, fused):
    """Peak RSS above the baseline while loading stays under 1.3 x the checkpoint (two copies: 2)."""
    from moekit.hf import config_from_hf
    from moekit.model import MoETransformer

    spec = importlib.util.spec_from_file_location("hf_load_memory", REPO / "benchmarks" / "hf_load_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = config_from_hf(
        {
            "model_type": "mixtral",
            "vocab_size": 4096,
            "hidden_size": 512,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 256,
        }
    )
    MoETransformer(cfg).save_pretrained(tmp_path / "ckpt", fused=fused)  # float32, ~120 MB
    size_mb = sum(p.stat().st_size for p in (tmp_path / "ckpt").glob("*.safetensors")) / 2**20
    r = bench.measure("moekit", tmp_path / "ckpt")
    assert r["model_mb"] == pytest.approx(size_mb, rel=0.01)
    assert r["peak_mb"] - r["base_mb"] < 1.3 * size_mb, (r, size_mb)
