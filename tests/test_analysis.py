"""Routing analysis: categories by hand, counts and mutual information against direct counts."""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from moekit.analysis import (
    CATEGORIES,
    analyze_routing,
    char_categories,
    token_categories,
    write_analysis_report,
)
from moekit.data import TokenizerConfig, train_tokenizer
from moekit.model import ModelConfig, MoEEncoderDecoder, MoETransformer
from moekit.moe import MoEConfig

SOURCE = '''import os

def area(r, n=2):
    """Circle."""
    # pi times r squared
    if r > 0:
        return 3.14 * r ** n
    return None
'''


def cat(name):
    return CATEGORIES.index(name)


def test_char_categories_by_hand():
    cats = char_categories(SOURCE)
    at = lambda s, k=0: cats[SOURCE.index(s) + k]  # noqa: E731
    assert at("import") == cat("keyword") and at("os") == cat("identifier")
    assert at("def") == cat("keyword") and at("area") == cat("identifier")
    assert at("(") == cat("operator") and at("=2") == cat("operator") and at("**") == cat("operator")
    assert at("2)") == cat("number") and at("3.14") == cat("number")
    assert at('"""Circle') == cat("string") and at("Circle") == cat("string")
    assert at("# pi") == cat("comment") and at("squared") == cat("comment")
    assert at("None") == cat("keyword") and at("return") == cat("keyword")
    assert at("\n") == cat("indent/newline")
    assert at("    if") == cat("indent/newline")
    broken = char_categories("x = (1,\n")  # unterminated: what tokenize could not finish is "other"
    assert broken[0] == cat("identifier")


def test_token_categories_use_first_non_space_char():
    text = "def f(x):\n    return x\n"
    offsets = [(0, 3), (3, 5), (5, 6), (6, 7), (7, 9), (9, 14), (14, 20), (20, 22), (22, 23)]
    got = [CATEGORIES[c] for c in token_categories(text, offsets)]
    assert got == [
        "keyword", "identifier", "operator", "identifier", "operator",
        "indent/newline", "keyword", "identifier", "indent/newline",
    ]  # fmt: skip


def _tiny_decoder(router="topk", seed=0):
    torch.manual_seed(seed)
    moe = MoEConfig(
        dim=32, hidden_dim=32, num_experts=4, top_k=2, router=router, capacity_factor=1.0, causal=True
    )
    return MoETransformer(
        ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, ffn_hidden_dim=64, max_seq_len=64, moe=moe)
    )


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(
        [SOURCE * 20, "x = [i * 2 for i in range(10)]  # list\n" * 30],
        TokenizerConfig(vocab_size=300, num_sentinels=8),
    )


def _windows(tokenizer, texts, seq_len):
    """(document, start, ids, categories) of every window, batched as the analysis does: grouped by
    length in first-seen order, then `batch_size` windows at a time."""
    windows = []
    for d, text in enumerate(texts):
        enc = tokenizer.backend.encode(text)
        cats = token_categories(text, list(enc.offsets))
        for s in range(0, len(enc.ids), seq_len):
            windows.append((d, s, enc.ids[s : s + seq_len], [int(c) for c in cats[s : s + seq_len]]))
    by_len: dict[int, list] = {}
    for w in windows:
        by_len.setdefault(len(w[2]), []).append(w)
    return list(by_len.values())


def _route_by_hand(model, groups, batch_size):
    """Run the windows batch by batch; per MoE layer, per call the router probabilities computed
    here from the layer's input (softmax of x W^T), with the windows of every call."""
    moe_layers = [b.ffn for b in model.layers]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(moe_layers))}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, m in enumerate(moe_layers)
    ]
    calls = []
    with torch.no_grad():
        for group in groups:
            for first in range(0, len(group), batch_size):
                batch = group[first : first + batch_size]
                model(torch.tensor([b[2] for b in batch]))
                calls.append(batch)
    for h in handles:
        h.remove()
    probs = {
        i: [(x @ m.router.gate.weight.T).double().softmax(-1) for x in inputs[i]]
        for i, m in enumerate(moe_layers)
    }
    return probs, calls


class _Spans(HTMLParser):
    """The title of every coloured passage token, passage by passage."""

    def __init__(self):
        super().__init__()
        self.passages: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "pre" and a.get("class") == "passage":
            self.passages.append([])
        if tag == "span" and self.passages and a.get("title"):
            self.passages[-1].append(a["title"])


def test_counts_and_mutual_information_against_direct_computation(tokenizer, tmp_path):
    model = _tiny_decoder().eval()  # 4 experts, top-2, capacity factor 1.0: some assignments dropped
    texts = [SOURCE, "value = compute(1, 'a')  # note\n" * 4]  # 83 and 116 tokens: windows 32, 32, 19, ...
    analysis = analyze_routing(model, tokenizer, texts, seq_len=32, batch_size=4, max_tokens=10_000)
    out = write_analysis_report(analysis, tokenizer, tmp_path / "r", title="t")

    # Independent pass: feed the same windows, route every token by hand, count directly.
    probs, calls = _route_by_hand(model, _windows(tokenizer, texts, 32), batch_size=4)
    ids_all = [t for batch in calls for b in batch for t in b[2]]
    cats_all = [c for batch in calls for b in batch for c in b[3]]
    hand_top1 = []
    for i, layer in enumerate(analysis.layers):
        top1, routed, kept, entropy = [], np.zeros(4), np.zeros(4), []
        for p in probs[i]:
            chosen = p.topk(2, dim=-1).indices  # [T, 2]
            top1 += chosen[:, 0].tolist()
            per_call = np.bincount(chosen.reshape(-1).numpy(), minlength=4)
            capacity = math.ceil(1.0 * 2 * p.shape[0] / 4)  # C = ceil(CF * k * T / E)
            routed += per_call
            kept += np.minimum(per_call, capacity)  # whichever assignments win, C of them stay
            entropy += (-(p * p.log()).sum(-1)).tolist()
        row = out["layers"][i]
        hand_top1.append(top1)
        assert layer.top1_N.tolist() == top1
        assert row["routed_per_expert"] == routed.astype(int).tolist()
        assert row["tokens_per_expert"] == kept.astype(int).tolist()
        assert sum(row["routed_per_expert"]) == 2 * len(ids_all)
        assert row["dropped_fraction"] == pytest.approx(1 - kept.sum() / routed.sum(), abs=1e-12)
        assert row["dropped_fraction"] > 0  # the capacity bites in this setting
        assert row["router_entropy"] == pytest.approx(sum(entropy) / len(entropy), rel=1e-5)
        assert row["max_load_violation"] == pytest.approx(routed.max() / routed.mean() - 1, abs=1e-12)
        joint = Counter(zip(top1, cats_all))
        n = sum(joint.values())
        pe, pc = Counter(top1), Counter(cats_all)
        mi = sum(c / n * math.log2((c / n) / ((pe[e] / n) * (pc[k] / n))) for (e, k), c in joint.items())
        assert row["mutual_information_bits"] == pytest.approx(mi, rel=1e-9, abs=1e-12)
        most = Counter(t for t, e in zip(ids_all, top1) if e == 0).most_common(3)
        assert [c for _, c in out["top_tokens"][layer.name][0][:3]] == [c for _, c in most]
    assert analysis.sides["decoder"].token_ids_N.tolist() == ids_all

    # The coloured passage is the first document in its own order, each token in its expert's colour
    # (its windows were analysed in different batches, between other documents' windows).
    position = {}
    offset = 0
    for batch in calls:
        width = len(batch[0][2])
        for w, b in enumerate(batch):
            for j in range(width):
                position[(b[0], b[1] + j)] = offset + w * width + j
        offset += len(batch) * width
    last = hand_top1[-1]
    by_hand = [f"expert {last[position[(0, t)]]}" for t in range(len(tokenizer.encode(SOURCE)))]
    spans = _Spans()
    spans.feed((tmp_path / "r" / "report.html").read_text())
    assert spans.passages == [by_hand]


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.spans, self.tags = [], 0, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.images.append((a.get("alt"), a.get("src", "")))
        if tag == "span" and (a.get("title") or "").startswith("expert"):
            self.spans += 1


def test_html_report_is_self_contained_and_has_every_plot(tokenizer, tmp_path):
    model = _tiny_decoder("sigmoid_bias").eval()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps({"step": s, "loss": 5.0, "load": [[0.25] * 4, [0.1, 0.2, 0.3, 0.4]]}) + "\n"
            for s in (10, 20, 30)
        )
    )
    analysis = analyze_routing(model, tokenizer, [SOURCE], seq_len=32)
    write_analysis_report(analysis, tokenizer, tmp_path / "out", title="report", metrics_path=metrics)
    page = (tmp_path / "out" / "report.html").read_text()
    parser = _Collector()
    parser.feed(page)
    alts = [a for a, _ in parser.images]
    assert alts == [
        "load per expert",
        "expert specialization",
        "mutual information per layer",
        "load over training",
    ]
    assert all(src.startswith("data:image/png;base64,") and len(src) > 1000 for _, src in parser.images)
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch: opens offline
    assert parser.spans == len(tokenizer.encode(SOURCE))  # every token of the passage is coloured
    assert "| layer 0 | decoder |" in (tmp_path / "out" / "summary.md").read_text()


def test_encoder_decoder_sides(tokenizer, tmp_path):
    torch.manual_seed(1)
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=1, router="switch")
    model = MoEEncoderDecoder(
        ModelConfig(
            vocab_size=300,
            dim=32,
            n_layers=2,
            n_heads=4,
            ffn_hidden_dim=64,
            max_seq_len=64,
            moe=moe,
            moe_every=2,
        )
    ).eval()
    routers = [model.encoder[1].ffn.router, model.decoder[1].ffn.router]
    seen: dict[int, list] = {0: [], 1: []}  # per router, per call: (logits, mask of real tokens)
    handles = [
        r.register_forward_hook(lambda mod, inp, out, i=i: seen[i].append((out.logits_TE, inp[1])))
        for i, r in enumerate(routers)
    ]
    analysis = analyze_routing(model, tokenizer, [SOURCE, SOURCE.upper()], seq_len=24)
    for h in handles:
        h.remove()
    assert [layer.name for layer in analysis.layers] == ["encoder layer 1", "decoder layer 1"]
    enc, dec = analysis.sides["encoder"], analysis.sides["decoder"]
    assert len(enc.token_ids_N) == len(analysis.layers[0].top1_N)
    assert len(dec.token_ids_N) == len(analysis.layers[1].top1_N)
    # every real source token appears once on one side or the other (kept in the encoder, noise in the decoder)
    n_source = sum(len(tokenizer.encode(t)) for t in [SOURCE, SOURCE.upper()])
    assert (enc.categories_N >= 0).sum() + (dec.categories_N >= 0).sum() == n_source
    numbers = write_analysis_report(analysis, tokenizer, tmp_path / "ed", title="ed")
    assert set(numbers["mean_mutual_information_by_side"]) == {"encoder", "decoder"}

    # router entropy: the mean over every real token of the layer's calls
    for i, row in enumerate(numbers["layers"]):
        ent = torch.cat([-(lg.softmax(-1) * lg.log_softmax(-1)).sum(-1)[m.bool()] for lg, m in seen[i]])
        assert row["router_entropy"] == pytest.approx(float(ent.mean()), rel=1e-5)

    # most frequent tokens per expert are text tokens: never padding, sentinels or eos
    special = {tokenizer.pad_id, tokenizer.eos_id, *tokenizer.sentinel_ids}
    for layer in analysis.layers:
        assert not special & {t for experts in analysis.top_tokens(layer) for t, _ in experts}

    # the passage (the first document) side by side: each token on the side that saw it
    text, offsets, ids = analysis.passage
    where = analysis.passage_index
    on_encoder, on_decoder = where["encoder"] >= 0, where["decoder"] >= 0
    assert (on_encoder ^ on_decoder).all() and on_encoder.any() and on_decoder.any()
    for side in ("encoder", "decoder"):
        at = where[side][where[side] >= 0]
        assert analysis.sides[side].token_ids_N[at].tolist() == np.asarray(ids)[where[side] >= 0].tolist()
    spans = _Spans()
    spans.feed((tmp_path / "ed" / "report.html").read_text())
    assert len(spans.passages) == 2
    for titles, side, layer in zip(spans.passages, ("encoder", "decoder"), analysis.layers):
        on_side = where[side] >= 0
        expected = [
            f"expert {layer.top1_N[k]}" if ok else f"not on the {side} side"
            for k, ok in zip(where[side], on_side)
        ]
        assert titles == expected


def test_analyze_command_on_a_tiny_checkpoint(tmp_path, capsys):
    """`moekit analyze --ckpt RUN --data FILE` on a trained checkpoint: the report's numbers against
    routing done by hand on the same windows, and the run's load over training in the HTML."""
    from moekit.cli import main as cli_main
    from moekit.data import Tokenizer
    from moekit.train import Trainer, load_config
    from moekit.train.checkpoint import load_model
    from tests.adapt_helpers import tiny_corpus, tiny_run_overrides

    overrides = tiny_run_overrides(
        tiny_corpus(tmp_path / "corpus", files=6),
        tmp_path,
        **{"train.steps": "10", "train.log_every": "5", "train.eval_every": "10", "train.eval_batches": "1"},
    )
    trainer = Trainer(load_config(None, overrides))
    trainer.fit()
    run_dir = trainer.run_dir
    data = tmp_path / "passage.txt"
    data.write_text(SOURCE * 2, encoding="utf-8")
    assert cli_main(["analyze", "--ckpt", str(run_dir), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    out = run_dir / "analysis"  # the default: next to the checkpoint
    numbers = json.loads((out / "analysis.json").read_text())

    model, config = load_model(run_dir)
    tokenizer = Tokenizer.from_file(run_dir / "checkpoint" / "tokenizer.json")
    probs, calls = _route_by_hand(model, _windows(tokenizer, [SOURCE * 2], 32), batch_size=8)
    num_tokens = len(tokenizer.encode(SOURCE * 2))
    cats = [c for batch in calls for b in batch for c in b[3]]
    assert [row["layer"] for row in numbers["layers"]] == ["layer 0", "layer 1"]
    for i, row in enumerate(numbers["layers"]):
        p = torch.cat(probs[i])
        chosen = p.topk(2, dim=-1).indices  # the run's default: top-2 of 4 experts, dropless
        routed = np.bincount(chosen.reshape(-1).numpy(), minlength=4)
        assert routed.sum() == 2 * num_tokens
        assert row["routed_per_expert"] == row["tokens_per_expert"] == routed.tolist()
        assert row["dropped_fraction"] == 0.0
        assert row["router_entropy"] == pytest.approx(float((-(p * p.log()).sum(-1)).mean()), rel=1e-5)
        assert row["max_load_violation"] == pytest.approx(routed.max() / routed.mean() - 1, abs=1e-12)
        top1 = chosen[:, 0].tolist()
        n, joint, pe, pc = len(top1), Counter(zip(top1, cats)), Counter(top1), Counter(cats)
        mi = sum(c / n * math.log2((c / n) / ((pe[e] / n) * (pc[k] / n))) for (e, k), c in joint.items())
        assert row["mutual_information_bits"] == pytest.approx(mi, rel=1e-9, abs=1e-12)
        assert (
            f"| {row['layer']} | decoder | {routed.tolist()} | 0.0000 |" in (out / "summary.md").read_text()
        )
        assert f"I(expert; category) {mi:.4f} bits" in printed

    page = _Collector()
    page.feed((out / "report.html").read_text())
    assert [alt for alt, _ in page.images] == [
        "load per expert",
        "expert specialization",
        "mutual information per layer",
        "load over training",  # from the run's metrics.jsonl
    ]
    for _, src in page.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.spans == num_tokens

    # without --data: the run's validation files, every token of them (counted here directly)
    assert cli_main(["analyze", "--ckpt", str(run_dir), "--out", str(tmp_path / "val")]) == 0
    val_tokens = sum(
        len(tokenizer.encode(f.read_text())) for f in (tmp_path / "corpus" / "val").glob("*.txt")
    )
    assert 0 < val_tokens < 20_000  # the default --max-tokens takes them all
    rows = json.loads((tmp_path / "val" / "analysis.json").read_text())["layers"]
    assert [sum(row["routed_per_expert"]) for row in rows] == [2 * val_tokens] * 2
