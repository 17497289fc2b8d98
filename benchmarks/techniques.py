"""Measure fine-tuning, sparse upcycling and distillation into dense on small models (docs/techniques.md).

    python benchmarks/techniques.py                  # the measured profile (tens of minutes on 2 CPU cores)
    python benchmarks/techniques.py --smoke          # a tiny profile in seconds (what the tests run)
    python benchmarks/techniques.py --work DIR       # where corpora, runs and results.json go
    python benchmarks/techniques.py --stage instruction   # one study, on the pretrained bases in --work

Everything is offline. Two corpora are cut from the running Python's standard library:
  pretraining  the top-level modules (`Lib/*.py`), every file hashed to train or validation;
  downstream   the `email` and `xml` packages, a domain the pretraining corpus never saw.
Stages (each a normal moekit run folder under WORK/runs, resumed if it is already there):
  1. pretrain an MoE (8 experts, top-2, every layer) and a dense model of the same shape whose FFN
     is one expert's size (FLOP-matched to top-1), the same number of steps each;
  2. fine-tuning on the downstream domain from the MoE: full, MoE layers frozen, all non-expert
     weights frozen, expert dropout 0.1 vs 0.4, LoRA; plus the zero-shot loss before fine-tuning;
  2b. instruction tuning (`--instruct`) on an instruction set cut from the downstream files: prompt =
     a function's `def` line and docstring, response = the rest of its body, split by file like the
     domain; response-only validation loss zero-shot, full, MoE layers frozen, LoRA;
  3. upcycling: the dense model copied into 8 experts (top-2) and trained on, against the dense
     model trained on, at equal extra training FLOPs (moekit.model.flops_per_token);
  4. distillation: a dense student initialized from the MoE's non-expert weights (FFN = mean of the
     experts) trained on 0.25 * teacher + 0.75 * ground truth, against the same student without the
     teacher (alpha 0), a fresh-FFN student, and the dense model trained on for the same steps.
`--stage` runs one study alone (the pretrained bases it needs are resumed from WORK/runs, or
trained first); its results go to WORK/results-<stage>.json instead of WORK/results.json.
It prints one Markdown table per technique (technique, setting, size, speed, validation loss,
command) and writes them with the raw numbers to WORK/results.json. The fine-tuning table's
validation loss is on the downstream validation files, the instruction table's on the responses of
the validation functions only; the others' on the pretraining validation files. Speeds are
wall-clock training tokens per second (instruction batches: padded tokens) on a shared machine:
compare within a table.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.adapt.checkpoints import Source, run_config_for
from moekit.adapt.distill import DistillTrainer, dense_student, dense_student_config
from moekit.adapt.finetune import FinetuneOptions, FinetuneTrainer, finetune_config, load_finetune_model
from moekit.adapt.upcycle import upcycle_checkpoint
from moekit.data import Tokenizer
from moekit.data.corpus import split_fraction
from moekit.model import count_params, flops_per_token
from moekit.train import Trainer, load_config
from moekit.train.checkpoint import build_model
from moekit.train.config import apply_updates


@dataclass(frozen=True)
class Profile:
    pretrain_files: int  # 0 = every top-level stdlib module
    downstream_files: int  # 0 = every file of the email and xml packages
    dim: int
    n_layers: int
    n_heads: int
    hidden: int  # expert hidden size = the dense FFN's
    experts: int
    vocab: int
    seq_len: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    extra_steps: int  # continued training of upcycling and distillation (dense side)
    eval_batches: int
    instruct_len: int  # tokens per instruction example (data.seq_len); a prompt may take 3/4 of them


STAGES = ("fine-tuning", "instruction", "upcycling", "distillation")
PROFILES = {
    "full": Profile(0, 0, 128, 4, 4, 256, 8, 1024, 128, 8, 500, 250, 250, 48, 128),
    "smoke": Profile(10, 6, 32, 2, 4, 48, 4, 300, 32, 4, 3, 2, 2, 1, 256),  # a poor tokenizer: long prompts
}


# ---------------------------------------------------------------------- corpora
def _split_copy(files: list[Path], root: Path, out: Path, fraction: float) -> Path:
    """Copy files as text into out/train and out/val by a stable hash of their relative path."""
    if out.exists():
        return out
    (out / "train").mkdir(parents=True)
    (out / "val").mkdir()
    names = [f.relative_to(root).as_posix() for f in files]
    val = {n for n in names if split_fraction(n) < fraction} or {names[0]}
    for f, n in zip(files, names):
        shutil.copy(f, out / ("val" if n in val else "train") / (n.replace("/", "__") + ".txt"))
    return out


def build_corpora(work: Path, p: Profile) -> tuple[Path, Path, Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    pre = sorted(root.glob("*.py"))
    down = sorted(f for pkg in ("email", "xml") for f in (root / pkg).rglob("*.py") if f.stat().st_size > 200)
    if p.pretrain_files:
        pre = [f for f in pre if 3000 < f.stat().st_size < 30000][: p.pretrain_files]
    if p.downstream_files:
        down = down[: p.downstream_files]
    pre_dir = _split_copy(pre, root, work / "pretrain", 0.05)
    down_dir = _split_copy(down, root, work / "downstream", 0.15)
    small = work / "downstream-small"  # every 6th training file, the same validation files
    if not small.exists():
        shutil.copytree(down_dir / "val", small / "val")
        (small / "train").mkdir()
        for f in sorted((down_dir / "train").iterdir())[::6]:
            shutil.copy(f, small / "train" / f.name)
    return pre_dir, down_dir, small


def data_flags(corpus: Path) -> dict[str, Any]:
    return {"paths": [f"{corpus}/train/*.txt"], "validation_paths": [f"{corpus}/val/*.txt"]}


# ---------------------------------------------------------------------- instruction set
def _dedent(lines: list[str], indent: int) -> str:
    """`lines` without the first `indent` columns; a line indented less (inside a multi-line
    string) is kept whole, a blank line becomes a bare newline."""
    out = []
    for line in lines:
        if not line.strip():
            out.append("\n")
        elif line[:indent].strip():
            out.append(line)
        else:
            out.append(line[indent:])
    return "".join(out)


def function_examples(source: str) -> list[dict[str, str]]:
    """Prompt/response pairs from one Python file, one per function with a docstring and code:
    prompt = the `def` line(s) and the docstring, response = the rest of the body (both dedented
    to the `def`; decorators left out). Nested functions and methods count too."""
    lines = source.splitlines(keepends=True)
    pairs = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        if ast.get_docstring(node) is None:
            continue
        doc_end = node.body[0].end_lineno  # the docstring is body[0]
        prompt = _dedent(lines[node.lineno - 1 : doc_end], node.col_offset)
        response = _dedent(lines[doc_end : node.end_lineno], node.col_offset)
        if response.strip():
            pairs.append({"prompt": prompt, "response": response, "task": "docstring-to-body"})
    return pairs


def build_instruction_set(
    corpus: Path, out: Path, tokenizer: Tokenizer, max_prompt_tokens: int
) -> tuple[Path, dict[str, int]]:
    """out/train.jsonl and out/val.jsonl from the functions of corpus/train and corpus/val (the
    split is by file, the domain's own). Prompts over `max_prompt_tokens` are left out, so every
    example keeps most of its window for the response. Written once; returns (out, counts)."""
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for split in ("train", "val"):
            pairs = [
                pair
                for f in sorted((corpus / split).glob("*.txt"))
                for pair in function_examples(f.read_text(encoding="utf-8"))
                if len(tokenizer.encode(pair["prompt"])) <= max_prompt_tokens
            ]
            if not pairs:
                raise ValueError(
                    f"no function of {corpus / split} has a prompt of <= {max_prompt_tokens} tokens"
                )
            lines = (json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
            (tmp / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        tmp.rename(out)
    counts = {split: len((out / f"{split}.jsonl").read_text().splitlines()) for split in ("train", "val")}
    return out, counts


# ---------------------------------------------------------------------- runs
class Bench:
    def __init__(self, work: Path, p: Profile) -> None:
        self.work, self.p = work, p
        self.pretrain, self.downstream, self.downstream_small = build_corpora(work, p)
        self.rows: dict[str, list[dict[str, Any]]] = {
            "fine-tuning": [],
            "instruction tuning": [],
            "upcycling": [],
            "distillation": [],
        }
        self.dense_continued: dict[str, Any] | None = None  # the dense model +extra_steps (upcycling)
        self.gap: dict[str, float] = {}  # distillation: share of the teacher-over-dense gap kept

    def train_flags(self, name: str, steps: int, lr: float, warmup: int) -> dict[str, Any]:
        return {
            "steps": steps,
            "lr": lr,
            "warmup_steps": warmup,
            "log_every": max(1, steps // 10),
            "eval_every": max(1, steps // 4),
            "eval_batches": self.p.eval_batches,
            "save_every": 10**6,
            "out_dir": str(self.work / "runs"),
            "run_name": name,
            "progress": False,
            "time_limit_minutes": 0.0,
            "threads": 1,  # on a shared 2-core machine two threads per process oversubscribe (10x slower)
        }

    def pretrain_run(self, name: str, moe: bool) -> Path:
        p = self.p
        cfg = load_config(None, ["train.progress=false"])
        updates = {
            "model": {"dim": p.dim, "n_layers": p.n_layers, "n_heads": p.n_heads, "n_kv_heads": p.n_heads // 2,
                      "ffn_hidden_dim": p.hidden, "max_seq_len": max(2 * p.seq_len, p.instruct_len), "tie_embeddings": True},
            "moe": {"enabled": moe, "num_experts": p.experts, "top_k": 2, "hidden_dim": p.hidden},
            "data": {**data_flags(self.pretrain), "vocab_size": p.vocab, "seq_len": p.seq_len, "batch_size": p.batch,
                     "eval_batch_size": 16, "cache_dir": str(self.work / "cache")},
            "train": self.train_flags(name, p.pretrain_steps, 3e-3, max(1, p.pretrain_steps // 20)),
        }  # fmt: skip
        apply_updates(cfg, updates)
        cfg.validate()
        return self.fit(Trainer(cfg))

    def fit(self, trainer: Trainer) -> Path:
        start = time.perf_counter()
        result = trainer.fit()
        s = result.summary
        records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        trainable = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
        self.last = {
            "run": str(result.run_dir),
            "steps": s["step"],
            "val_loss": s["val_loss"],
            "best_val_loss": min(vals) if vals else s["val_loss"],
            "tokens_per_s": s["tokens_seen"] / max(s["training_seconds"], 1e-9),
            "params_total": s["params_total"],
            "params_active": s["params_active"],
            "params_trainable": trainable,
            "wall_s": time.perf_counter() - start,
        }
        print(
            f"  {result.run_dir.name}: {s['step']} steps, val {s['val_loss']:.4f}",
            file=sys.stderr,
            flush=True,
        )
        return result.checkpoint_dir

    def finetune_run(
        self,
        name: str,
        ckpt: Path,
        data: dict[str, Any],
        steps: int,
        options: FinetuneOptions,
        moe: dict | None = None,
        lr: float = 1e-3,
    ) -> dict[str, Any]:
        """A fine-tuning run (resumed if WORK/runs/<name> holds it); steps 0 = evaluate only."""
        source = Source.open(ckpt)
        flags = {
            "data": data,
            "train": self.train_flags(name, max(steps, 1), lr, max(1, steps // 15)),
        }
        if moe:
            flags["moe"] = moe
        cfg = finetune_config(source, flags=flags)
        trainer = FinetuneTrainer(cfg, load_finetune_model(source, cfg), options)
        if steps == 0:
            ev = trainer.evaluate()
            return {
                "val_loss": ev["val_loss"],
                "best_val_loss": ev["val_loss"],
                "params": count_params(trainer.model),
            }
        self.fit(trainer)
        return dict(self.last)

    # -------------------------------------------------------------- the three studies
    def fine_tuning(self, moe_base: Path) -> None:
        F = self.p.finetune_steps
        zero = self.finetune_run("ft-zero-shot", moe_base, data_flags(self.downstream), 0, FinetuneOptions())
        cmd = "(FinetuneTrainer.evaluate() before any step)"
        self.add("fine-tuning", "no fine-tuning (zero-shot)", zero, cmd, size=_size(zero["params"]))
        runs = [
            ("full", "full fine-tuning", FinetuneOptions(freeze="none"), None, "--freeze none"),
            ("freeze-moe", "MoE layers frozen (experts + routers)", FinetuneOptions(freeze="moe"), None, "--freeze moe"),
            ("freeze-non-expert", "all non-expert weights frozen", FinetuneOptions(freeze="non_expert"), None, "--freeze non_expert"),
            ("ed0.1", "full, expert dropout 0.1", FinetuneOptions(), {"expert_dropout": 0.1}, "--expert-dropout 0.1"),
            ("ed0.4", "full, expert dropout 0.4", FinetuneOptions(), {"expert_dropout": 0.4}, "--expert-dropout 0.4"),
            ("lora8", "LoRA rank 8 (attention + experts), rest frozen", FinetuneOptions(lora_rank=8), None, "--lora-rank 8"),
        ]  # fmt: skip
        corpora = (
            (self.downstream, "ft", "all data"),
            (self.downstream_small, "ft-small", "1/6 of the data"),
        )
        for corpus, tag, label in corpora:
            files = len(list((corpus / "train").iterdir()))
            data = f"--data '{corpus.name}/train/*.txt' --val-data '{corpus.name}/val/*.txt'"
            for name, setting, options, moe, flag in runs:
                if tag == "ft-small" and name == "lora8":
                    continue
                r = self.finetune_run(f"{tag}-{name}", moe_base, data_flags(corpus), F, options, moe)
                cmd = f"moekit finetune --ckpt runs/moe-base {data} --set train.steps={F} {flag}"
                self.add("fine-tuning", f"{label} ({files} files): {setting}", r, cmd)

    def instruction_tuning(self, moe_base: Path) -> None:
        """`--instruct` fine-tuning on the domain's functions (docstring -> body), response-only loss."""
        F, length = self.p.finetune_steps, self.p.instruct_len
        tokenizer = Tokenizer.from_file(Source.open(moe_base).tokenizer_file)
        folder, counts = build_instruction_set(
            self.downstream, self.work / "instruct", tokenizer, 3 * length // 4
        )
        data = {
            "paths": [str(folder / "train.jsonl")],
            "validation_paths": [str(folder / "val.jsonl")],
            "seq_len": length,
        }
        label = f"docstring -> body ({counts['train']} / {counts['val']} functions)"
        zero = self.finetune_run("it-zero-shot", moe_base, data, 0, FinetuneOptions(instruct=True))
        cmd = "(FinetuneTrainer.evaluate() before any step, --instruct)"
        self.add(
            "instruction tuning",
            f"{label}: no fine-tuning (zero-shot)",
            zero,
            cmd,
            size=_size(zero["params"]),
        )
        runs = [
            ("full", "full fine-tuning", FinetuneOptions(instruct=True, freeze="none"), 1e-3, "--freeze none"),
            ("freeze-moe", "MoE layers frozen (experts + routers)", FinetuneOptions(instruct=True, freeze="moe"), 1e-3, "--freeze moe"),
            ("lora8", "LoRA rank 8 (attention + experts), rest frozen", FinetuneOptions(instruct=True, lora_rank=8), 1e-3, "--lora-rank 8"),
            ("lora8-lr5e-3", "LoRA rank 8, lr 5e-3", FinetuneOptions(instruct=True, lora_rank=8), 5e-3, "--lora-rank 8 --set train.lr=5e-3"),
        ]  # fmt: skip
        files = "--data instruct/train.jsonl --val-data instruct/val.jsonl"
        if length != self.p.seq_len:
            files += f" --set data.seq_len={length}"
        for name, setting, options, lr, flag in runs:
            r = self.finetune_run(f"it-{name}", moe_base, data, F, options, lr=lr)
            cmd = f"moekit finetune --ckpt runs/moe-base --instruct {files} --set train.steps={F} {flag}"
            self.add("instruction tuning", f"{label}: {setting}", r, cmd)

    def upcycling(self, dense_base: Path, moe_base_row: dict[str, Any]) -> None:
        p, pre, U = self.p, data_flags(self.pretrain), self.p.extra_steps
        cont = "moekit finetune --ckpt {} --data 'pretrain/train/*.txt' --val-data 'pretrain/val/*.txt' --set train.steps={}"
        self.add(
            "upcycling",
            f"dense, pretrained {p.pretrain_steps} steps",
            self.dense_base_row,
            "moekit train --set moe.enabled=false",
        )
        self.add(
            "upcycling",
            f"MoE from scratch, {p.pretrain_steps} steps (reference)",
            moe_base_row,
            "moekit train",
        )
        up_dir = self.work / "upcycled"
        if not up_dir.exists():
            upcycle_checkpoint(dense_base, up_dir, p.experts, 2)
        up_cfg, dense_cfg = Source.open(up_dir).model_config, Source.open(dense_base).model_config
        ratio = flops_per_token(dense_cfg, p.seq_len).total / flops_per_token(up_cfg, p.seq_len).total
        start = self.finetune_run("upcycled-step0", up_dir, pre, 0, FinetuneOptions())
        cmd = f"moekit upcycle --ckpt runs/dense-base --out upcycled --experts {p.experts} --top-k 2"
        self.add("upcycling", "upcycled, before training (= dense)", start, cmd, size=_size(start["params"]))
        for dense_steps in (U, 2 * U):  # a longer budget too: the new routers need steps to pay off
            r = self.finetune_run(
                f"dense-continued-{dense_steps}", dense_base, pre, dense_steps, FinetuneOptions()
            )
            if dense_steps == U:
                self.dense_continued = r
            self.add(
                "upcycling", f"dense, +{dense_steps} steps", r, cont.format("runs/dense-base", dense_steps)
            )
            steps = max(1, round(dense_steps * ratio))
            r = self.finetune_run(f"upcycled-continued-{steps}", up_dir, pre, steps, FinetuneOptions())
            setting = f"upcycled {p.experts} experts top-2, +{steps} steps (FLOPs of +{dense_steps} dense)"
            self.add("upcycling", setting, r, cont.format("upcycled", steps))
        r = self.finetune_run(f"upcycled-continued-{U}", up_dir, pre, U, FinetuneOptions())
        setting = f"upcycled {p.experts} experts top-2, +{U} steps (equal steps, {1 / ratio:.2f}x FLOPs)"
        self.add("upcycling", setting, r, cont.format("upcycled", U))

    def distillation(self, moe_base: Path, moe_base_row: dict[str, Any], dense_base: Path) -> None:
        D = self.p.extra_steps
        if self.dense_continued is None:  # the upcycling stage did not run here: resume or train its run
            self.dense_continued = self.finetune_run(
                f"dense-continued-{D}", dense_base, data_flags(self.pretrain), D, FinetuneOptions()
            )
        source = Source.open(moe_base)
        teacher = source.load_weights(build_model(source.arch, source.model_config))
        student_cfg = dense_student_config(source.model_config)
        self.add("distillation", "teacher: MoE", moe_base_row, "moekit train")
        self.add(
            "distillation",
            f"dense baseline, +{D} steps (no teacher)",
            self.dense_continued,
            "(upcycling table)",
        )
        results = {}
        for name, alpha, init in (
            ("distill-a0.25", 0.25, "average"),
            ("distill-a0", 0.0, "average"),
            ("distill-a0.25-fresh", 0.25, "fresh"),
        ):
            flags = {
                "data": {**data_flags(self.pretrain), "tokenizer": str(source.tokenizer_file)},
                "train": self.train_flags(name, D, 1e-3, max(1, D // 15)),
            }
            cfg = run_config_for(source.arch, student_cfg, source.run, flags=flags)
            student = dense_student(teacher, source.arch, init, seed=cfg.train.seed)
            self.fit(DistillTrainer(cfg, student, teacher, alpha))
            results[name] = dict(self.last)
            cmd = f"moekit distill --teacher runs/moe-base --out runs/{name} --alpha {alpha} --ffn-init {init} --set train.steps={D}"
            setting = f"student: teacher's non-expert weights, FFN {init}, alpha {alpha}, {D} steps"
            self.add("distillation", setting, results[name], cmd)
        ref, teach = self.dense_continued["val_loss"], moe_base_row["val_loss"]
        self.gap = {n: (ref - r["val_loss"]) / (ref - teach) for n, r in results.items()}

    # -------------------------------------------------------------- output
    def add(self, table: str, setting: str, r: dict[str, Any], command: str, size: str | None = None) -> None:
        if size is None:
            size = f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M active"
            if r.get("params_trainable") and r["params_trainable"] != r["params_total"]:
                size += f", {r['params_trainable'] / 1e6:.2f}M trained"
        speed = f"{r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else "-"
        loss = f"{r['val_loss']:.4f}"
        if r.get("best_val_loss") is not None and r["best_val_loss"] < r["val_loss"] - 5e-4:
            loss += f" (best {r['best_val_loss']:.4f})"
        self.rows[table].append(
            {
                "setting": setting,
                "size": size,
                "speed": speed,
                "loss": loss,
                "command": command,
                "raw": {k: v for k, v in r.items() if k != "params"},
            }
        )

    def tables(self) -> str:
        out = []
        for table, rows in self.rows.items():
            if not rows:
                continue
            out += [
                f"### {table}",
                "",
                "| technique | setting | size | speed | validation loss | command |",
                "|---|---|---|---|---|---|",
            ]
            out += [
                f"| {table} | {r['setting']} | {r['size']} | {r['speed']} | {r['loss']} | `{r['command']}` |"
                for r in rows
            ]
            out.append("")
        if self.gap:
            out.append(
                "Share of the teacher-over-dense gap kept: "
                + ", ".join(f"{n} {g:.0%}" for n, g in self.gap.items())
            )
        return "\n".join(out)


def _size(pc: Any) -> str:
    return f"{pc.total / 1e6:.2f}M / {pc.active / 1e6:.2f}M active"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny profile, seconds")
    parser.add_argument("--work", default="runs/techniques", help="folder for corpora, runs and results")
    parser.add_argument(
        "--stage",
        choices=("all", *STAGES),
        default="all",
        help="one study only (the pretrained bases are resumed from --work, or trained first)",
    )
    args = parser.parse_args(argv)
    stages = STAGES if args.stage == "all" else (args.stage,)
    profile = PROFILES["smoke" if args.smoke else "full"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work, profile)
    t0 = time.perf_counter()
    moe_base = bench.pretrain_run("moe-base", True)
    moe_row = dict(bench.last)
    if "upcycling" in stages or "distillation" in stages:
        dense_base = bench.pretrain_run("dense-base", False)
        bench.dense_base_row = dict(bench.last)
    if "fine-tuning" in stages:
        bench.fine_tuning(moe_base)
    if "instruction" in stages:
        bench.instruction_tuning(moe_base)
    if "upcycling" in stages:
        bench.upcycling(dense_base, moe_row)
    if "distillation" in stages:
        bench.distillation(moe_base, moe_row, dense_base)
    text = bench.tables()
    print(text)
    results = work / ("results.json" if args.stage == "all" else f"results-{args.stage}.json")
    results.write_text(
        json.dumps({"profile": profile.__dict__, "tables": bench.rows, "gap": bench.gap}, indent=2)
    )
    print(f"\n{time.perf_counter() - t0:.0f} s in all; results in {results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
