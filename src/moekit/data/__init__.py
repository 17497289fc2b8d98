"""Data for moekit: text corpora (the embedded stdlib corpus and user files), a byte-level BPE tokenizer,
cached token streams, resumable batch samplers and span corruption for encoder-decoders.

The usual entry point is :func:`prepare_data`, which loads a corpus, trains or loads its tokenizer and
returns the cached token streams; :class:`LMBatchSampler`, :class:`ValidationWindows` and
:class:`SpanCorruptionSampler` turn those streams into batches.
"""

from moekit.data.cache import default_cache_dir
from moekit.data.corpus import (
    DEFAULT_TEXT_FIELD,
    DEFAULT_VALIDATION_FRACTION,
    STDLIB_EXCLUDED_DIRS,
    Corpus,
    Document,
    expand_paths,
    list_stdlib_files,
    load_corpus,
    load_stdlib_corpus,
    load_text_corpus,
    read_documents,
    split_fraction,
    stdlib_root,
)
from moekit.data.loader import (
    IGNORE_INDEX,
    LMBatchSampler,
    PreparedData,
    SpanCorruptionExample,
    SpanCorruptionSampler,
    TokenSplits,
    ValidationWindows,
    encode_documents,
    load_or_encode_tokens,
    noise_span_counts,
    prepare_data,
    random_spans_noise_mask,
    span_corrupt,
    span_corruption_lengths,
    token_dtype,
)
from moekit.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    TokenizerConfig,
    load_or_train_tokenizer,
    sentinel_token,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_TEXT_FIELD",
    "DEFAULT_VALIDATION_FRACTION",
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "PAD_TOKEN",
    "STDLIB_EXCLUDED_DIRS",
    "Corpus",
    "Document",
    "LMBatchSampler",
    "PreparedData",
    "SpanCorruptionExample",
    "SpanCorruptionSampler",
    "TokenSplits",
    "Tokenizer",
    "TokenizerConfig",
    "ValidationWindows",
    "default_cache_dir",
    "encode_documents",
    "expand_paths",
    "list_stdlib_files",
    "load_corpus",
    "load_or_encode_tokens",
    "load_or_train_tokenizer",
    "load_stdlib_corpus",
    "load_text_corpus",
    "noise_span_counts",
    "prepare_data",
    "random_spans_noise_mask",
    "read_documents",
    "sentinel_token",
    "span_corrupt",
    "span_corruption_lengths",
    "split_fraction",
    "stdlib_root",
    "token_dtype",
    "train_tokenizer",
]
