"""A lossless dictionary code for ternary weights (QMoE-style): pairs -> 9 symbols -> Tunstall words.

Ternary weights t in {-1, 0, +1} are read two at a time as one of 9 pair symbols
s = 3 (t_a + 1) + (t_b + 1) (s = 4 is the all-zero pair, by far the most frequent). A Tunstall
code (Tunstall 1967) then maps variable-length runs of pair symbols to fixed-width codewords: the
dictionary is the leaf set of a tree grown from the root by repeatedly expanding the most probable
leaf into its 9 children while the leaves still fit in 2^code_bits. Frequent runs (long stretches
of zero pairs) become single codewords, so the bits per weight approach the entropy of the pair
distribution, while decoding stays a table lookup: codeword -> (start, length) in a flat symbol
table, fully vectorized (QMoE decodes a 2^16-entry dictionary of symbol runs the same way on GPU).

Only the 9 symbol counts are stored: the dictionary is rebuilt from them, deterministically, on
load. Encoding parses greedily from the root; the tree is complete, so every run ends at a leaf,
except possibly the last, which is padded with zero pairs (the decoder keeps `num_symbols`).
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

NUM_SYMBOLS = 9
ZERO_PAIR = 4  # the symbol of (0, 0)


def pair_symbols(ternary: Tensor) -> Tensor:
    """int8 values in {-1, 0, 1}, any shape -> uint8 pair symbols [ceil(n / 2)] (an odd tail pads 0)."""
    flat = ternary.reshape(-1).to(torch.int16)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2) + 1
    return (pairs[:, 0] * 3 + pairs[:, 1]).to(torch.uint8)


def unpair_symbols(symbols: Tensor, num_values: int) -> Tensor:
    """Inverse of pair_symbols: int8 ternary values [num_values]."""
    s = symbols.to(torch.int16)
    values = torch.stack([s // 3, s % 3], dim=1).reshape(-1) - 1
    return values[:num_values].to(torch.int8)


class TunstallCode:
    """The Tunstall dictionary of `code_bits`-bit codewords for pair-symbol counts `counts`."""

    def __init__(self, counts: Sequence[int], code_bits: int = 16):
        if len(counts) != NUM_SYMBOLS or any(int(c) < 0 for c in counts):
            raise ValueError(f"counts must be {NUM_SYMBOLS} non-negative integers, got {list(counts)}")
        if not 4 <= code_bits <= 24:
            raise ValueError(f"code_bits={code_bits} is invalid: expected an integer in [4, 24]")
        self.counts = tuple(int(c) for c in counts)
        self.code_bits = code_bits
        tables = _build(self.counts, code_bits)
        self.child, self.word_symbols, self.word_start, self.word_len = tables
        self.num_words = len(self.word_len)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int16 if self.code_bits <= 16 else torch.int32  # int16 holds uint16 bit patterns

    def encode(self, symbols: Tensor) -> Tensor:
        """uint8 pair symbols [n] -> codewords [m] (int16 bit patterns of uint16, or int32)."""
        child = self.child
        codes: list[int] = []
        node = 0
        for s in symbols.tolist():
            node = child[node][s]
            if node < 0:  # a leaf: emit its codeword, restart at the root
                codes.append(-node - 1)
                node = 0
        while node != 0:  # the last run stopped inside the tree: pad with zero pairs to a leaf
            node = child[node][ZERO_PAIR]
            if node < 0:
                codes.append(-node - 1)
                node = 0
        out = torch.tensor(codes, dtype=torch.int64)
        if self.code_bits <= 16:
            out = torch.where(out >= 1 << 15, out - (1 << 16), out)  # store uint16 bit patterns in int16
        return out.to(self.code_dtype)

    def decode(self, codes: Tensor, num_symbols: int) -> Tensor:
        """codewords -> uint8 pair symbols [num_symbols] (vectorized table lookup)."""
        idx = codes.to(torch.int64)
        if self.code_bits <= 16:
            idx = idx & 0xFFFF
        lens = self.word_len[idx]
        starts = self.word_start[idx]
        offsets = torch.cumsum(lens, 0) - lens
        total = int(lens.sum())
        pos = torch.repeat_interleave(starts - offsets, lens) + torch.arange(total)
        return self.word_symbols[pos[:num_symbols]]

    def expected_bits_per_symbol(self) -> float:
        """code_bits / expected word length under the counts' distribution (the code's rate)."""
        p = _probabilities(self.counts)
        logp = torch.log(torch.tensor(p, dtype=torch.float64))
        lengths = self.word_len.double()
        log_word_p = torch.zeros(self.num_words, dtype=torch.float64)
        flat = self.word_symbols.long()
        owner = torch.repeat_interleave(torch.arange(self.num_words), self.word_len)
        log_word_p.index_add_(0, owner, logp[flat])
        return self.code_bits / float((log_word_p.exp() * lengths).sum())


def entropy_bits(counts: Sequence[int]) -> float:
    """Entropy (bits) of the empirical pair-symbol distribution: the bound for any symbol-wise code."""
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum())


def _probabilities(counts: Sequence[int]) -> list[float]:
    total = sum(counts) + NUM_SYMBOLS  # add-one: every symbol stays encodable
    return [(c + 1) / total for c in counts]


@functools.lru_cache(maxsize=16)
def _build(counts: tuple[int, ...], code_bits: int) -> tuple[list[list[int]], Tensor, Tensor, Tensor]:
    """(child table of internal nodes, flat word symbols, word starts, word lengths)."""
    p = _probabilities(counts)
    max_words = 1 << code_bits
    # Leaves are (word probability, word); expand the most probable one while room remains.
    leaves = [(-p[s], (s,)) for s in range(NUM_SYMBOLS)]
    heapq.heapify(leaves)
    internal = [()]  # words of internal nodes; node 0 is the root (the empty word)
    while len(leaves) + NUM_SYMBOLS - 1 <= max_words:
        neg_prob, word = heapq.heappop(leaves)
        internal.append(word)
        for s in range(NUM_SYMBOLS):
            heapq.heappush(leaves, (neg_prob * p[s], (*word, s)))
    words = sorted(w for _, w in leaves)  # deterministic codeword order
    node_of = {w: i for i, w in enumerate(internal)}
    child = [[0] * NUM_SYMBOLS for _ in internal]
    for code, w in enumerate(words):
        child[node_of[w[:-1]]][w[-1]] = -code - 1
    for w, i in node_of.items():
        if w:
            child[node_of[w[:-1]]][w[-1]] = i
    lengths = torch.tensor([len(w) for w in words], dtype=torch.int64)
    flat = torch.tensor([s for w in words for s in w], dtype=torch.uint8)
    starts = torch.cumsum(lengths, 0) - lengths
    return child, flat, starts, lengths
