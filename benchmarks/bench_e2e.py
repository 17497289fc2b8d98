"""End-to-end speed: moekit's default MoE language model against transformers' MixtralForCausalLM.

Both models get the same architecture (moekit's default.toml: 4 layers, dim 256, 8 heads with 4 KV
heads, 8 SwiGLU experts of hidden 512, top-2 in every layer, vocabulary 4096, tied embeddings),
the same batch and sequence length, float32 on the CPU, AdamW. Measured in one process, medians
after warm-up, the three implementations in turns (one run of each per round):
  - training tokens/s: forward + backward (with each library's load-balancing loss) + AdamW step;
  - greedy generation tokens/s at batch 1 with the KV cache (a fixed number of new tokens).
transformers is measured with both its `eager` and `grouped_mm` experts and the faster one is the
baseline. Run:  python -m moekit bench --suite e2e   (or python benchmarks/bench_e2e.py [--quick]).
On a GPU (`device="cuda"`, what `moekit bench --suite gpu` runs) the same comparison runs with the
weights in float32 under bf16 autocast (mixed precision, as moekit's trainer trains on a GPU), a
larger batch, and the device synchronized around every timed run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

ARCH = dict(vocab=4096, dim=256, layers=4, heads=8, kv_heads=4, experts=8, top_k=2, expert_hidden=512)


def moekit_model(arch: dict[str, int]) -> torch.nn.Module:
    from moekit.model import ModelConfig, MoETransformer
    from moekit.moe import MoEConfig

    moe = MoEConfig(
        dim=arch["dim"],
        hidden_dim=arch["expert_hidden"],
        num_experts=arch["experts"],
        top_k=arch["top_k"],
        causal=True,
    )
    cfg = ModelConfig(
        vocab_size=arch["vocab"], dim=arch["dim"], n_layers=arch["layers"], n_heads=arch["heads"],
        n_kv_heads=arch["kv_heads"], ffn_hidden_dim=arch["expert_hidden"], max_seq_len=1024, tie_embeddings=True, moe=moe,
    )  # fmt: skip
    return MoETransformer(cfg)


def hf_model(arch: dict[str, int], experts_implementation: str) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=arch["vocab"], hidden_size=arch["dim"], intermediate_size=arch["expert_hidden"],
        num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"], num_key_value_heads=arch["kv_heads"],
        num_local_experts=arch["experts"], num_experts_per_tok=arch["top_k"], max_position_embeddings=1024,
        tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=0.01,
        experts_implementation=experts_implementation, attn_implementation="sdpa",
    )  # fmt: skip
    return MixtralForCausalLM(cfg)


def interleaved_times(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of each run of each callable, run in turns (one run of each per round).

    Timing the libraries one after another would let a change in the host's load (a noisy neighbour
    on a shared VM) land on one of them only; in turns, every implementation sees the same conditions.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def paired_speedup(times: dict[str, list[float]]) -> float:
    """Median over rounds of (the faster transformers model's time / moekit's time) in that round."""
    rounds = zip(times["moekit"], times["hf_eager"], times["hf_grouped_mm"])
    return statistics.median(min(eager, grouped) / mine for mine, eager, grouped in rounds)


def mixed_precision(device: str) -> contextlib.AbstractContextManager:
    """What moekit's trainer trains under: bf16 autocast on a GPU (float32 weights), float32 on the CPU."""
    from moekit.train.trainer import autocast_for

    return autocast_for(torch.device(device), "auto")


def train_step_fn(
    model: torch.nn.Module, kind: str, batch: int, seq: int, device: str = "cpu"
) -> Callable[[], None]:
    """One training step (forward with the load-balancing loss, backward, AdamW) on a fixed batch.

    Both get fused AdamW: what transformers' Trainer uses by default (optim="adamw_torch_fused" with
    torch >= 2.8) and moekit's trainer too (train/trainer.py build_optimizer)."""
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = ARCH["vocab"]
    x = torch.randint(0, vocab, (batch, seq)).to(device)
    y = torch.randint(0, vocab, (batch, seq)).to(device)

    def step() -> None:
        with mixed_precision(device):
            if kind == "moekit":
                loss = model(x, targets=y).loss
            else:
                loss = model(input_ids=x, labels=y).loss  # with the router aux loss (output_router_logits)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def generate_fn(
    model: torch.nn.Module, kind: str, prompt_len: int, new_tokens: int, device: str = "cpu"
) -> Callable[[], None]:
    """Greedy generation of exactly `new_tokens` tokens at batch 1 with the KV cache."""
    torch.manual_seed(0)
    prompt = torch.randint(0, ARCH["vocab"], (1, prompt_len)).to(device)

    @torch.no_grad()
    def run() -> None:
        model.eval()
        with mixed_precision(device):
            out = _generate(model, kind, prompt, new_tokens)
        assert out.shape[1] == prompt_len + new_tokens

    return run


def _generate(model: torch.nn.Module, kind: str, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    if kind == "moekit":
        return model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0)
    return model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip


# Rounds measured (after 2 of warm-up). transformers' training steps are noisy on this host where
# moekit's are steady (one 15-round run: moekit 427-476 ms, transformers' eager 522-782 ms, the
# per-round ratio 1.21-1.80): with 7 rounds the ratio of the medians read 1.23-1.34 across three runs of
# the same code. 15 halve the variance of the medians for ~20 s more.
ROUNDS = 15


def run_e2e(quick: bool = False, rounds: int = ROUNDS, device: str = "cpu") -> dict[str, Any]:
    """Measure both libraries, in turns; returns the numbers and the two ratios with their targets
    (ratios of medians), and the paired medians of the per-round ratios beside them."""
    on_gpu = torch.device(device).type == "cuda"
    batch, seq = (2, 64) if quick else ((32, 512) if on_gpu else (8, 256))
    warmup, repeats = (1, 2) if quick else (2, rounds)
    prompt_len, new_tokens = (8, 8) if quick else (32, 64)
    arch = dict(ARCH)
    if quick:
        arch.update(layers=2, dim=64, heads=4, kv_heads=2, expert_hidden=128)
    results: dict[str, Any] = {
        "device": device,
        "precision": "float32 weights, bf16 autocast" if on_gpu else "float32",
        "rounds": repeats,
        "batch": batch,
        "seq_len": seq,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "arch": arch,
        "timing": "the three implementations interleaved run by run, medians",
    }
    models: dict[str, tuple[torch.nn.Module, str]] = {}
    torch.manual_seed(0)
    models["moekit"] = (moekit_model(arch).to(device), "moekit")
    for impl in ("eager", "grouped_mm"):
        torch.manual_seed(0)
        models[f"hf_{impl}"] = (hf_model(arch, impl).to(device), "hf")
    train_times = interleaved_times(
        {name: train_step_fn(m, kind, batch, seq, device) for name, (m, kind) in models.items()},
        warmup,
        repeats,
        device,
    )
    generate_times = interleaved_times(
        {name: generate_fn(m, kind, prompt_len, new_tokens, device) for name, (m, kind) in models.items()},
        warmup,
        repeats,
        device,
    )
    train = {name: statistics.median(t) for name, t in train_times.items()}
    generate = {name: statistics.median(t) for name, t in generate_times.items()}
    results["train_speedup_paired"] = paired_speedup(train_times)
    results["generate_speedup_paired"] = paired_speedup(generate_times)
    for name in models:
        results[f"{name}_train_tokens_per_s"] = batch * seq / train[name]
        results[f"{name}_generate_tokens_per_s"] = new_tokens / generate[name]
    best_train = max(results["hf_eager_train_tokens_per_s"], results["hf_grouped_mm_train_tokens_per_s"])
    best_gen = max(results["hf_eager_generate_tokens_per_s"], results["hf_grouped_mm_generate_tokens_per_s"])
    results["train_speedup"] = results["moekit_train_tokens_per_s"] / best_train
    results["generate_speedup"] = results["moekit_generate_tokens_per_s"] / best_gen
    if not on_gpu:  # the targets are the CPU's
        results["targets"] = {
            "train_speedup >= 1.3": results["train_speedup"] >= 1.3,
            "generate_speedup >= 2": results["generate_speedup"] >= 2.0,
        }
    return results


def format_e2e(r: dict[str, Any]) -> str:
    targets = r.get("targets")

    def target(key: str, text: str) -> str:
        return "" if targets is None else f" {text}: {'met' if targets[key] else 'NOT met'} |"

    where = "" if r.get("device", "cpu") == "cpu" else f" on {r['device']} ({r['precision']})"
    lines = [
        f"End to end{where} (batch {r['batch']} x {r['seq_len']} tokens for training; {r['new_tokens']} greedy "
        f"tokens after a {r['prompt_len']}-token prompt for generation), tokens/s, medians of "
        f"{r.get('rounds', 7)} rounds:",
        "",
        "| | moekit | transformers eager | transformers grouped_mm | speedup vs best |"
        + ("" if targets is None else " target |"),
        "|---|---|---|---|---|" + ("" if targets is None else "---|"),
        f"| training | {r['moekit_train_tokens_per_s']:.0f} | {r['hf_eager_train_tokens_per_s']:.0f} | "
        f"{r['hf_grouped_mm_train_tokens_per_s']:.0f} | {r['train_speedup']:.2f}x |"
        + target("train_speedup >= 1.3", ">= 1.3x"),
        f"| generation | {r['moekit_generate_tokens_per_s']:.1f} | {r['hf_eager_generate_tokens_per_s']:.1f} | "
        f"{r['hf_grouped_mm_generate_tokens_per_s']:.1f} | {r['generate_speedup']:.2f}x |"
        + target("generate_speedup >= 2", ">= 2x"),
    ]
    if "train_speedup_paired" in r:
        lines += [
            "",
            f"Paired (median over rounds of the faster transformers model's time / moekit's): training "
            f"{r['train_speedup_paired']:.2f}x, generation {r['generate_speedup_paired']:.2f}x.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke test)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="measured rounds (each runs all three once)"
    )
    args = parser.parse_args(argv)
    results = run_e2e(args.quick, args.rounds)
    print(format_e2e(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
