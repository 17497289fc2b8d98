"""Collect what every MoE layer of a model does on real text: loads, drops, entropy, and each
token's top-1 expert next to the token's category (see categories.py).

The model runs unchanged; a forward hook on each layer's router (removed afterwards) records the
routing decisions, and the layer statistics come from the model output's `router_stats`. For an
encoder-decoder the text is span-corrupted as in training and both stacks are recorded, each
token keeping the category of the source position it came from (sentinels and eos excluded).

Shape legend: N analysed tokens of one side, E experts, C categories.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moekit.analysis.categories import CATEGORIES, token_categories
from moekit.data import Tokenizer, random_spans_noise_mask
from moekit.model import MoEEncoderDecoder
from moekit.moe import MoE
from moekit.moe.router import Routing


@dataclass
class LayerAnalysis:
    name: str  # e.g. "layer 1", "encoder layer 1"
    side: str  # "decoder" for decoder-only LMs; "encoder" / "decoder" for encoder-decoders
    num_experts: int
    kept_per_expert: np.ndarray  # [E] assignments computed
    routed_per_expert: np.ndarray  # [E] assignments routed (before capacity)
    entropy_sum: float = 0.0  # token-weighted sum of the per-call mean router entropy
    num_tokens: int = 0
    top1: list[np.ndarray] = field(default_factory=list)  # per call: [T] top-1 expert per token, -1 none

    @property
    def dropped_fraction(self) -> float:
        routed = self.routed_per_expert.sum()
        return float(1.0 - self.kept_per_expert.sum() / routed) if routed > 0 else 0.0

    @property
    def router_entropy(self) -> float:
        return self.entropy_sum / max(self.num_tokens, 1)

    @property
    def max_load_violation(self) -> float:
        mean = self.routed_per_expert.mean()
        return float(self.routed_per_expert.max() / mean - 1.0) if mean > 0 else 0.0

    @property
    def top1_N(self) -> np.ndarray:
        return np.concatenate(self.top1) if self.top1 else np.zeros(0, dtype=np.int64)


@dataclass
class SideTokens:
    token_ids: list[np.ndarray] = field(default_factory=list)  # per call, flattened [T]
    categories: list[np.ndarray] = field(default_factory=list)  # per call [T]; -1 = special token

    @property
    def token_ids_N(self) -> np.ndarray:
        return np.concatenate(self.token_ids) if self.token_ids else np.zeros(0, dtype=np.int64)

    @property
    def categories_N(self) -> np.ndarray:
        return np.concatenate(self.categories) if self.categories else np.zeros(0, dtype=np.int64)


@dataclass
class RoutingAnalysis:
    layers: list[LayerAnalysis]
    sides: dict[str, SideTokens]
    passage: tuple[str, list[tuple[int, int]], list[int]] | None = None  # text, offsets, token ids
    # per side: [len(passage ids)] where each passage token sits in the side's analysed tokens
    # (an index into SideTokens.token_ids_N and LayerAnalysis.top1_N), -1 when not on that side
    passage_index: dict[str, np.ndarray] = field(default_factory=dict)

    def joint_counts(self, layer: LayerAnalysis) -> np.ndarray:
        """[E, C] how often a token of category c had expert e as its top-1 choice."""
        cats = self.sides[layer.side].categories_N
        top1 = layer.top1_N
        ok = (cats >= 0) & (top1 >= 0)
        joint = np.zeros((layer.num_experts, len(CATEGORIES)), dtype=np.int64)
        np.add.at(joint, (top1[ok], cats[ok]), 1)
        return joint

    def top_tokens(self, layer: LayerAnalysis, n: int = 8) -> list[list[tuple[int, int]]]:
        """Per expert, its n most frequent text tokens (token id, count) as top-1 choice (padding,
        sentinels and eos of an encoder-decoder's inputs are not text and are left out)."""
        side = self.sides[layer.side]
        text = side.categories_N >= 0
        ids, top1 = side.token_ids_N[text], layer.top1_N[text]
        return [Counter(ids[top1 == e].tolist()).most_common(n) for e in range(layer.num_experts)]


def mutual_information(joint_EC: np.ndarray) -> float:
    """I(expert; category) in bits from a joint count table."""
    total = joint_EC.sum()
    if total == 0:
        return 0.0
    p = joint_EC / total
    pe = p.sum(axis=1, keepdims=True)
    pc = p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (pe @ pc)[nz])).sum())


def entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _top1_from_routing(routing: Routing) -> np.ndarray:
    num_tokens = routing.logits_TE.shape[0]
    if routing.token_idx_A is None:  # token-major: rank 0 is the router's first choice
        return routing.expert_idx_A.view(num_tokens, routing.top_k)[:, 0].cpu().numpy()
    # expert choice: the expert that gave the token its largest weight, -1 when none picked it
    best_w = torch.full((num_tokens,), -1.0)
    best_e = torch.full((num_tokens,), -1, dtype=torch.long)
    for tok, e, w in zip(
        routing.token_idx_A.tolist(), routing.expert_idx_A.tolist(), routing.weight_A.tolist()
    ):
        if w > best_w[tok]:
            best_w[tok], best_e[tok] = w, e
    return best_e.numpy()


def _named_layers(model: nn.Module) -> list[tuple[str, str, MoE]]:
    if isinstance(model, MoEEncoderDecoder):
        enc = [
            (f"encoder layer {i}", "encoder", b.ffn)
            for i, b in enumerate(model.encoder)
            if isinstance(b.ffn, MoE)
        ]
        dec = [
            (f"decoder layer {i}", "decoder", b.ffn)
            for i, b in enumerate(model.decoder)
            if isinstance(b.ffn, MoE)
        ]
        return enc + dec
    return [(f"layer {i}", "decoder", b.ffn) for i, b in enumerate(model.layers) if isinstance(b.ffn, MoE)]


def _encode_documents(tokenizer: Tokenizer, texts: list[str], max_tokens: int):
    """(ids, categories, text, offsets) per document until max_tokens tokens are collected."""
    docs, total = [], 0
    for text in texts:
        enc = tokenizer.backend.encode(text)
        if not enc.ids:
            continue
        ids = np.asarray(enc.ids, dtype=np.int64)
        cats = token_categories(text, list(enc.offsets)).astype(np.int64)
        take = min(len(ids), max_tokens - total)
        docs.append((ids[:take], cats[:take], text, list(enc.offsets)[:take]))
        total += take
        if total >= max_tokens:
            break
    return docs


@torch.no_grad()
def analyze_routing(
    model: nn.Module,
    tokenizer: Tokenizer,
    texts: list[str],
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int = 20_000,
    seed: int = 0,
) -> RoutingAnalysis:
    """Run `model` over `texts` (Python sources give meaningful categories) and record routing."""
    model.eval()
    named = _named_layers(model)
    if not named:
        raise ValueError("the model has no MoE layer to analyse")
    layers = [
        LayerAnalysis(
            name, side, m.config.num_experts, np.zeros(m.config.num_experts), np.zeros(m.config.num_experts)
        )
        for name, side, m in named
    ]
    hooks = []
    for layer, (_, _, moe) in zip(layers, named):
        hooks.append(
            moe.router.register_forward_hook(
                lambda mod, inp, out, la=layer: la.top1.append(_top1_from_routing(out))
            )
        )
    docs = _encode_documents(tokenizer, texts, max_tokens)
    if not docs:
        raise ValueError("no text to analyse: the documents are empty")
    is_encdec = isinstance(model, MoEEncoderDecoder)
    sides = {"encoder": SideTokens(), "decoder": SideTokens()} if is_encdec else {"decoder": SideTokens()}
    device = next(model.parameters()).device
    # the first document is the passage the report colours: where each of its tokens lands in
    # every side's analysed tokens (windows run grouped by length, so not in document order)
    passage_index = {side: np.full(len(docs[0][0]), -1, dtype=np.int64) for side in sides}
    analysed = dict.fromkeys(sides, 0)  # tokens (padding included) recorded so far per side
    try:
        windows = [
            (d, s, ids[s : s + seq_len], cats[s : s + seq_len])
            for d, (ids, cats, _, _) in enumerate(docs)
            for s in range(0, len(ids), seq_len)
        ]
        by_len: dict[int, list] = {}
        for w in windows:
            by_len.setdefault(len(w[2]), []).append(w)
        rng = np.random.default_rng(seed)
        for group in by_len.values():
            for first in range(0, len(group), batch_size):
                batch = group[first : first + batch_size]
                if is_encdec:
                    out, source, real = _run_encdec(
                        model, tokenizer, [(b[2], b[3]) for b in batch], rng, sides, device
                    )
                else:
                    ids = torch.as_tensor(np.stack([b[2] for b in batch]), device=device)
                    out = model(ids)
                    sides["decoder"].token_ids.append(ids.reshape(-1).cpu().numpy())
                    sides["decoder"].categories.append(np.concatenate([b[3] for b in batch]))
                    width = ids.shape[1]
                    source = {"decoder": np.tile(np.arange(width), (len(batch), 1))}
                    real = {"decoder": ids.numel()}
                for side, src_BW in source.items():  # [B, width] position in the window, -1 none
                    for row, (d, start, _, _) in enumerate(batch):
                        at = np.flatnonzero((src_BW[row] >= 0) & (d == 0))
                        base = analysed[side] + row * src_BW.shape[1]
                        passage_index[side][start + src_BW[row, at]] = base + at
                    analysed[side] += src_BW.size
                stats = (
                    list(out.encoder_router_stats) + list(out.decoder_router_stats)
                    if is_encdec
                    else out.router_stats
                )
                for layer, s in zip(layers, stats):
                    n = real[layer.side]  # router_entropy is the mean over the call's real tokens
                    layer.kept_per_expert += s.tokens_per_expert.cpu().numpy()
                    layer.routed_per_expert += s.routed_per_expert.cpu().numpy()
                    layer.entropy_sum += float(s.router_entropy) * n
                    layer.num_tokens += n
    finally:
        for h in hooks:
            h.remove()
    ids, cats, text, offsets = docs[0]
    return RoutingAnalysis(layers, sides, (text, offsets, ids.tolist()), passage_index)


def _run_encdec(model, tokenizer: Tokenizer, batch, rng, sides: dict[str, SideTokens], device):
    """Span-corrupt each window like training does, keeping every token's source category.

    Returns the model output, per side the [B, width] position in the window of every input token
    (-1: sentinel, eos, decoder start or padding), and per side the number of real (unpadded) tokens."""
    sentinels = tokenizer.sentinel_ids
    enc_rows, enc_cats, dec_rows, dec_cats, enc_src, dec_src = [], [], [], [], [], []
    for ids, cats in batch:
        real_len = len(ids)
        if len(ids) < 2:
            ids, cats = np.append(ids, tokenizer.eos_id), np.append(cats, -1)
        mask = random_spans_noise_mask(len(ids), rng)
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        span_no = np.cumsum(starts) - 1
        e_ids, e_cats, e_src, target, t_cats, t_src = [], [], [], [], [], []
        for i in range(len(ids)):
            src = i if i < real_len else -1
            if starts[i]:
                e_ids.append(sentinels[span_no[i]])
                e_cats.append(-1)
                e_src.append(-1)
                target.append(sentinels[span_no[i]])
                t_cats.append(-1)
                t_src.append(-1)
            if mask[i]:
                target.append(int(ids[i]))
                t_cats.append(int(cats[i]))
                t_src.append(src)
            else:
                e_ids.append(int(ids[i]))
                e_cats.append(int(cats[i]))
                e_src.append(src)
        e_ids.append(tokenizer.eos_id)
        e_cats.append(-1)
        e_src.append(-1)
        dec_in = [tokenizer.pad_id] + target  # teacher forcing: the decoder reads the target shifted right
        d_cats = [-1] + t_cats
        enc_rows.append(e_ids), enc_cats.append(e_cats), dec_rows.append(dec_in), dec_cats.append(d_cats)
        enc_src.append(e_src), dec_src.append([-1] + t_src)
    enc = _pad_rows(enc_rows, tokenizer.pad_id)
    dec = _pad_rows(dec_rows, tokenizer.pad_id)
    enc_mask = _pad_rows([[1] * len(r) for r in enc_rows], 0).bool()
    dec_mask = _pad_rows([[1] * len(r) for r in dec_rows], 0).bool()
    out = model(
        enc.to(device),
        dec.to(device),
        attention_mask=enc_mask.to(device),
        decoder_attention_mask=dec_mask.to(device),
    )
    sides["encoder"].token_ids.append(enc.reshape(-1).numpy())
    sides["encoder"].categories.append(
        np.where(enc_mask.reshape(-1).numpy(), _pad_rows(enc_cats, -1).reshape(-1).numpy(), -1)
    )
    sides["decoder"].token_ids.append(dec.reshape(-1).numpy())
    sides["decoder"].categories.append(
        np.where(dec_mask.reshape(-1).numpy(), _pad_rows(dec_cats, -1).reshape(-1).numpy(), -1)
    )
    source = {"encoder": _pad_rows(enc_src, -1).numpy(), "decoder": _pad_rows(dec_src, -1).numpy()}
    real = {"encoder": int(enc_mask.sum()), "decoder": int(dec_mask.sum())}
    return out, source, real


def _pad_rows(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.long)
