"""Routing analysis: categories by hand, counts and mutual information against direct counts."""

from __future__ import annotations

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


def test_counts_and_mutual_information_against_direct_computation(tokenizer, tmp_path):
    model = _tiny_decoder().eval()
    texts = [SOURCE, "value = compute(1, 'a')  # note\n" * 4]
    analysis = analyze_routing(model, tokenizer, texts, seq_len=32, batch_size=4, max_tokens=10_000)

    # Independent pass: feed the same windows, read each layer's input, route by hand (softmax top-1).
    inputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    moe_layers = [b.ffn for b in model.layers]
    handles = [
        m.register_forward_pre_hook(lambda mod, args, i=i: inputs[i].append(args[0].reshape(-1, 32)))
        for i, m in enumerate(moe_layers)
    ]
    ids_all, cats_all, stats_sum = [], [], [np.zeros(4), np.zeros(4)]
    windows = []
    for text in texts:
        enc = tokenizer.backend.encode(text)
        cats = token_categories(text, list(enc.offsets))
        for s in range(0, len(enc.ids), 32):
            windows.append((enc.ids[s : s + 32], cats[s : s + 32]))
    by_len: dict[int, list] = {}
    for w in windows:
        by_len.setdefault(len(w[0]), []).append(w)
    with torch.no_grad():
        for group in by_len.values():
            for first in range(0, len(group), 4):
                batch = group[first : first + 4]
                out = model(torch.tensor([b[0] for b in batch]))
                for i, s in enumerate(out.router_stats):
                    stats_sum[i] += s.tokens_per_expert.numpy()
                ids_all += [t for b in batch for t in b[0]]
                cats_all += [int(c) for b in batch for c in b[1]]
    for h in handles:
        h.remove()
    for i, layer in enumerate(analysis.layers):
        x = torch.cat(inputs[i])
        top1 = (x @ moe_layers[i].router.gate.weight.T).softmax(-1).argmax(-1).tolist()
        assert layer.top1_N.tolist() == top1
        np.testing.assert_array_equal(layer.kept_per_expert, stats_sum[i])
        joint = Counter(zip(top1, cats_all))
        n = sum(joint.values())
        pe, pc = Counter(top1), Counter(cats_all)
        mi = sum(c / n * math.log2((c / n) / ((pe[e] / n) * (pc[k] / n))) for (e, k), c in joint.items())
        out = write_analysis_report(analysis, tokenizer, tmp_path / "r", title="t")
        assert out["layers"][i]["mutual_information_bits"] == pytest.approx(mi, rel=1e-9, abs=1e-12)
        assert out["layers"][i]["tokens_per_expert"] == stats_sum[i].astype(int).tolist()
        most = Counter(t for t, e in zip(ids_all, top1) if e == 0).most_common(3)
        assert [c for _, c in out["top_tokens"][layer.name][0][:3]] == [c for _, c in most]
    assert analysis.sides["decoder"].token_ids_N.tolist() == ids_all


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
    analysis = analyze_routing(model, tokenizer, [SOURCE, SOURCE.upper()], seq_len=24)
    assert [layer.name for layer in analysis.layers] == ["encoder layer 1", "decoder layer 1"]
    enc, dec = analysis.sides["encoder"], analysis.sides["decoder"]
    assert len(enc.token_ids_N) == len(analysis.layers[0].top1_N)
    assert len(dec.token_ids_N) == len(analysis.layers[1].top1_N)
    # every real source token appears once on one side or the other (kept in the encoder, noise in the decoder)
    n_source = sum(len(tokenizer.encode(t)) for t in [SOURCE, SOURCE.upper()])
    assert (enc.categories_N >= 0).sum() + (dec.categories_N >= 0).sum() == n_source
    numbers = write_analysis_report(analysis, tokenizer, tmp_path / "ed", title="ed")
    assert set(numbers["mean_mutual_information_by_side"]) == {"encoder", "decoder"}
