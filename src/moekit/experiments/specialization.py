"""specialization: do experts specialize on kinds of tokens, in the encoder and in the decoder?

Two models of experiments/specialization.toml: the decoder-only LM and an encoder-decoder trained
with span corruption. After training, the `moekit analyze` analysis runs on validation text:
every token's top-1 expert against its Python token category (keyword, identifier, operator, ...).
Specialization is I(expert; category) normalized by H(category) (the share of the category's
information that the expert choice carries, comparable across sides whose category mix differs),
next to its chance level (the same with the categories shuffled).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moekit.experiments.core import (
    Check,
    Context,
    RunRecord,
    Summary,
    Table,
    Variant,
    agrees,
    fmt,
    train_variant,
)
from moekit.experiments.experiment import Experiment
from moekit.experiments.report import pyplot

ANALYZE_TOKENS = 20_000
SMOKE_ANALYZE_TOKENS = 400
MUCH_LESS = 0.5  # "much less": the decoder's normalized MI below half the encoder's


class Specialization(Experiment):
    name = "specialization"
    title = "Expert specialization in encoder and decoder"
    paper = "ST-MoE (Zoph et al. 2022), section 7 and Table 9"
    claim = (
        "Encoder experts specialize in kinds of tokens (punctuation, verbs, proper names, numbers...), "
        "while decoder experts show much less specialization."
    )

    def variants(self, ctx: Context) -> list[Variant]:
        return [
            Variant("decoder-only LM", ("model.arch=decoder",)),
            Variant("encoder-decoder (span corruption)", ("model.arch=encdec",)),
        ]

    def run(self, ctx: Context, variant: Variant) -> RunRecord:
        from moekit.analysis import write_analysis_report

        max_tokens = SMOKE_ANALYZE_TOKENS if ctx.smoke else ANALYZE_TOKENS
        at_init: dict = {}

        def before_fit(trainer) -> None:  # the same analysis of the untrained model, for reference
            at_init["layers"] = layer_specialization(_analyze(trainer, max_tokens))

        keep: dict = {}
        record = train_variant(ctx, variant, before_fit=before_fit, keep=keep)
        if not record.ok:
            return record
        trainer = keep["trainer"]
        analysis = _analyze(trainer, max_tokens)
        out = Path(record.run_dir) / "analysis"
        write_analysis_report(  # what the recorded `moekit analyze` command writes, load over training too
            analysis,
            trainer.tokenizer,
            out,
            title=f"moekit routing analysis: {variant.label}",
            metrics_path=Path(record.run_dir) / "metrics.jsonl",
        )
        record.command += f"\nmoekit analyze --ckpt {record.run_dir} --max-tokens {max_tokens} --out {out}"
        record.extra["layers"] = layer_specialization(analysis)
        for layer, init in zip(record.extra["layers"], at_init["layers"]):
            layer["normalized_mi_at_init"] = init["normalized_mi"]
        return record

    def summarize(self, ctx: Context, records: list[RunRecord]) -> Summary:
        rows = []
        for i, r in enumerate(records, 1):
            for layer in r.extra.get("layers", []):
                rows.append(
                    [
                        str(i),
                        r.label,
                        layer["layer"],
                        f"{layer['mi_bits']:.4f}",
                        f"{layer['normalized_mi']:.4f}",
                        f"{layer['chance_normalized_mi']:.4f}",
                        fmt(layer.get("normalized_mi_at_init"), 4),
                    ]
                )
        table = Table(
            "",
            [
                "#",
                "model",
                "layer",
                "I(expert; category) bits",
                "normalized MI",
                "normalized MI, shuffled",
                "normalized MI before training",
            ],
            rows,
        )
        sides = {s: side_mean(records[1], s) for s in ("encoder", "decoder")} if len(records) > 1 else {}
        decoder_only = side_mean(records[0], "decoder") if records else None
        notes = [
            f"Decoder-only LM, mean normalized MI over layers: {fmt(decoder_only, 4)} (no encoder to compare "
            "with; shown for reference).",
            "Normalized MI before training: the same analysis of the untrained model (its random routing "
            "of token embeddings), so the trained values can be read against it.",
            "Per-layer reports (load, top tokens per expert, a coloured passage): analysis/report.html "
            "in each run folder.",
        ]
        return Summary([table], _checks(sides, records[1] if len(records) > 1 else None), notes)

    def plot(self, records: list[RunRecord], path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4))
        labels, values, chance = [], [], []
        for r in records:
            for layer in r.extra.get("layers", []):
                prefix = "LM " if r.label.startswith("decoder-only") else "ED "
                labels.append(prefix + layer["layer"])
                values.append(layer["normalized_mi"])
                chance.append(layer["chance_normalized_mi"])
        x = np.arange(len(labels))
        ax.bar(x - 0.2, values, 0.4, label="normalized I(expert; category)")
        ax.bar(x + 0.2, chance, 0.4, label="shuffled categories (chance)")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set(ylabel="I / H(category)", title="LM = decoder-only, ED = encoder-decoder")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _analyze(trainer, max_tokens: int):
    """`moekit analyze`'s analysis of the trainer's model on its validation texts."""
    from moekit.analysis import analyze_routing

    texts = list(trainer.data.corpus.validation_texts())
    return analyze_routing(
        trainer.model, trainer.tokenizer, texts, seq_len=trainer.cfg.data.seq_len, max_tokens=max_tokens
    )


def layer_specialization(analysis, seed: int = 0) -> list[dict]:
    """Per layer: MI in bits, MI / H(category), and the same with the categories shuffled."""
    from moekit.analysis import CATEGORIES, mutual_information

    rng = np.random.default_rng(seed)
    rows = []
    for layer in analysis.layers:
        cats = analysis.sides[layer.side].categories_N
        top1 = layer.top1_N
        ok = (cats >= 0) & (top1 >= 0)
        joint = _joint(top1[ok], cats[ok], layer.num_experts, len(CATEGORIES))
        shuffled = _joint(top1[ok], rng.permutation(cats[ok]), layer.num_experts, len(CATEGORIES))
        h = _entropy_bits(joint.sum(axis=0))
        mi, chance = mutual_information(joint), mutual_information(shuffled)
        rows.append(
            {
                "layer": layer.name,
                "side": layer.side,
                "tokens": int(ok.sum()),
                "mi_bits": mi,
                "category_entropy_bits": h,
                "normalized_mi": mi / h if h > 0 else 0.0,
                "chance_normalized_mi": chance / h if h > 0 else 0.0,
            }
        )
    return rows


def side_mean(record: RunRecord, side: str, key: str = "normalized_mi") -> float | None:
    values = [layer[key] for layer in record.extra.get("layers", []) if layer["side"] == side]
    return sum(values) / len(values) if values else None


def _joint(experts: np.ndarray, cats: np.ndarray, num_experts: int, num_categories: int) -> np.ndarray:
    joint = np.zeros((num_experts, num_categories), dtype=np.int64)
    np.add.at(joint, (experts, cats), 1)
    return joint


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log2(p)).sum())


def _checks(sides: dict[str, float | None], encdec: RunRecord | None) -> list[Check]:
    enc, dec = sides.get("encoder"), sides.get("decoder")
    chance = side_mean(encdec, "encoder", "chance_normalized_mi") if encdec is not None else None
    if enc is None or chance is None:
        first = Check("Encoder experts specialize.", "encoder-decoder run missing", "inconclusive")
    else:
        first = Check(
            "Encoder experts specialize. Rule: the encoder's normalized MI is at least twice its "
            "shuffled-category chance level.",
            f"encoder {enc:.4f} vs chance {chance:.4f}",
            agrees(enc >= 2 * chance),
        )
    if enc is None or dec is None:
        second = Check("Decoder experts specialize much less.", "encoder-decoder run missing", "inconclusive")
    else:
        second = Check(
            f"Decoder experts specialize much less than encoder experts. Rule: the decoder's normalized MI "
            f"is below {MUCH_LESS:g} x the encoder's.",
            f"decoder {dec:.4f} vs encoder {enc:.4f} (ratio {dec / enc if enc > 0 else float('nan'):.2f})",
            agrees(enc > 0 and dec < MUCH_LESS * enc),
        )
    return [first, second]
