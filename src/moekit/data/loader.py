"""Token streams and batches: tokenised corpora cached as ``.npy``, a resumable batch sampler for
decoder language models, fixed validation windows, and T5-style span corruption for encoder-decoders.

Token streams
    Each split is one flat array: every document's ids followed by the eos id. It is stored as uint16
    when the vocabulary fits (else uint32) in ``<cache_dir>/tokens-<key>/{train,validation}.npy``, where
    the key hashes the corpus fingerprint and the tokenizer itself; files are written atomically and
    memory-mapped read-only when loaded (never unpickled).

Sampling
    The stream is cut into windows of ``window_len`` tokens every ``stride`` tokens. In random mode every
    epoch starts at a random offset below ``stride`` and visits its windows in a random permutation; in
    sequential mode offset 0 and in order. Batches take the next ``batch_size`` windows, running on into
    the next epoch when one ends. The randomness of epoch ``e`` comes from a fresh generator seeded with
    ``(seed, e)`` (and, for span corruption, ``(seed, e, position)``), so ``(seed, epoch, position)`` *is*
    the complete RNG state: :meth:`state_dict` is a small JSON-serialisable dict and a sampler restored
    from it yields exactly the batches the original would have yielded next.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from moekit.data.cache import atomic_save_npy, load_npy, resolve_cache_dir, stable_hash
from moekit.data.corpus import DEFAULT_TEXT_FIELD, DEFAULT_VALIDATION_FRACTION, Corpus, PathLike, load_corpus
from moekit.data.tokenizer import Tokenizer, TokenizerConfig, load_or_train_tokenizer

IGNORE_INDEX = -100
SPLITS = ("train", "validation")
ENCODE_BATCH_DOCS = 256
SAMPLER_STATE_VERSION = 1
# Bumped whenever the way token streams are built changes, so stale cached arrays are not reused.
TOKENS_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# Token streams
# ---------------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 halves memory for vocabularies <= 65536."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def encode_documents(
    tokenizer: Tokenizer, texts: Sequence[str], *, batch_docs: int = ENCODE_BATCH_DOCS
) -> np.ndarray:
    """Tokenise ``texts`` into one stream, each document followed by the eos id."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    # Batches keep the transient Python lists of ids small while still letting tokenizers parallelise.
    for start in range(0, len(texts), batch_docs):
        for ids in tokenizer.encode_batch(texts[start : start + batch_docs]):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


@dataclass(frozen=True)
class TokenSplits:
    """The token streams of the training and validation splits."""

    train: np.ndarray
    validation: np.ndarray


def token_cache_dir(corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    key = stable_hash(
        {"corpus": corpus.fingerprint, "tokenizer": tokenizer.fingerprint, "version": TOKENS_FORMAT_VERSION}
    )
    return cache_dir / f"tokens-{key[:24]}"


def load_or_encode_tokens(
    corpus: Corpus, tokenizer: Tokenizer, *, cache_dir: str | os.PathLike[str] | None = None
) -> TokenSplits:
    """The cached token streams of ``corpus`` under ``tokenizer``, encoding and caching them if needed."""
    directory = token_cache_dir(corpus, tokenizer, resolve_cache_dir(cache_dir))
    documents = {"train": corpus.train, "validation": corpus.validation}
    arrays = {}
    for split in SPLITS:
        path = directory / f"{split}.npy"
        if not path.is_file():
            atomic_save_npy(path, encode_documents(tokenizer, [doc.text for doc in documents[split]]))
        arrays[split] = load_npy(path)
    return TokenSplits(train=arrays["train"], validation=arrays["validation"])


@dataclass(frozen=True)
class PreparedData:
    """Everything a training run needs from the data side."""

    corpus: Corpus
    tokenizer: Tokenizer
    tokens: TokenSplits


def prepare_data(
    paths: PathLike | Sequence[PathLike] | None = None,
    *,
    validation_paths: PathLike | Sequence[PathLike] | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    text_field: str = DEFAULT_TEXT_FIELD,
    tokenizer_config: TokenizerConfig | None = None,
    tokenizer_file: PathLike | None = None,
    cache_dir: PathLike | None = None,
) -> PreparedData:
    """Load the corpus (stdlib when ``paths`` is None), get its tokenizer and its cached token streams."""
    corpus = load_corpus(
        paths,
        validation_paths=validation_paths,
        validation_fraction=validation_fraction,
        text_field=text_field,
    )
    tokenizer = load_or_train_tokenizer(
        corpus, tokenizer_config, cache_dir=cache_dir, tokenizer_file=tokenizer_file
    )
    return PreparedData(corpus, tokenizer, load_or_encode_tokens(corpus, tokenizer, cache_dir=cache_dir))


# ---------------------------------------------------------------------------------------------------
# Windows and the resumable sampler machinery
# ---------------------------------------------------------------------------------------------------


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_stream_length(num_tokens: int, window_len: int, what: str) -> None:
    """Raise a clear error when the stream cannot hold a single window."""
    if num_tokens < window_len:
        raise ValueError(
            f"the {what} token stream has {num_tokens} tokens but one window needs {window_len}; "
            f"use more data or a shorter sequence length"
        )


def _as_stream(tokens: np.ndarray | Sequence[int]) -> np.ndarray:
    stream = np.asarray(tokens)
    if stream.ndim != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(stream.shape)}")
    return stream


class _WindowStream:
    """An endless, resumable sequence of window start offsets over a token stream."""

    def __init__(self, num_tokens: int, window_len: int, stride: int, *, shuffle: bool, seed: int) -> None:
        self.num_tokens = num_tokens
        self.window_len = window_len
        self.stride = stride
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._starts = np.zeros(0, dtype=np.int64)

    def _epoch_rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _build_epoch(self) -> None:
        """The window starts of the current epoch, in visiting order."""
        if not self.shuffle:
            self._starts = self._window_starts(offset=0)
        else:
            rng = self._epoch_rng()
            # The offset varies the window boundaries between epochs; it stays small enough that at
            # least one window fits.
            max_offset = min(self.stride - 1, self.num_tokens - self.window_len)
            offset = int(rng.integers(0, max_offset + 1))
            self._starts = rng.permutation(self._window_starts(offset))
        self._order_epoch = self.epoch

    def _window_starts(self, offset: int) -> np.ndarray:
        count = (self.num_tokens - self.window_len - offset) // self.stride + 1
        return offset + self.stride * np.arange(count, dtype=np.int64)

    def next_window(self) -> tuple[int, int, int]:
        """(epoch, position, start) of the next window, advancing the state."""
        if self._order_epoch != self.epoch:
            self._build_epoch()
        if self.position >= len(self._starts):
            self.epoch += 1
            self.position = 0
            self._build_epoch()
        item = (self.epoch, self.position, int(self._starts[self.position]))
        self.position += 1
        return item


class _ResumableSampler:
    """Shared state handling of the batch samplers: a window stream plus a batch size."""

    kind = "base"

    def __init__(
        self,
        tokens: np.ndarray | Sequence[int],
        *,
        batch_size: int,
        window_len: int,
        stride: int,
        shuffle: bool,
        seed: int,
    ) -> None:
        _check_positive("batch_size", batch_size)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.tokens = _as_stream(tokens)
        check_stream_length(len(self.tokens), window_len, "training")
        self.batch_size = batch_size
        self._stream = _WindowStream(len(self.tokens), window_len, stride, shuffle=shuffle, seed=seed)

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    def _identity(self) -> dict[str, Any]:
        """Settings that must match for a saved state to mean the same thing."""
        stream = self._stream
        return {
            "kind": self.kind,
            "num_tokens": stream.num_tokens,
            "batch_size": self.batch_size,
            "window_len": stream.window_len,
            "stride": stream.stride,
            "shuffle": stream.shuffle,
            "seed": stream.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; (seed, epoch, position) is the complete RNG state."""
        return {
            "version": SAMPLER_STATE_VERSION,
            **self._identity(),
            "epoch": self._stream.epoch,
            "position": self._stream.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state saved for different data or settings."""
        if state.get("version") != SAMPLER_STATE_VERSION:
            raise ValueError(f"unsupported sampler state version {state.get('version')!r}")
        for key, expected in self._identity().items():
            if state.get(key) != expected:
                raise ValueError(
                    f"sampler state does not match this sampler: {key} is {state.get(key)!r} in the "
                    f"state but {expected!r} here"
                )
        self._stream.epoch = int(state["epoch"])
        self._stream.position = int(state["position"])

    def _next_windows(self) -> list[tuple[int, int, int]]:
        return [self._stream.next_window() for _ in range(self.batch_size)]


# ---------------------------------------------------------------------------------------------------
# Decoder language-model batches
# ---------------------------------------------------------------------------------------------------


def _lm_pair(tokens: np.ndarray, starts: Sequence[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack([tokens[start : start + seq_len + 1] for start in starts]).astype(np.int64)
    return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())


class LMBatchSampler(_ResumableSampler):
    """Endless ``(inputs, targets)`` int64 batches of shape ``[batch_size, seq_len]`` for next-token
    prediction. Windows hold ``seq_len + 1`` tokens and start every ``seq_len`` tokens, so consecutive
    windows share one token and every token is a target once per epoch."""

    kind = "lm"

    def __init__(
        self,
        tokens: np.ndarray | Sequence[int],
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        _check_positive("seq_len", seq_len)
        super().__init__(
            tokens, batch_size=batch_size, window_len=seq_len + 1, stride=seq_len, shuffle=shuffle, seed=seed
        )
        self.seq_len = seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = [start for _epoch, _position, start in self._next_windows()]
        return _lm_pair(self.tokens, starts, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()


class ValidationWindows:
    """Fixed validation batches: non-overlapping windows from the start of the stream, the same on every
    iteration. ``max_windows`` keeps evaluation cheap by taking that many evenly spaced windows."""

    def __init__(
        self,
        tokens: np.ndarray | Sequence[int],
        batch_size: int,
        seq_len: int,
        *,
        max_windows: int | None = None,
    ) -> None:
        _check_positive("batch_size", batch_size)
        _check_positive("seq_len", seq_len)
        if max_windows is not None:
            _check_positive("max_windows", max_windows)
        self.tokens = _as_stream(tokens)
        check_stream_length(len(self.tokens), seq_len + 1, "validation")
        self.batch_size = batch_size
        self.seq_len = seq_len
        count = (len(self.tokens) - 1) // seq_len
        indices = np.arange(count)
        if max_windows is not None and max_windows < count:
            indices = np.linspace(0, count - 1, max_windows).round().astype(np.int64)
        self.starts = (indices * seq_len).tolist()

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, len(self.starts), self.batch_size):
            yield _lm_pair(self.tokens, self.starts[first : first + self.batch_size], self.seq_len)


# ---------------------------------------------------------------------------------------------------
# Span corruption (T5 / Switch Transformer pre-training objective)
# ---------------------------------------------------------------------------------------------------


class SpanCorruptionExample(NamedTuple):
    """One corrupted example; the batch sampler yields the same fields as stacked tensors."""

    enc_input: np.ndarray
    dec_input: np.ndarray
    dec_target: np.ndarray


def noise_span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(number of noise tokens, number of noise spans) for a window of ``length`` tokens.

    Both depend only on the arguments, never on the random draw, so every example of a given window
    length has the same encoder and decoder lengths.
    """
    if length < 2:
        raise ValueError(f"span corruption needs a window of at least 2 tokens, got {length}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be strictly between 0 and 1, got {noise_density!r}")
    if mean_span_length < 1.0:
        raise ValueError(f"mean_span_length must be >= 1, got {mean_span_length!r}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean_span_length), 1), num_noise, length - num_noise)
    return num_noise, num_spans


def span_corruption_lengths(
    window_len: int, noise_density: float = 0.15, mean_span_length: float = 3.0
) -> tuple[int, int]:
    """(encoder length, decoder length) of corrupted examples, both including the final eos."""
    num_noise, num_spans = noise_span_counts(window_len, noise_density, mean_span_length)
    return window_len - num_noise + num_spans + 1, num_noise + num_spans + 1


def _random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``total`` items into ``parts`` non-empty runs."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def random_spans_noise_mask(
    length: int, rng: np.random.Generator, noise_density: float = 0.15, mean_span_length: float = 3.0
) -> np.ndarray:
    """Boolean mask of noise tokens: ``num_spans`` noise runs interleaved with as many kept runs, starting
    with a kept run (as in T5's ``random_spans_noise_mask``)."""
    num_noise, num_spans = noise_span_counts(length, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    run_lengths = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), run_lengths)


def _pad(values: np.ndarray, length: int, fill: int, what: str) -> np.ndarray:
    if len(values) > length:
        raise ValueError(f"{what} has {len(values)} tokens, more than its fixed length {length}")
    return np.concatenate([values, np.full(length - len(values), fill, dtype=np.int64)])


def span_corrupt(
    window: np.ndarray | Sequence[int],
    *,
    sentinel_ids: Sequence[int],
    eos_id: int,
    pad_id: int,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    enc_len: int | None = None,
    dec_len: int | None = None,
) -> SpanCorruptionExample:
    """Corrupt one token window T5-style.

    Each noise span is replaced in the encoder input by the next sentinel; the decoder target lists
    ``sentinel, span tokens`` for every span and then eos. Both are padded with ``pad_id`` to ``enc_len`` /
    ``dec_len`` (default: the exact lengths from :func:`span_corruption_lengths`). ``dec_input`` is the
    target shifted right behind the decoder start token ``pad_id``; ``dec_target`` has ``-100`` at padding
    so a cross-entropy loss ignores it.
    """
    tokens = np.asarray(window, dtype=np.int64)
    mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_span_length)
    span_starts = mask & ~np.concatenate([[False], mask[:-1]])
    num_spans = int(span_starts.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(
            f"a window of {len(tokens)} tokens gets {num_spans} noise spans but only {len(sentinel_ids)} "
            f"sentinel ids are available; use shorter windows or a tokenizer with more sentinels"
        )
    sentinels = np.asarray(sentinel_ids[:num_spans], dtype=np.int64)
    # Encoder: kept tokens, with the first token of each span replaced by its sentinel and the rest dropped.
    with_sentinels = tokens.copy()
    with_sentinels[span_starts] = sentinels
    encoder = np.append(with_sentinels[~mask | span_starts], eos_id)
    # Target: the noise tokens, with each span's sentinel inserted in front of it.
    noise = tokens[mask]
    target = np.append(np.insert(noise, np.flatnonzero(span_starts[mask]), sentinels), eos_id)
    default_enc, default_dec = span_corruption_lengths(len(tokens), noise_density, mean_span_length)
    enc_len = default_enc if enc_len is None else enc_len
    dec_len = default_dec if dec_len is None else dec_len
    dec_input = np.concatenate([[pad_id], target[:-1]])
    return SpanCorruptionExample(
        enc_input=_pad(encoder, enc_len, pad_id, "the encoder input"),
        dec_input=_pad(dec_input, dec_len, pad_id, "the decoder input"),
        dec_target=_pad(target, dec_len, IGNORE_INDEX, "the decoder target"),
    )


class SpanCorruptionSampler(_ResumableSampler):
    """Endless encoder-decoder batches ``(enc_input, dec_input, dec_target)`` (int64 tensors of shapes
    ``[B, enc_len]``, ``[B, dec_len]``, ``[B, dec_len]``) from span-corrupted windows of ``window_len``
    tokens. Resumable exactly like :class:`LMBatchSampler`: each window's corruption is drawn from a
    generator seeded with ``(seed, epoch, position)``."""

    kind = "span_corruption"

    def __init__(
        self,
        tokens: np.ndarray | Sequence[int],
        batch_size: int,
        window_len: int,
        *,
        sentinel_ids: Sequence[int],
        eos_id: int,
        pad_id: int,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        _check_positive("window_len", window_len)
        super().__init__(
            tokens,
            batch_size=batch_size,
            window_len=window_len,
            stride=window_len,
            shuffle=shuffle,
            seed=seed,
        )
        self.window_len = window_len
        self.sentinel_ids = tuple(sentinel_ids)
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.enc_len, self.dec_len = span_corruption_lengths(window_len, noise_density, mean_span_length)
        _num_noise, num_spans = noise_span_counts(window_len, noise_density, mean_span_length)
        if num_spans > len(self.sentinel_ids):
            raise ValueError(
                f"window_len {window_len} gives {num_spans} noise spans but only {len(self.sentinel_ids)} "
                f"sentinel ids were given"
            )

    def _identity(self) -> dict[str, Any]:
        return {
            **super()._identity(),
            "noise_density": self.noise_density,
            "mean_span_length": self.mean_span_length,
        }

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        examples = []
        for epoch, position, start in self._next_windows():
            # Per-window generators make each example a pure function of (seed, epoch, position), so a
            # resumed sampler needs no generator state beyond the counters.
            rng = np.random.default_rng([self._stream.seed, epoch, position])
            examples.append(
                span_corrupt(
                    self.tokens[start : start + self.window_len],
                    sentinel_ids=self.sentinel_ids,
                    eos_id=self.eos_id,
                    pad_id=self.pad_id,
                    rng=rng,
                    noise_density=self.noise_density,
                    mean_span_length=self.mean_span_length,
                    enc_len=self.enc_len,
                    dec_len=self.dec_len,
                )
            )
        enc_input, dec_input, dec_target = (torch.from_numpy(np.stack(field)) for field in zip(*examples))
        return enc_input, dec_input, dec_target

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.next_batch()
