"""Measure task-level routing, expert pruning/merging and expert quantization (docs/techniques.md).

    python benchmarks/compression.py                   # the measured profile (~15 minutes on 2 CPU cores)
    python benchmarks/compression.py --stage quant     # one stage: tasks, merge, quant (or all)
    python benchmarks/compression.py --smoke           # a tiny profile in seconds (what the tests run)
    python benchmarks/compression.py --work DIR        # where corpora, runs, checkpoints, results.json go

Everything is offline. The data is moekit's multi-task stdlib corpus (moekit.tasks: code, prose,
tests, dectest). Two models of the same shape train on exactly the same batches (each holds the
same number of sequences of every task), resumed if WORK/runs already has them:
  task-routed   moe.router = "task": a sequence goes to its task's top-2 of 8 experts per layer;
  token-routed  moe.router = "topk": the usual token-level top-2 of 8.
Stages:
  tasks   per-task validation loss of both; every task extracted from the task-routed model (checked
          bit-identical), with its size and its forward and greedy-decoding speed against the full model;
  merge   the token-routed model pruned or merged down to fewer experts per layer, validation loss;
  quant   the token-routed model's experts as int8, int4 and ternary (plain rounding, GPTQ, wider dead
          zones): bits per expert weight, model file size, validation loss, forward speed.
Validation loss is the token-weighted mean over the tasks' validation files. Speeds are best-of-N
wall clock on a shared machine, measured alternately: compare within a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.compress.calibrate import calibration_batches, record_routing
from moekit.compress.derived import save_derived_checkpoint
from moekit.compress.evaluate import forward_tokens_per_second, validation_loss
from moekit.compress.merge import merge_model, prune_model
from moekit.compress.quantize import QuantSpec, quantize_model, save_quantized
from moekit.model import count_params
from moekit.tasks import TaskSet, TaskTrainer
from moekit.tasks.extract import extract_checkpoint
from moekit.train import load_config
from moekit.train.checkpoint import MODEL_FILE, load_model


@dataclass(frozen=True)
class Profile:
    tasks: tuple[str, ...]
    max_chars: int  # training characters per task
    dim: int
    n_layers: int
    n_heads: int
    experts: int
    hidden: int  # expert hidden size
    vocab: int
    seq_len: int
    batch: int  # sequences per step (the same number from every task)
    steps: int
    eval_batches: int
    calib: int  # calibration sequences
    keeps: tuple[int, ...]  # experts kept per layer by pruning/merging
    repeats: int  # speed measurements per model


PROFILES = {
    "full": Profile(("code", "prose", "tests", "dectest"), 600_000, 128, 4, 4, 8, 256, 2048, 128, 8, 300, 16, 64, (6, 4, 2), 5),
    "smoke": Profile(("code", "prose"), 20_000, 32, 2, 4, 4, 32, 300, 32, 4, 3, 1, 4, (2,), 1),
}  # fmt: skip


class Bench:
    def __init__(self, work: Path, profile: Profile) -> None:
        self.work, self.p = work, profile
        self.tasks = TaskSet(names=list(profile.tasks), max_train_chars=profile.max_chars)
        self.results: dict[str, Any] = {}
        path = work / "results.json"
        if path.is_file():
            self.results = json.loads(path.read_text())

    def save(self) -> None:
        (self.work / "results.json").write_text(json.dumps(self.results, indent=1))

    # -------------------------------------------------------------- training
    def train(self, name: str, router: str) -> Path:
        p = self.p
        sets = {
            "model.dim": p.dim, "model.n_layers": p.n_layers, "model.n_heads": p.n_heads,
            "model.n_kv_heads": p.n_heads // 2, "model.max_seq_len": 2 * p.seq_len, "model.tie_embeddings": "true",
            "moe.num_experts": p.experts, "moe.top_k": 2, "moe.hidden_dim": p.hidden, "moe.router": f'"{router}"',
            "moe.num_tasks": len(p.tasks), "data.vocab_size": p.vocab, "data.seq_len": p.seq_len,
            "data.batch_size": p.batch, "data.eval_batch_size": 8, "data.cache_dir": f'"{self.work / "cache"}"',
            "train.steps": p.steps, "train.lr": 3e-3, "train.warmup_steps": max(1, p.steps // 20),
            "train.log_every": max(1, p.steps // 10), "train.eval_every": p.steps, "train.eval_batches": p.eval_batches,
            "train.save_every": 10**6, "train.out_dir": f'"{self.work / "runs"}"', "train.run_name": f'"{name}"',
            "train.progress": "false",
        }  # fmt: skip
        trainer = TaskTrainer(load_config(None, [f"{k}={v}" for k, v in sets.items()]), self.tasks)
        start = time.perf_counter()
        result = trainer.fit()
        metrics = trainer.evaluate()
        self.results.setdefault("train", {})[name] = {
            "steps": result.step,
            "training_seconds": result.summary["training_seconds"],
            "tokens_per_s": result.summary["tokens_seen"] / max(result.summary["training_seconds"], 1e-9),
            "wall_s": time.perf_counter() - start,
            **metrics,
        }
        log(f"{name}: {result.step} steps, val {metrics['val_loss']:.4f}")
        return result.checkpoint_dir

    # -------------------------------------------------------------- task routing
    def stage_tasks(self, task_ckpt: Path, token_ckpt: Path) -> None:
        full, config = load_model(task_ckpt)
        token_model = load_model(token_ckpt)[0]
        task_ids = torch.arange(8) % len(self.p.tasks)
        rows = {"train": self.results["train"], "extracted": {}}
        rows["full_fwd"] = alternate(
            {
                "task-routed": lambda: forward_tokens_per_second(full, 8, self.p.seq_len, 1, task_ids),
                "token-routed": lambda: forward_tokens_per_second(token_model, 8, self.p.seq_len, 1),
            },
            self.p.repeats,
        )
        per_task = calibration_batches(
            config, None, 8 * len(self.p.tasks), batch_size=8
        )  # 8 rows of each task
        for t, name in enumerate(self.p.tasks):
            out, _, small = extract_checkpoint(task_ckpt, name, self.work / "extracted" / name)
            batch = next(inputs for inputs, task_ids in per_task if bool((task_ids == t).all()))
            ids = torch.full((batch.shape[0],), t)
            same = bool(torch.equal(full(batch, task_ids=ids).logits, small(batch).logits))
            speed = alternate(self.extraction_speeds(full, small, batch, t), self.p.repeats)
            rows["extracted"][name] = {
                "identical": same,
                "params_full": count_params(full).total,
                "params": count_params(small).total,
                "file_mib_full": file_mib(task_ckpt),
                "file_mib": file_mib(out),
                **speed,
            }
            log(f"extracted {name}: identical={same}")
        self.results["tasks"] = rows
        self.save()

    def extraction_speeds(self, full, small, batch: torch.Tensor, task: int) -> dict[str, Any]:
        """Forward (batch 8) and greedy decoding (batch 1) speed of the full and the extracted model."""
        fwd_ids, decode_ids, prompt = torch.full((8,), task), torch.tensor([task]), batch[:1, :16]
        return {
            "full_fwd": lambda: forward_tokens_per_second(full, 8, self.p.seq_len, 1, fwd_ids),
            "extracted_fwd": lambda: forward_tokens_per_second(small, 8, self.p.seq_len, 1),
            "full_decode": lambda: decode_tokens_per_second(full, prompt, decode_ids),
            "extracted_decode": lambda: decode_tokens_per_second(small, prompt, None),
        }

    # -------------------------------------------------------------- pruning and merging
    def stage_merge(self, ckpt: Path) -> None:
        model, config = load_model(ckpt)
        records = record_routing(model, calibration_batches(config, None, self.p.calib))
        base = validation_loss(model, config, self.p.eval_batches)["val_loss"]
        rows = [{"keep": self.p.experts, "method": "none (the trained model)", "val_loss": base,
                 "params": count_params(model).total}]  # fmt: skip
        variants = [
            ("prune", "prune (least used dropped)", {}),
            ("merge", "merge, router-logit groups, aligned", {"grouping": "router"}),
            ("merge", "merge, router-logit groups, not aligned", {"grouping": "router", "align": False}),
            ("merge", "merge, output groups, aligned", {"grouping": "output"}),
            ("merge", "merge, weight groups, aligned", {"grouping": "weight"}),
            ("merge", "merge, router-logit groups, aligned, mean router rows", {"grouping": "router", "router_rows": "mean"}),
        ]  # fmt: skip
        for keep in self.p.keeps:
            for op, label, kw in variants:
                if op == "prune":
                    new, _ = prune_model(model, records, keep)
                else:
                    new, _ = merge_model(model, records, keep, **kw)
                loss = validation_loss(new, config, self.p.eval_batches)["val_loss"]
                rows.append(
                    {"keep": keep, "method": label, "val_loss": loss, "params": count_params(new).total}
                )
                log(f"keep {keep} {label}: {loss:.4f}")
            if keep == self.p.keeps[-1]:  # the smallest pruned model, saved as the CLI would
                save_derived_checkpoint(
                    prune_model(model, records, keep)[0],
                    config,
                    self.work / f"pruned-{keep}",
                    {"op": "prune"},
                )
        self.results["merge"] = rows
        self.save()

    # -------------------------------------------------------------- quantization
    def stage_quant(self, ckpt: Path) -> None:
        model, config = load_model(ckpt)
        batches = calibration_batches(config, None, self.p.calib)
        base_loss = validation_loss(model, config, self.p.eval_batches)["val_loss"]
        base_mib = file_mib(ckpt)
        variants = [
            ("int8", QuantSpec("int8"), ""),
            ("int4 (groups of 32)", QuantSpec("int4", group_size=32), " --group-size 32"),
            ("ternary, plain rounding", QuantSpec("ternary", gptq=False), " --no-gptq"),
            ("ternary, GPTQ", QuantSpec("ternary"), ""),
            ("ternary, GPTQ, dead zone 0.6", QuantSpec("ternary", dead_zone=0.6), " --dead-zone 0.6"),
            ("ternary, GPTQ, dead zone 0.7", QuantSpec("ternary", dead_zone=0.7), " --dead-zone 0.7"),
            ("ternary, GPTQ, dead zone 0.8", QuantSpec("ternary", dead_zone=0.8), " --dead-zone 0.8"),
            ("ternary, GPTQ, dead zone 0.9", QuantSpec("ternary", dead_zone=0.9), " --dead-zone 0.9"),
        ]
        rows = [{"setting": "float32 (the trained model)", "bits": 32.0, "file_mib": base_mib, "ratio": 1.0,
                 "val_loss": base_loss, "flag": None}]  # fmt: skip
        models = {"float32 (the trained model)": model}
        folders = {}
        for label, spec, flag in variants:
            start = time.perf_counter()
            qmodel, report = quantize_model(model, spec, batches if spec.needs_calibration else None)
            seconds = time.perf_counter() - start
            out = save_quantized(
                qmodel, config, self.work / "quant" / label.replace(" ", "_").replace(",", ""), spec
            )
            folders[label] = out
            loaded, _ = load_model(out)  # what users get back, through load_model
            loss = validation_loss(loaded, config, self.p.eval_batches)["val_loss"]
            mib = file_mib(out)
            rows.append({"setting": label, "bits": report["bits_per_expert_param"], "file_mib": mib, "ratio": base_mib / mib,
                         "val_loss": loss, "quantize_s": seconds, "flag": f"--method {spec.method}{flag}", **report})  # fmt: skip
            models[label] = loaded
            log(f"{label}: {report['bits_per_expert_param']:.3f} bits, val {loss:.4f}")
        cached = load_model(folders["ternary, GPTQ"])[0]
        for layer in cached.moe_layers:
            layer.experts.cache_decoded = True  # decoded once, kept as int8 symbols
        models["ternary, GPTQ, decoded symbols cached"] = cached
        speeds = alternate(
            {k: (lambda m=m: forward_tokens_per_second(m, 8, self.p.seq_len, 1)) for k, m in models.items()},
            self.p.repeats,
        )
        for row in rows:
            row["tokens_per_s"] = speeds[row["setting"]]
        gptq_row = next(r for r in rows if r["setting"] == "ternary, GPTQ")
        label = "ternary, GPTQ, decoded symbols cached"
        rows.append({**gptq_row, "setting": label, "tokens_per_s": speeds[label]})
        self.results["quant"] = rows
        self.save()

    # -------------------------------------------------------------- tables
    def tables(self) -> str:
        out = []
        p = self.p
        shape = f"{p.n_layers} layers, dim {p.dim}, {p.experts} experts of hidden {p.hidden}, top-2"
        if "tasks" in self.results:
            tr = self.results["train"]
            out += [
                "| technique | setting | size | speed | validation loss | command |",
                "|---|---|---|---|---|---|",
            ]
            per_task = lambda m: ", ".join(f"{n} {m[f'val_loss/{n}']:.3f}" for n in p.tasks)  # noqa: E731
            for name, label, cmd in (
                ("token-routed", "token-level routing", "--set moe.router='\"topk\"'"),
                (
                    "task-routed",
                    "task-level routing (learned task gate)",
                    "--set moe.router='\"task\"'",
                ),
            ):
                m = tr[name]
                out.append(
                    f"| task routing | {label}; {shape} | {self.results['tasks']['extracted'][p.tasks[0]]['params_full']:,} params "
                    f"| fwd {self.results['tasks']['full_fwd'][name]:.0f} tok/s | {m['val_loss']:.4f} ({per_task(m)}) "
                    f"| `moekit train-tasks {cmd}` |"
                )
            for name, row in self.results["tasks"]["extracted"].items():
                out.append(
                    f"| task routing | extracted `{name}`: 2 experts per layer, bit-identical={row['identical']} "
                    f"| {row['params']:,} params ({row['params'] / row['params_full']:.0%}), {row['file_mib']:.2f} MiB "
                    f"(full {row['file_mib_full']:.2f}) | fwd {row['extracted_fwd']:.0f} vs {row['full_fwd']:.0f} tok/s; "
                    f"decode {row['extracted_decode']:.0f} vs {row['full_decode']:.0f} tok/s "
                    f"| {tr['task-routed'][f'val_loss/{name}']:.4f} (= full model on {name}) "
                    f"| `moekit extract --ckpt runs/task-routed --task {name} --out {name}` |"
                )
            out.append("")
        if "merge" in self.results:
            out += [
                "| technique | setting | size | speed | validation loss | command |",
                "|---|---|---|---|---|---|",
            ]
            for r in self.results["merge"]:
                cmd = _merge_command(r)
                out.append(
                    f"| {'pruning' if 'prune' in r['method'] else 'merging' if 'merge' in r['method'] else 'baseline'} "
                    f"| {r['keep']} of {p.experts} experts per layer: {r['method']} | {r['params']:,} params "
                    "| per-token FLOPs unchanged (top-2) "
                    f"| {r['val_loss']:.4f} | {cmd} |"
                )
            out.append("")
        if "quant" in self.results:
            out += [
                "| technique | setting | size | speed | validation loss | command |",
                "|---|---|---|---|---|---|",
            ]
            base = self.results["quant"][0]["val_loss"]
            for r in self.results["quant"]:
                extra = ""
                if "zero_fraction" in r:
                    extra = f"; {r['zero_fraction']:.0%} zeros, codewords {r['code_bits_per_param']:.3f} b/w (entropy {r['entropy_bits_per_param']:.3f})"
                cmd = (
                    f"`moekit quantize --ckpt runs/token-routed {r['flag']} --out q`"
                    if r.get("flag")
                    else "-"
                )
                out.append(
                    f"| quantization | {r['setting']} | {r['bits']:.3f} bits/expert weight{extra}; file {r['file_mib']:.2f} MiB "
                    f"({r['ratio']:.2f}x smaller) | fwd {r['tokens_per_s']:.0f} tok/s | {r['val_loss']:.4f} ({r['val_loss'] - base:+.4f}) | {cmd} |"
                )
        return "\n".join(out)


def _merge_command(r: dict[str, Any]) -> str:
    m = r["method"]
    if "prune" in m:
        return f"`moekit prune --ckpt runs/token-routed --keep {r['keep']} --out p`"
    if "merge" not in m:
        return "-"
    flags = f"--grouping {'output' if 'output' in m else 'weight' if 'weight' in m else 'router'}"
    flags += " --no-align" if "not aligned" in m else ""
    flags += " --router-rows mean" if "mean router" in m else ""
    return f"`moekit merge --ckpt runs/token-routed --keep {r['keep']} {flags} --out m`"


@torch.no_grad()
def decode_tokens_per_second(
    model: torch.nn.Module, prompt: torch.Tensor, task_ids, new_tokens: int = 32
) -> float:
    start = time.perf_counter()
    model.generate(prompt, new_tokens, temperature=0, task_ids=task_ids)
    return new_tokens / (time.perf_counter() - start)


def alternate(measures: dict[str, Any], repeats: int) -> dict[str, float]:
    """Best of `repeats` rounds, each round measuring every candidate once (fair under shared load)."""
    best = {k: 0.0 for k in measures}
    for fn in measures.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in measures.items():
            best[k] = max(best[k], fn())
    return best


def file_mib(folder: Path) -> float:
    return (Path(folder) / MODEL_FILE).stat().st_size / 2**20


def log(msg: str) -> None:
    print(f"[compression] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny profile (seconds)")
    ap.add_argument("--work", default="bench-compression", help="working folder")
    ap.add_argument("--stage", default="all", choices=["all", "tasks", "merge", "quant"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work, PROFILES["smoke" if args.smoke else "full"])
    task_ckpt = bench.train("task-routed", "task")
    token_ckpt = bench.train("token-routed", "topk")
    bench.save()
    if args.stage in ("all", "tasks"):
        bench.stage_tasks(task_ckpt, token_ckpt)
    if args.stage in ("all", "merge"):
        bench.stage_merge(token_ckpt)
    if args.stage in ("all", "quant"):
        bench.stage_quant(token_ckpt)
    print(bench.tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())
