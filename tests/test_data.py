"""Tests of moekit.data: corpora, tokenizer, token caches, resumable samplers and span corruption.

Every check compares against an independent reference computed here (an os.walk of the stdlib, sha1 of
the keys, files written by the test, a naive un-corruption) rather than against the code under test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.data import (
    EOS_TOKEN,
    IGNORE_INDEX,
    PAD_TOKEN,
    LMBatchSampler,
    SpanCorruptionSampler,
    Tokenizer,
    TokenizerConfig,
    ValidationWindows,
    encode_documents,
    expand_paths,
    list_stdlib_files,
    load_corpus,
    load_or_encode_tokens,
    load_or_train_tokenizer,
    load_stdlib_corpus,
    load_text_corpus,
    prepare_data,
    sentinel_token,
    span_corrupt,
    span_corruption_lengths,
    stdlib_root,
    train_tokenizer,
)
from moekit.data import tokenizer as tokenizer_module

SMALL_CONFIG = TokenizerConfig(vocab_size=400, num_sentinels=8, max_train_chars=150_000)
EXCLUDED = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


def sha1_fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) / 2**64


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def leftover_temp_files(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_stdlib_corpus()


@pytest.fixture(scope="module")
def tokenizer(stdlib_corpus):
    return train_tokenizer(stdlib_corpus.train_texts(), SMALL_CONFIG)


@pytest.fixture
def user_files(tmp_path: Path) -> dict[str, Path]:
    """A small mixed-format corpus: text files, a JSONL file and a parquet file."""
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    texts = {f"doc{i}.txt": " ".join(words[i:] + words[:i]) * 20 for i in range(6)}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    jsonl = write_jsonl(
        tmp_path / "records.jsonl", [{"body": f"record {i} " + " ".join(words) * 5} for i in range(40)]
    )
    parquet = write_parquet(
        tmp_path / "rows.parquet", {"body": [f"row {i} " + " ".join(words) * 5 for i in range(40)]}
    )
    return {"dir": tmp_path, "jsonl": jsonl, "parquet": parquet}


# ---------------------------------------------------------------------------------------------------
# Standard library corpus
# ---------------------------------------------------------------------------------------------------


def test_stdlib_files_match_an_independent_walk():
    root = Path(stdlib_root())
    expected = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if not EXCLUDED.intersection(path.relative_to(root).parts[:-1])
    )
    found = [path.relative_to(root).as_posix() for path in list_stdlib_files()]
    assert found == expected
    assert "json/__init__.py" in found
    assert not any(name.startswith(("test/", "lib2to3/tests/", "idlelib/idle_test/")) for name in found)


def test_stdlib_split_is_disjoint_stable_and_hash_based(stdlib_corpus):
    again = load_stdlib_corpus()
    assert [d.key for d in again.train] == [d.key for d in stdlib_corpus.train]
    assert [d.key for d in again.validation] == [d.key for d in stdlib_corpus.validation]
    assert again.fingerprint == stdlib_corpus.fingerprint
    train_keys = {d.key for d in stdlib_corpus.train}
    validation_keys = {d.key for d in stdlib_corpus.validation}
    assert train_keys.isdisjoint(validation_keys)
    root = stdlib_root()
    non_empty = {
        path.relative_to(root).as_posix()
        for path in list_stdlib_files()
        if path.read_text(encoding="utf-8", errors="replace").strip()
    }
    assert train_keys | validation_keys == non_empty
    assert validation_keys == {key for key in non_empty if sha1_fraction(key) < 0.05}
    assert 0.01 < len(validation_keys) / len(non_empty) < 0.15
    # The documents keep the sorted order and the exact file contents.
    keys = [d.key for d in stdlib_corpus.train]
    assert keys == sorted(keys)
    first = stdlib_corpus.train[0]
    assert first.text == (Path(root) / first.key).read_text(encoding="utf-8", errors="replace")


def test_stdlib_corpus_from_a_fake_root(tmp_path: Path):
    names = [f"pkg{i}/mod{j}.py" for i in range(5) for j in range(8)]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"x = {name!r}\n", encoding="utf-8")
    for skipped in ["test/test_a.py", "pkg0/tests/t.py", "idlelib/idle_test/t.py", "site-packages/s.py"]:
        (tmp_path / skipped).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / skipped).write_text("skipped = True\n", encoding="utf-8")
    (tmp_path / "empty.py").write_text("", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not python", encoding="utf-8")
    (tmp_path / "bad.py").write_bytes(b"s = '\xff'\n")

    corpus = load_stdlib_corpus(validation_fraction=0.3, root=tmp_path)
    keys = sorted([d.key for d in corpus.train] + [d.key for d in corpus.validation])
    assert keys == sorted([*names, "bad.py"])
    assert {d.key for d in corpus.validation} == {k for k in keys if sha1_fraction(k) < 0.3}
    bad = next(d for d in (*corpus.train, *corpus.validation) if d.key == "bad.py")
    assert bad.text == "s = '\ufffd'\n"


def test_stdlib_corpus_with_an_empty_side_or_bad_fraction_raises(tmp_path: Path):
    (tmp_path / "only.py").write_text("x = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"(validation|training) split of the standard library .* is empty"):
        load_stdlib_corpus(root=tmp_path)
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(
            ValueError, match=rf"validation_fraction must be strictly between 0 and 1, got {fraction}"
        ):
            load_stdlib_corpus(validation_fraction=fraction, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="standard library directory not found"):
        list_stdlib_files(tmp_path / "missing")
    (tmp_path / "only.py").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty"):
        load_stdlib_corpus(root=tmp_path)


# ---------------------------------------------------------------------------------------------------
# User data
# ---------------------------------------------------------------------------------------------------


def test_text_files_one_document_each(user_files):
    directory = user_files["dir"]
    corpus = load_text_corpus(str(directory / "doc[1-5].txt"), validation_paths=directory / "doc0.txt")
    expected_train = [directory / f"doc{i}.txt" for i in range(1, 6)]
    assert [d.key for d in corpus.train] == [p.as_posix() for p in expected_train]
    assert [d.text for d in corpus.train] == [p.read_text(encoding="utf-8") for p in expected_train]
    assert [d.text for d in corpus.validation] == [(directory / "doc0.txt").read_text(encoding="utf-8")]


def test_jsonl_documents_and_hash_split(tmp_path: Path):
    records = [{"id": i, "body": f"line {i} text"} for i in range(300)]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    # A blank line and a null value are skipped but still count for line numbers.
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\n" + json.dumps({"body": None}) + "\n" + json.dumps({"body": "last"}) + "\n")
    corpus = load_text_corpus(path, text_field="body", validation_fraction=0.2)
    all_docs = {d.key: d.text for d in (*corpus.train, *corpus.validation)}
    expected = {f"{path.as_posix()}:line{i + 1}": f"line {i} text" for i in range(300)}
    expected[f"{path.as_posix()}:line303"] = "last"
    assert all_docs == expected
    assert {d.key for d in corpus.validation} == {k for k in expected if sha1_fraction(k) < 0.2}
    assert [d.key for d in corpus.train] == [k for k in expected if sha1_fraction(k) >= 0.2]
    again = load_text_corpus(path, text_field="body", validation_fraction=0.2)
    assert again == corpus


def test_gzipped_jsonl(tmp_path: Path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(50):
            handle.write(json.dumps({"text": f"zipped {i}"}) + "\n")
    corpus = load_corpus([path], validation_fraction=0.3)
    assert sorted(d.text for d in (*corpus.train, *corpus.validation)) == sorted(
        f"zipped {i}" for i in range(50)
    )


def test_parquet_documents(tmp_path: Path):
    texts = [f"row {i} words" if i % 7 else None for i in range(100)]
    path = write_parquet(tmp_path / "rows.parquet", {"id": list(range(100)), "content": texts})
    corpus = load_text_corpus(path, text_field="content", validation_fraction=0.25)
    expected = {f"{path.as_posix()}:row{i}": t for i, t in enumerate(texts) if t}
    assert {d.key: d.text for d in (*corpus.train, *corpus.validation)} == expected
    assert {d.key for d in corpus.validation} == {k for k in expected if sha1_fraction(k) < 0.25}


def test_mixed_formats_with_validation_paths(user_files):
    directory = user_files["dir"]
    corpus = load_text_corpus(
        [directory / "doc1.txt", user_files["jsonl"]],
        validation_paths=[user_files["parquet"]],
        text_field="body",
    )
    jsonl_texts = [
        json.loads(line)["body"] for line in user_files["jsonl"].read_text(encoding="utf-8").splitlines()
    ]
    assert [d.text for d in corpus.train] == [
        (directory / "doc1.txt").read_text(encoding="utf-8"),
        *jsonl_texts,
    ]
    import pyarrow.parquet as pq

    assert [d.text for d in corpus.validation] == pq.read_table(user_files["parquet"])["body"].to_pylist()


def test_expand_paths_globs_and_dedup(user_files):
    directory = user_files["dir"]
    expanded = expand_paths(
        [str(directory / "doc*.txt"), directory / "doc2.txt", str(directory / "**" / "*.jsonl")]
    )
    assert expanded == [directory / f"doc{i}.txt" for i in range(6)] + [user_files["jsonl"]]


def test_missing_paths_and_empty_globs(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=rf"data file not found: '{missing.as_posix()}'"):
        load_corpus([missing])
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(FileNotFoundError, match=r"glob pattern '.*\*\.jsonl' matched no files"):
        load_corpus([pattern])
    with pytest.raises(ValueError, match=r"is a directory; pass files or a glob"):
        load_corpus([tmp_path])
    with pytest.raises(ValueError, match="no data paths given"):
        load_corpus([])


def test_empty_inputs_raise(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"text file '{empty.as_posix()}' is empty"):
        load_corpus([empty])
    no_text = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(
        ValueError, match=rf"JSONL file '{no_text.as_posix()}' has no records with text in field 'text'"
    ):
        load_corpus([no_text])
    nulls = write_parquet(tmp_path / "nulls.parquet", {"text": [None, ""]})
    with pytest.raises(ValueError, match=r"nulls\.parquet' has no rows with text in column 'text'"):
        load_corpus([nulls])
    single = tmp_path / "single.txt"
    single.write_text("one document", encoding="utf-8")
    with pytest.raises(ValueError, match=r"split of the data in .*single\.txt is empty \(1 documents"):
        load_corpus([single])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', "{not json"], r"bad\.jsonl line 2: not valid JSON"),
        (
            ['{"text": "ok"}', '{"body": "x", "id": 3}'],
            r"bad\.jsonl line 2: the record has no field 'text' \(fields: 'body', 'id'\)",
        ),
        (['{"text": 5}'], r"bad\.jsonl line 1: field 'text' is a int, expected a string"),
        (['["text"]'], r"bad\.jsonl line 1: expected a JSON object with a 'text' field, got list"),
    ],
)
def test_bad_jsonl_lines(tmp_path: Path, lines: list[str], message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_corpus([path])


def test_bad_parquet_columns(tmp_path: Path):
    path = write_parquet(tmp_path / "t.parquet", {"body": ["a", "b"], "n": [1, 2]})
    with pytest.raises(ValueError, match=r"t\.parquet' has no column 'text' \(columns: body, n\)"):
        load_corpus([path])
    with pytest.raises(ValueError, match=r"column 'n' has type int64, expected strings"):
        load_corpus([path], text_field="n")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"cannot read parquet file '.*broken\.parquet'"):
        load_corpus([broken])


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch):
    path = write_parquet(tmp_path / "t.parquet", {"text": ["a", "b"]})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"reading \.parquet files needs pyarrow.*moekit\[parquet\]"):
        load_corpus([path])


def test_overlapping_train_and_validation_files(user_files):
    directory = user_files["dir"]
    with pytest.raises(ValueError, match=r"files given both as training and validation data: .*doc0\.txt"):
        load_text_corpus(str(directory / "*.txt"), validation_paths=[directory / "doc0.txt"])
    with pytest.raises(ValueError, match="validation_paths needs training paths"):
        load_corpus(None, validation_paths=[directory / "doc0.txt"])


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.vocab_size == SMALL_CONFIG.vocab_size
    assert tokenizer.eos_id == tokenizer.backend.token_to_id(EOS_TOKEN) == 0
    assert tokenizer.pad_id == tokenizer.backend.token_to_id(PAD_TOKEN) == 1
    assert tokenizer.sentinel_ids == tuple(range(2, 2 + SMALL_CONFIG.num_sentinels))
    for index, token_id in enumerate(tokenizer.sentinel_ids):
        assert tokenizer.encode(sentinel_token(index)) == [token_id]
        assert tokenizer.decode([token_id]) == f"<extra_id_{index}>"
    assert tokenizer.encode(EOS_TOKEN) == [tokenizer.eos_id]


def test_tokenizer_round_trips_stdlib_text(tokenizer, stdlib_corpus):
    num_tokens = num_bytes = 0
    for document in stdlib_corpus.validation[:10]:
        ids = tokenizer.encode(document.text)
        assert tokenizer.decode(ids) == document.text
        num_tokens += len(ids)
        num_bytes += len(document.text.encode("utf-8"))
    # Even 144 merges must compress source code clearly below one token per byte.
    assert num_tokens < 0.75 * num_bytes
    assert all(0 <= i < tokenizer.vocab_size for i in tokenizer.encode(stdlib_corpus.validation[0].text))


@settings(max_examples=60, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_training_is_deterministic_and_limited(tokenizer, stdlib_corpus):
    again = train_tokenizer(stdlib_corpus.train_texts(), SMALL_CONFIG)
    assert again.fingerprint == tokenizer.fingerprint
    assert list(tokenizer_module.limited_texts(["abcd", "efgh", "ijkl"], 6)) == ["abcd", "ef"]
    assert list(tokenizer_module.limited_texts(["abcd"], 10)) == ["abcd"]


def test_tokenizer_config_validation(stdlib_corpus):
    with pytest.raises(
        ValueError, match=r"vocab_size 200 is too small: the 256 byte symbols and 34 special tokens"
    ):
        train_tokenizer(["x"], TokenizerConfig(vocab_size=200))
    with pytest.raises(ValueError, match="max_train_chars must be positive, got 0"):
        train_tokenizer(["x"], TokenizerConfig(vocab_size=400, num_sentinels=2, max_train_chars=0))


def test_tokenizer_save_and_load(tokenizer, tmp_path: Path):
    path = tmp_path / "sub" / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert (loaded.eos_id, loaded.pad_id, loaded.sentinel_ids) == (
        tokenizer.eos_id,
        tokenizer.pad_id,
        tokenizer.sentinel_ids,
    )
    text = "def f(x):\n    return x + 1  # ünïcode ✓\n"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert leftover_temp_files(tmp_path) == []
    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found: '.*missing\.json'"):
        Tokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot load tokenizer file '.*bad\.json'"):
        Tokenizer.from_file(bad)


def test_tokenizer_cache_hits_and_misses(user_files, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    corpus = load_corpus([user_files["jsonl"]], text_field="body", validation_fraction=0.3)
    config = TokenizerConfig(vocab_size=300, num_sentinels=4, max_train_chars=20_000)
    first = load_or_train_tokenizer(corpus, config, cache_dir=cache)
    cached = list(cache.glob("tokenizer-*/tokenizer.json"))
    assert len(cached) == 1
    assert Tokenizer.from_file(cached[0]).fingerprint == first.fingerprint

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", no_training)
    assert load_or_train_tokenizer(corpus, config, cache_dir=cache).fingerprint == first.fingerprint
    # An explicit tokenizer file is used as is.
    assert (
        load_or_train_tokenizer(corpus, cache_dir=cache, tokenizer_file=cached[0]).fingerprint
        == first.fingerprint
    )
    monkeypatch.undo()
    # A different setting or a modified source file is a different key, hence a new tokenizer.
    load_or_train_tokenizer(
        corpus, TokenizerConfig(vocab_size=310, num_sentinels=4, max_train_chars=20_000), cache_dir=cache
    )
    stat = user_files["jsonl"].stat()
    os.utime(user_files["jsonl"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = load_corpus([user_files["jsonl"]], text_field="body", validation_fraction=0.3)
    assert touched.fingerprint != corpus.fingerprint
    load_or_train_tokenizer(touched, config, cache_dir=cache)
    assert len(list(cache.glob("tokenizer-*/tokenizer.json"))) == 3
    assert leftover_temp_files(cache) == []


def test_foreign_tokenizer_without_pad_uses_eos(tmp_path: Path):
    config = TokenizerConfig(vocab_size=300, num_sentinels=0, max_train_chars=10_000)
    backend = train_tokenizer(["hello world " * 100], config).backend
    data = json.loads(backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != PAD_TOKEN]
    del data["model"]["vocab"][PAD_TOKEN]
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    foreign = Tokenizer.from_file(path)
    assert foreign.pad_id == foreign.eos_id
    assert foreign.sentinel_ids == ()
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != EOS_TOKEN]
    del data["model"]["vocab"][EOS_TOKEN]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"the tokenizer has no '<\|endoftext\|>' token"):
        Tokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------------
# Token streams
# ---------------------------------------------------------------------------------------------------


def test_encode_documents_matches_per_document_encoding(tokenizer, stdlib_corpus):
    texts = [d.text for d in stdlib_corpus.validation[:5]]
    stream = encode_documents(tokenizer, texts, batch_docs=2)
    expected: list[int] = []
    for text in texts:
        expected += tokenizer.encode(text) + [tokenizer.eos_id]
    assert stream.dtype == np.uint16
    assert stream.tolist() == expected


def test_token_cache_round_trip(user_files, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    prepared = prepare_data(
        [user_files["jsonl"], user_files["parquet"]],
        text_field="body",
        validation_fraction=0.2,
        tokenizer_config=TokenizerConfig(vocab_size=320, num_sentinels=4, max_train_chars=50_000),
        cache_dir=cache,
    )
    tok, corpus = prepared.tokenizer, prepared.corpus
    expected_train = encode_documents(tok, [d.text for d in corpus.train])
    assert np.array_equal(prepared.tokens.train, expected_train)
    assert np.array_equal(
        prepared.tokens.validation, encode_documents(tok, [d.text for d in corpus.validation])
    )
    files = sorted(cache.glob("tokens-*/*.npy"))
    assert [f.name for f in files] == ["train.npy", "validation.npy"]
    assert np.array_equal(np.load(files[0], allow_pickle=False), expected_train)
    assert leftover_temp_files(cache) == []

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cached token arrays should have been used")

    monkeypatch.setattr("moekit.data.loader.encode_documents", no_encoding)
    again = load_or_encode_tokens(corpus, tok, cache_dir=cache)
    assert np.array_equal(again.train, expected_train)


# ---------------------------------------------------------------------------------------------------
# Decoder LM sampler
# ---------------------------------------------------------------------------------------------------


def window_starts(inputs: torch.Tensor) -> list[int]:
    """With the stream arange(N), every window's first token is its start offset."""
    return inputs[:, 0].tolist()


@pytest.mark.parametrize("shuffle", [True, False])
def test_lm_batches_are_shifted_stream_windows(shuffle: bool):
    stream = np.arange(1000, dtype=np.uint32)
    sampler = LMBatchSampler(stream, batch_size=4, seq_len=16, seed=3, shuffle=shuffle)
    for _ in range(20):
        inputs, targets = next(sampler)
        assert inputs.shape == targets.shape == (4, 16)
        assert inputs.dtype == targets.dtype == torch.int64
        for row_in, row_target in zip(inputs.tolist(), targets.tolist()):
            assert row_in == list(range(row_in[0], row_in[0] + 16))
            assert row_target == list(range(row_in[0] + 1, row_in[0] + 17))


def test_lm_epoch_visits_every_window_once():
    stream = np.arange(1001)  # 1000 // 10 = 100 windows at offset 0
    sequential = LMBatchSampler(stream, batch_size=10, seq_len=10, shuffle=False)
    starts = [s for _ in range(10) for s in window_starts(sequential.next_batch()[0])]
    assert starts == list(range(0, 1000, 10))
    assert window_starts(sequential.next_batch()[0]) == list(range(0, 100, 10))  # wraps to epoch 1
    assert sequential.epoch == 1
    shuffled = LMBatchSampler(stream, batch_size=1, seq_len=10, seed=0)
    first_epoch = []
    while True:
        start = window_starts(shuffled.next_batch()[0])[0]
        if shuffled.epoch == 1:
            break
        first_epoch.append(start)
    # One epoch = every window of stride 10 at one offset below 10 that fits in the 1001 tokens, each once.
    offset = first_epoch[0] % 10
    assert sorted(first_epoch) == [s for s in range(offset, 1001 - 11 + 1, 10)]
    assert first_epoch != sorted(first_epoch)
    second_epoch = [start]
    while shuffled.epoch == 1:
        second_epoch += window_starts(shuffled.next_batch()[0])
    # Each epoch draws a fresh order (and offset) rather than replaying the first one.
    assert second_epoch[: len(first_epoch)] != first_epoch


@pytest.mark.parametrize("shuffle", [True, False])
def test_lm_sampler_resume_is_exact(shuffle: bool):
    stream = np.arange(700) % 251
    straight = LMBatchSampler(stream, batch_size=8, seq_len=32, seed=11, shuffle=shuffle)
    batches = [straight.next_batch() for _ in range(10)]  # 80 windows: crosses epoch boundaries (~21/epoch)
    first = LMBatchSampler(stream, batch_size=8, seq_len=32, seed=11, shuffle=shuffle)
    for _ in range(5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = LMBatchSampler(stream, batch_size=8, seq_len=32, seed=11, shuffle=shuffle)
    resumed.load_state_dict(state)
    for expected, actual in zip(batches[5:], [resumed.next_batch() for _ in range(5)]):
        assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    assert state["epoch"] >= 1


def test_lm_sampler_seeds_and_state_checks():
    stream = np.arange(5000)
    a = LMBatchSampler(stream, batch_size=4, seq_len=8, seed=1).next_batch()[0]
    b = LMBatchSampler(stream, batch_size=4, seq_len=8, seed=2).next_batch()[0]
    assert not torch.equal(a, b)
    state = LMBatchSampler(stream, batch_size=4, seq_len=8, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"window_len is 9 in the state but 17 here"):
        LMBatchSampler(stream, batch_size=4, seq_len=16, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_tokens is 5000 in the state but 4000 here"):
        LMBatchSampler(stream[:4000], batch_size=4, seq_len=8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="unsupported sampler state version"):
        LMBatchSampler(stream, batch_size=4, seq_len=8).load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        LMBatchSampler(stream, batch_size=4, seq_len=8, seed=-1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        LMBatchSampler(stream, batch_size=0, seq_len=8)


def test_too_small_corpus_raises_with_sizes():
    with pytest.raises(ValueError, match=r"training token stream has 16 tokens but one window needs 17"):
        LMBatchSampler(np.arange(16), batch_size=2, seq_len=16)
    LMBatchSampler(np.arange(17), batch_size=2, seq_len=16).next_batch()  # exactly one window is enough
    with pytest.raises(ValueError, match=r"validation token stream has 5 tokens but one window needs 9"):
        ValidationWindows(np.arange(5), batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match=r"training token stream has 10 tokens but one window needs 64"):
        SpanCorruptionSampler(np.arange(10), 2, 64, sentinel_ids=range(2, 34), eos_id=0, pad_id=1)


def test_validation_windows_are_fixed():
    stream = np.arange(1000)
    windows = ValidationWindows(stream, batch_size=8, seq_len=30)
    first = [tuple(map(torch.clone, b)) for b in windows]
    second = list(windows)
    assert len(first) == len(windows) == 5  # 999 // 30 = 33 windows -> 5 batches, the last of 1
    starts = [s for inputs, _ in first for s in window_starts(inputs)]
    assert starts == list(range(0, 33 * 30, 30))
    for (a_in, a_t), (b_in, b_t) in zip(first, second):
        assert torch.equal(a_in, b_in) and torch.equal(a_t, b_t)
        assert torch.equal(a_in[:, 1:], a_t[:, :-1])
    capped = ValidationWindows(stream, batch_size=8, seq_len=30, max_windows=4)
    assert [s for inputs, _ in capped for s in window_starts(inputs)] == [
        round(i * 32 / 3) * 30 for i in range(4)
    ]


# ---------------------------------------------------------------------------------------------------
# Span corruption
# ---------------------------------------------------------------------------------------------------

SENTINELS = list(range(2, 34))
EOS, PAD = 0, 1


def uncorrupt(enc_input: list[int], dec_target: list[int]) -> list[int]:
    """Naive reference: rebuild the window by replacing each sentinel with the tokens that follow it in the
    target."""
    spans: dict[int, list[int]] = {}
    current = None
    for token in dec_target:
        if token in (IGNORE_INDEX, EOS):
            break
        if token in SENTINELS:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    original: list[int] = []
    for token in enc_input:
        if token == EOS:
            break
        original.extend(spans[token] if token in SENTINELS else [token])
    return original


@settings(max_examples=80, deadline=None)
@given(length=st.integers(2, 200), seed=st.integers(0, 2**32 - 1))
def test_span_corruption_reconstructs_the_window(length: int, seed: int):
    window = np.random.default_rng(seed).integers(100, 5000, size=length)
    example = span_corrupt(
        window, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD, rng=np.random.default_rng(seed)
    )
    assert uncorrupt(example.enc_input.tolist(), example.dec_target.tolist()) == window.tolist()
    enc_len, dec_len = span_corruption_lengths(length)
    assert example.enc_input.shape == (enc_len,)
    assert example.dec_input.shape == example.dec_target.shape == (dec_len,)


def test_span_corruption_statistics_and_layout():
    length = 512
    window = np.arange(100, 100 + length)
    example = span_corrupt(
        window, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD, rng=np.random.default_rng(0)
    )
    target = example.dec_target.tolist()
    noise = [t for t in target if t >= 100]
    spans = [t for t in target if t in SENTINELS]
    assert len(noise) == round(0.15 * length)  # 77 noise tokens
    assert len(spans) == round(77 / 3)  # mean span length 3
    assert spans == SENTINELS[: len(spans)]  # sentinels used in order
    assert target[-1] == EOS and example.enc_input[-1] == EOS
    assert example.enc_input.tolist().count(EOS) == 1
    assert example.dec_input[0] == PAD and example.dec_input[1:].tolist() == target[:-1]
    # The encoder keeps every non-noise token, in order.
    assert [t for t in example.enc_input.tolist() if t >= 100] == sorted(set(window.tolist()) - set(noise))


def test_span_corruption_padding_and_determinism():
    window = np.arange(100, 164)
    enc_len, dec_len = span_corruption_lengths(64)
    example = span_corrupt(
        window,
        sentinel_ids=SENTINELS,
        eos_id=EOS,
        pad_id=PAD,
        rng=np.random.default_rng(5),
        enc_len=enc_len + 3,
        dec_len=dec_len + 2,
    )
    assert example.enc_input[-3:].tolist() == [PAD] * 3
    assert example.dec_target[-2:].tolist() == [IGNORE_INDEX] * 2
    assert example.dec_input[-2:].tolist() == [PAD] * 2
    again = span_corrupt(
        window,
        sentinel_ids=SENTINELS,
        eos_id=EOS,
        pad_id=PAD,
        rng=np.random.default_rng(5),
        enc_len=enc_len + 3,
        dec_len=dec_len + 2,
    )
    assert all(np.array_equal(a, b) for a, b in zip(example, again))
    with pytest.raises(ValueError, match=r"the encoder input has \d+ tokens, more than its fixed length 10"):
        span_corrupt(
            window, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD, rng=np.random.default_rng(0), enc_len=10
        )
    with pytest.raises(ValueError, match=r"a window of 64 tokens gets 3 noise spans but only 2 sentinel ids"):
        span_corrupt(window, sentinel_ids=[2, 3], eos_id=EOS, pad_id=PAD, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="noise_density must be strictly between 0 and 1"):
        span_corrupt(
            window,
            sentinel_ids=SENTINELS,
            eos_id=EOS,
            pad_id=PAD,
            rng=np.random.default_rng(0),
            noise_density=1.0,
        )


def test_span_corruption_sampler_resume_and_shapes():
    stream = np.arange(100, 3100)

    def make():
        return SpanCorruptionSampler(stream, 4, 128, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD, seed=7)

    straight = make()
    batches = [straight.next_batch() for _ in range(12)]  # 48 windows over 23-window epochs
    enc_len, dec_len = span_corruption_lengths(128)
    enc, dec_in, dec_target = batches[0]
    assert enc.shape == (4, enc_len) and dec_in.shape == dec_target.shape == (4, dec_len)
    assert enc.dtype == dec_in.dtype == dec_target.dtype == torch.int64
    for row_enc, row_target in zip(enc.tolist(), dec_target.tolist()):
        # The stream is arange(100, 3100), so an un-corrupted window must be a run of 128 consecutive ids.
        original = uncorrupt(row_enc, row_target)
        assert original == list(range(original[0], original[0] + 128))
        assert 100 <= original[0] <= 3100 - 128
    half = make()
    for _ in range(6):
        half.next_batch()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(half.state_dict())))
    for expected, actual in zip(batches[6:], [resumed.next_batch() for _ in range(6)]):
        assert all(torch.equal(a, b) for a, b in zip(expected, actual))
    with pytest.raises(ValueError, match=r"window_len 512 gives 26 noise spans but only 8 sentinel ids"):
        SpanCorruptionSampler(stream, 2, 512, sentinel_ids=SENTINELS[:8], eos_id=EOS, pad_id=PAD)
