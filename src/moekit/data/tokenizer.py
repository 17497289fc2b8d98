"""Byte-level BPE tokenizer for moekit, trained with Hugging Face ``tokenizers`` and cached on disk.

Byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, all 256 byte symbols in the initial
alphabet) can encode any string without an unknown token, and ``decode(encode(s)) == s`` for every
``s``. The special tokens are:

* ``<|endoftext|>``: end of document; documents are joined with it in the token streams;
* ``<pad>``: padding, also the decoder start token of the encoder-decoder (T5 convention);
* ``<extra_id_0>`` .. ``<extra_id_{n-1}>``: sentinels for span corruption (``n`` = ``num_sentinels``).

They take ids 0, 1, 2.. in that order. Training reads at most ``max_train_chars`` characters from the
start of the training split so that even a large corpus trains in seconds. The trained tokenizer is
cached under ``<cache_dir>/tokenizer-<key>/tokenizer.json`` where the key hashes the corpus fingerprint
(source files, sizes, mtimes, split) and the tokenizer settings; a changed file or setting trains anew.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moekit.data.cache import atomic_write_text, resolve_cache_dir, stable_hash
from moekit.data.corpus import Corpus

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
TOKENIZER_FILENAME = "tokenizer.json"
NUM_BYTE_SYMBOLS = 256
# Bumped whenever the training recipe changes, so stale cached tokenizers are not reused.
TOKENIZER_FORMAT_VERSION = 1


def sentinel_token(index: int) -> str:
    """The text of sentinel ``index`` (T5 naming)."""
    return f"<extra_id_{index}>"


@dataclass(frozen=True)
class TokenizerConfig:
    """Settings of a trained tokenizer; all of them are part of the cache key."""

    vocab_size: int = 8192
    num_sentinels: int = 32
    max_train_chars: int = 8_000_000
    min_frequency: int = 2

    def special_tokens(self) -> list[str]:
        return [EOS_TOKEN, PAD_TOKEN, *(sentinel_token(i) for i in range(self.num_sentinels))]

    def validate(self) -> None:
        if self.num_sentinels < 0:
            raise ValueError(f"num_sentinels must be >= 0, got {self.num_sentinels}")
        minimum = NUM_BYTE_SYMBOLS + len(self.special_tokens())
        if self.vocab_size < minimum:
            raise ValueError(
                f"vocab_size {self.vocab_size} is too small: the 256 byte symbols and "
                f"{len(self.special_tokens())} special tokens alone need {minimum}"
            )
        if self.max_train_chars <= 0:
            raise ValueError(f"max_train_chars must be positive, got {self.max_train_chars}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")


class Tokenizer:
    """A thin wrapper over a ``tokenizers.Tokenizer`` exposing the ids moekit needs."""

    def __init__(self, backend: HFTokenizer) -> None:
        self._backend = backend
        eos = backend.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(
                f"the tokenizer has no {EOS_TOKEN!r} token; moekit needs it to separate documents"
            )
        self._eos_id = eos
        pad = backend.token_to_id(PAD_TOKEN)
        # A tokenizer made elsewhere (e.g. GPT-2's) may lack a pad token; decoder-only training only
        # needs some id for padding, and reusing eos is the common convention.
        self._pad_id = eos if pad is None else pad
        self._sentinel_ids = tuple(self._consecutive_sentinels())

    def _consecutive_sentinels(self) -> Iterator[int]:
        index = 0
        while (token_id := self._backend.token_to_id(sentinel_token(index))) is not None:
            yield token_id
            index += 1

    @property
    def backend(self) -> HFTokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def sentinel_ids(self) -> tuple[int, ...]:
        return self._sentinel_ids

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the serialised tokenizer: identifies it in the token-array cache key."""
        return hashlib.sha256(self._backend.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are kept so that decode(encode(s)) == s even when s contains "<|endoftext|>".
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` atomically."""
        atomic_write_text(path, self._backend.to_str())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file.as_posix()!r}")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"cannot load tokenizer file {file.as_posix()!r}: {err}") from err
        return cls(backend)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id}, "
            f"num_sentinels={len(self.sentinel_ids)})"
        )


def limited_texts(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yield texts until ``max_chars`` characters have been yielded, cutting the last one short."""
    remaining = max_chars
    for text in texts:
        if remaining <= 0:
            return
        piece = text[:remaining]
        remaining -= len(piece)
        yield piece


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer on at most ``config.max_train_chars`` characters of ``texts``."""
    config = config or TokenizerConfig()
    config.validate()
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=config.special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(limited_texts(texts, config.max_train_chars), trainer=trainer)
    return Tokenizer(backend)


def tokenizer_cache_key(corpus: Corpus, config: TokenizerConfig) -> str:
    return stable_hash(
        {"corpus": corpus.fingerprint, "config": asdict(config), "version": TOKENIZER_FORMAT_VERSION}
    )


def tokenizer_cache_path(corpus: Corpus, config: TokenizerConfig, cache_dir: Path) -> Path:
    return cache_dir / f"tokenizer-{tokenizer_cache_key(corpus, config)[:24]}" / TOKENIZER_FILENAME


def load_or_train_tokenizer(
    corpus: Corpus,
    config: TokenizerConfig | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    tokenizer_file: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Load ``tokenizer_file`` if given, else the cached tokenizer for (corpus, config), else train one
    on the corpus training split and cache it."""
    if tokenizer_file is not None:
        return Tokenizer.from_file(tokenizer_file)
    config = config or TokenizerConfig()
    config.validate()
    path = tokenizer_cache_path(corpus, config, resolve_cache_dir(cache_dir))
    if path.is_file():
        return Tokenizer.from_file(path)
    tokenizer = train_tokenizer(corpus.train_texts(), config)
    tokenizer.save(path)
    return tokenizer
