"""`moekit serve`: the OpenAI-compatible HTTP server, called over real loopback HTTP.

A tiny MoE model and a byte-level BPE tokenizer are built and saved as a moekit checkpoint; the
server runs in a thread (and once as the real CLI in a subprocess) on 127.0.0.1 with a free port.
The reference for every completion is `model.generate` on a separately loaded copy of the model.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from moekit.bench import benchmarks_dir  # noqa: E402
from moekit.cli import main as cli_main  # noqa: E402
from moekit.data import Tokenizer  # noqa: E402
from moekit.serve import loading  # noqa: E402
from moekit.serve.app import create_app  # noqa: E402
from moekit.serve.commands import bind_socket, make_server  # noqa: E402
from moekit.serve.engine import Engine, SamplingParams, held_back  # noqa: E402
from moekit.train import checkpoint as ckpt  # noqa: E402

MAX_PROMPT_TOKENS = 40
TEXT = (
    "def parse(line):\n    return line.split(',')\n\n"
    "The quick brown fox jumps over the lazy dog. Grüße aus Köln — naïve café, 日本語のテキスト 🎉.\n"
    "class Reader:\n    def read(self, path):\n        with open(path) as f:\n            return f.read()\n"
)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A moekit checkpoint folder: a tiny random MoE decoder and a tokenizer trained on ~3 KB."""
    sys.path.insert(0, str(benchmarks_dir()))
    from serve_bench import tiny_checkpoint

    return tiny_checkpoint(
        tmp_path_factory.mktemp("serve") / "tiny", [TEXT] * 10, max_seq_len=64, version="test"
    )


@pytest.fixture(scope="module")
def reference(checkpoint):
    """An independent copy of the model and tokenizer, for the expected completions."""
    model, _ = ckpt.load_model(checkpoint)
    return model, Tokenizer.from_file(checkpoint / ckpt.TOKENIZER_FILE)


def start_server(app) -> tuple[str, object, threading.Thread]:
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(app, sock, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):  # bounded: 10 s
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "the server did not start"
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


@pytest.fixture(scope="module")
def server(checkpoint):
    loaded = loading.load_for_serving(checkpoint)
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        loaded.name,
        eos_ids=loaded.eos_ids,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )
    url, srv, thread = start_server(create_app(engine))
    yield SimpleNamespace(url=url, server=srv, thread=thread, name=loaded.name)
    srv.should_exit = True
    thread.join(timeout=15)


# ---------------------------------------------------------------------- HTTP helpers
def http(url: str, body: object = None, *, raw: bytes | None = None, method: str | None = None, timeout=30):
    """(status, parsed JSON or text) of one request; error statuses are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, payload, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
    return status, (json.loads(payload) if "json" in ctype else payload.decode())


def sse_chunks(text: str) -> list:
    """The `data:` payloads of a server-sent-event stream, JSON-decoded except the final [DONE]."""
    datas = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert datas and datas[-1] == "[DONE]", text[-200:]
    return [json.loads(d) for d in datas[:-1]]


def expected_completion(reference, prompt: str, max_tokens: int, **sampling) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) from model.generate, cut at the first eos."""
    model, tok = reference
    ids = tok.encode(prompt)
    n = min(max_tokens, model.config.max_seq_len - len(ids))
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_id=tok.eos_id, **sampling)
    new = out[0, len(ids) :].tolist()
    if tok.eos_id in new:
        return tok.decode(new[: new.index(tok.eos_id)]), "stop", new.index(tok.eos_id) + 1
    return tok.decode(new), "length", len(new)


# ---------------------------------------------------------------------- completions
@pytest.mark.parametrize("prompt", ["def parse(", "The quick", "Grüße aus"])
def test_greedy_completion_equals_generate(server, reference, prompt):
    status, body = http(
        f"{server.url}/v1/completions",
        {"model": server.name, "prompt": prompt, "max_tokens": 20, "temperature": 0},
    )
    assert status == 200, body
    text, finish, n = expected_completion(reference, prompt, 20, temperature=0.0)
    assert body["object"] == "text_completion" and body["model"] == server.name
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice == {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    n_prompt = len(reference[1].encode(prompt))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


def test_seeded_sampling_equals_generate(server, reference):
    params = {"temperature": 0.9, "top_k": 30, "top_p": 0.9}
    body = {"prompt": ["class Reader"], "max_tokens": 24, "seed": 7, **params}
    first = http(f"{server.url}/v1/completions", body)[1]["choices"][0]
    again = http(f"{server.url}/v1/completions", body)[1]["choices"][0]
    gen = torch.Generator().manual_seed(7)
    text, finish, _ = expected_completion(reference, "class Reader", 24, generator=gen, **params)
    assert first == again
    assert (first["text"], first["finish_reason"]) == (text, finish)


def test_streaming_concatenates_to_the_completion(server, reference):
    body = {"prompt": "def parse(", "max_tokens": 30, "temperature": 0}
    whole = http(f"{server.url}/v1/completions", body)[1]["choices"][0]
    status, text = http(f"{server.url}/v1/completions", {**body, "stream": True})
    assert status == 200
    chunks = sse_chunks(text)
    assert len(chunks) > 1  # tokens arrive as they are decoded, not all at once
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_streaming_usage_chunk(server):
    body = {"prompt": "The quick", "max_tokens": 5, "temperature": 0, "stream": True}
    chunks = sse_chunks(
        http(f"{server.url}/v1/completions", {**body, "stream_options": {"include_usage": True}})[1]
    )
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stop_strings_cut_the_text(server):
    base = {"prompt": "def parse(", "max_tokens": 30, "temperature": 0}
    full = http(f"{server.url}/v1/completions", base)[1]["choices"][0]["text"]
    assert len(full) > 6, full
    stop = full[3:6]  # occurs in the text, so the completion must end right before its first occurrence
    cut = full[: full.find(stop)]
    result = http(f"{server.url}/v1/completions", {**base, "stop": [stop, "\x00never"]})[1]["choices"][0]
    assert (result["text"], result["finish_reason"]) == (cut, "stop")
    chunks = sse_chunks(http(f"{server.url}/v1/completions", {**base, "stop": stop, "stream": True})[1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut


def test_max_tokens_zero_and_context_bound(server, reference):
    zero = http(f"{server.url}/v1/completions", {"prompt": "The", "max_tokens": 0})[1]["choices"][0]
    assert (zero["text"], zero["finish_reason"]) == ("", "length")
    # max_tokens beyond the context is bounded by max_seq_len, not an error
    status, body = http(
        f"{server.url}/v1/completions", {"prompt": "The", "max_tokens": 10_000, "temperature": 0}
    )
    assert status == 200
    assert body["usage"]["total_tokens"] <= reference[0].config.max_seq_len


def test_concurrent_requests_are_served_one_at_a_time_correctly(server, reference):
    prompts = ["def parse(", "The quick", "class Reader", "Grüße aus"]
    results: dict[str, str] = {}

    def ask(p: str) -> None:
        body = {"prompt": p, "max_tokens": 16, "temperature": 0, "stream": p.startswith("c")}
        status, payload = http(f"{server.url}/v1/completions", body)
        if isinstance(payload, str):
            results[p] = "".join(c["choices"][0]["text"] for c in sse_chunks(payload))
        else:
            results[p] = payload["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {p: expected_completion(reference, p, 16, temperature=0.0)[0] for p in prompts}


def test_client_disconnect_mid_stream_leaves_server_serving(server):
    req = urllib.request.Request(
        f"{server.url}/v1/completions",
        data=json.dumps({"prompt": "The", "max_tokens": 60, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.readline().startswith(b"data: ")
    assert http(f"{server.url}/health")[0] == 200
    assert http(f"{server.url}/v1/completions", {"prompt": "The", "max_tokens": 3})[0] == 200


# ---------------------------------------------------------------------- other routes
def test_health_and_models(server, reference):
    assert http(f"{server.url}/health") == (200, {"status": "ok", "model": server.name})
    status, models = http(f"{server.url}/v1/models")
    assert status == 200 and models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == server.name and card["object"] == "model" and card["owned_by"] == "moekit"
    assert card["max_model_len"] == reference[0].config.max_seq_len
    assert http(f"{server.url}/v1/models/{server.name}") == (200, card)
    assert http(f"{server.url}/v1/models/other")[0] == 404


LONG_PROMPT = "The quick brown fox " * 40

BAD_REQUESTS = [
    ("invalid JSON", None, b'{"prompt": "x",', None),
    ("not an object", ["The"], None, None),
    ("missing prompt", {"max_tokens": 4}, None, "prompt"),
    ("null prompt", {"prompt": None}, None, "prompt"),
    ("prompt of wrong type", {"prompt": 12}, None, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, None, "prompt"),
    ("empty prompt list", {"prompt": []}, None, "prompt"),
    ("token id out of range", {"prompt": [1, 10**6]}, None, "prompt"),
    ("oversized prompt", {"prompt": LONG_PROMPT}, None, "prompt"),
    ("negative max_tokens", {"prompt": "a", "max_tokens": -1}, None, "max_tokens"),
    ("float max_tokens", {"prompt": "a", "max_tokens": 2.5}, None, "max_tokens"),
    ("string max_tokens", {"prompt": "a", "max_tokens": "5"}, None, "max_tokens"),
    ("bool max_tokens", {"prompt": "a", "max_tokens": True}, None, "max_tokens"),
    ("negative temperature", {"prompt": "a", "temperature": -0.5}, None, "temperature"),
    ("string temperature", {"prompt": "a", "temperature": "hot"}, None, "temperature"),
    ("top_p zero", {"prompt": "a", "top_p": 0}, None, "top_p"),
    ("top_p above one", {"prompt": "a", "top_p": 1.5}, None, "top_p"),
    ("negative top_k", {"prompt": "a", "top_k": -3}, None, "top_k"),
    ("n > 1", {"prompt": "a", "n": 2}, None, "n"),
    ("n zero", {"prompt": "a", "n": 0}, None, "n"),
    ("too many stops", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, None, "stop"),
    ("empty stop", {"prompt": "a", "stop": ""}, None, "stop"),
    ("string stream", {"prompt": "a", "stream": "yes"}, None, "stream"),
    ("string seed", {"prompt": "a", "seed": "x"}, None, "seed"),
    ("huge seed", {"prompt": "a", "seed": 2**70}, None, "seed"),
    ("unsupported echo", {"prompt": "a", "echo": True}, None, "echo"),
    ("unsupported logprobs", {"prompt": "a", "logprobs": 2}, None, "logprobs"),
    ("unknown model", {"prompt": "a", "model": "gpt-nope"}, None, "model"),
]


@pytest.mark.parametrize(("why", "body", "raw", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, why, body, raw, param):
    status, err = http(f"{server.url}/v1/completions", body, raw=raw)
    assert 400 <= status < 500, (why, status, err)
    assert isinstance(err, dict) and set(err["error"]) == {"message", "type", "param", "code"}, err
    assert err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param
    if why == "oversized prompt":
        assert err["error"]["code"] == "context_length_exceeded"
    if why == "unknown model":
        assert status == 404
    status, ok = http(f"{server.url}/v1/completions", {"prompt": "The", "max_tokens": 2})
    assert status == 200 and ok["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_route_and_wrong_method_get_openai_errors(server):
    status, err = http(f"{server.url}/v1/nothing-here")
    assert status == 404 and set(err["error"]) == {"message", "type", "param", "code"}
    status, err = http(f"{server.url}/v1/completions", method="GET")
    assert status == 405 and err["error"]["type"] == "invalid_request_error"


def test_server_shuts_down_cleanly(checkpoint):
    loaded = loading.load_for_serving(checkpoint)
    url, srv, thread = start_server(
        create_app(Engine(loaded.model, loaded.tokenizer, "x", eos_ids=loaded.eos_ids))
    )
    assert http(f"{url}/health")[0] == 200
    srv.should_exit = True
    thread.join(timeout=15)
    assert not thread.is_alive()
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(f"{url}/health", timeout=5)


# ---------------------------------------------------------------------- the CLI, in a subprocess
def test_cli_serves_and_stops_on_sigterm(checkpoint):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "moekit", "serve", "--ckpt", str(checkpoint), "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--device", "cpu", "--log-level", "warning", "--model-name", "tiny-cli"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready = selectors.DefaultSelector()
        ready.register(proc.stdout, selectors.EVENT_READ)
        assert ready.select(timeout=60), "no startup line within 60 s"
        line = proc.stdout.readline()  # the startup line, printed once the port is bound
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[-1].strip().removesuffix("/v1/completions")
        for _ in range(200):  # bounded: 10 s for uvicorn to start answering
            try:
                status, health = http(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.05)
        assert (status, health) == (200, {"status": "ok", "model": "tiny-cli"})
        status, body = http(f"{url}/v1/completions", {"model": "tiny-cli", "prompt": "def ", "max_tokens": 4})
        assert status == 200 and body["model"] == "tiny-cli"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_cli_without_the_serve_extra_says_how_to_install(monkeypatch, capsys, checkpoint):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    assert cli_main(["serve", "--ckpt", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "fastapi" in err and "pip install 'moekit[serve]'" in err


# ---------------------------------------------------------------------- checkpoint formats
def test_unknown_folders_get_clear_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        loading.load_for_serving(tmp_path / "missing")
    with pytest.raises(loading.UnsupportedCheckpointError, match="moekit checkpoints"):
        loading.load_for_serving(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(loading.UnsupportedCheckpointError, match="no known format"):
        loading.load_for_serving(tmp_path)


def test_quantized_and_hf_folders_without_their_loaders(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "QUANT_LOADERS", (("moekit_test_absent_quant", "load_quantized"),))
    monkeypatch.setattr(loading, "HF_LOADERS", (("moekit_test_absent_hf", "from_pretrained"),))
    (tmp_path / "config.json").write_text(json.dumps({"arch": "decoder", "model": {}, "quantization": {}}))
    with pytest.raises(loading.UnsupportedCheckpointError, match="quantized.*moekit_test_absent_quant"):
        loading.load_for_serving(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(
        loading.UnsupportedCheckpointError, match="Hugging Face folder.*this install serves: moekit"
    ):
        loading.load_for_serving(tmp_path)


def test_quantized_checkpoint_that_load_model_reads(tmp_path, monkeypatch, checkpoint):
    """A real `moekit quantize` output serves, with the same greedy text as load_model's model."""
    from moekit.compress.quantize import QuantSpec, quantize_model, save_quantized

    monkeypatch.setattr(loading, "QUANT_LOADERS", (("moekit_test_absent_quant", "load_quantized"),))
    model, config = ckpt.load_model(checkpoint)
    qmodel, _ = quantize_model(model, QuantSpec("int8"), None)
    folder = Path(save_quantized(qmodel, config, tmp_path / "q", QuantSpec("int8")))
    loaded = loading.load_for_serving(folder)
    assert loaded.format == "quantized" and hasattr(loaded.model, "new_cache")
    reference, _ = ckpt.load_model(folder)
    prompt = torch.tensor([loaded.tokenizer.encode("def parse(")])
    want = reference.generate(prompt, max_new_tokens=8, temperature=0.0)
    got = loaded.model.generate(prompt, max_new_tokens=8, temperature=0.0)
    assert torch.equal(got, want)


def test_real_hf_folder_serves_like_the_original(tmp_path, checkpoint, reference):
    hf = pytest.importorskip("moekit.hf")
    folder = hf.save_pretrained(reference[0], tmp_path / "mixtral-tiny", model_type="mixtral")
    shutil.copy(checkpoint / ckpt.TOKENIZER_FILE, Path(folder) / ckpt.TOKENIZER_FILE)
    loaded = loading.load_for_serving(folder)
    assert loaded.format == "huggingface" and loaded.name == "mixtral-tiny"
    engine = Engine(loaded.model, loaded.tokenizer, loaded.name, eos_ids=loaded.eos_ids)
    done = engine.complete(engine.encode_prompt("def parse("), SamplingParams(max_tokens=12, temperature=0))
    assert done.text == expected_completion(reference, "def parse(", 12, temperature=0.0)[0]


def test_hf_folder_goes_through_its_loader_and_hf_tokenizer(tmp_path, monkeypatch, checkpoint, reference):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    words = ["<s>", "</s>", "hello", "world", "again"]
    hf_tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="</s>"))
    hf_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok.add_special_tokens(["<s>", "</s>"])
    hf_tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "eos_token_id": 1}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    calls = []

    def from_pretrained(path, device="cpu"):  # moekit.from_pretrained's signature, in short
        calls.append((path, str(device)))
        return ckpt.load_model(checkpoint, device)  # (model, config): the loader's tuple is unpacked

    monkeypatch.setitem(sys.modules, "moekit_test_hf", types.SimpleNamespace(from_pretrained=from_pretrained))
    monkeypatch.setattr(loading, "HF_LOADERS", (("moekit_test_hf", "from_pretrained"),))
    loaded = loading.load_for_serving(tmp_path, name="hf-tiny")
    assert calls == [(str(tmp_path), "cpu")] and loaded.format == "huggingface" and loaded.name == "hf-tiny"
    assert loaded.eos_ids == (1, 2)  # generation_config.json wins over config.json
    assert loaded.tokenizer.encode("hello world") == [2, 3]
    assert loaded.tokenizer.decode([0, 2, 3, 1]) == "hello world"  # special tokens dropped


# ---------------------------------------------------------------------- the engine, scripted
class ScriptedModel(nn.Module):
    """Predicts a fixed script of tokens whatever the input: one-hot logits, one script token per
    forward (the prefill predicts script[0]). Has the KV-cache interface the engine uses."""

    def __init__(self, script: list[int], vocab_size: int, max_seq_len: int = 64) -> None:
        super().__init__()
        self.script = script
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def new_cache(self, batch_size: int, max_seq_len: int | None = None):
        return SimpleNamespace(steps=0)

    def forward(self, input_ids: torch.Tensor, cache) -> SimpleNamespace:
        logits_BSV = torch.zeros(*input_ids.shape, self.config.vocab_size)
        logits_BSV[:, -1, self.script[cache.steps]] = 10.0
        cache.steps += 1
        return SimpleNamespace(logits=logits_BSV)


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (GPT-2's byte -> symbol map), so characters split across tokens."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in symbols)
    symbols.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return [tok.backend.token_to_id(symbols[b]) for b in text.encode("utf-8")]


def scripted_engine(reference, text: str, tail: list[int] = ()) -> tuple[Engine, list[int]]:
    tok = reference[1]
    script = byte_ids(tok, text) + list(tail)
    return Engine(ScriptedModel(script, tok.vocab_size), tok, "scripted"), script


def test_stream_never_splits_a_multibyte_character(reference):
    text = "Grüße 日本語 🎉 ok"
    engine, script = scripted_engine(reference, text)
    prompt = engine.encode_prompt("Hi ")
    pieces = list(engine.stream(prompt, SamplingParams(max_tokens=len(script), temperature=0)))
    assert "".join(p.text for p in pieces) == text
    assert all("\ufffd" not in p.text for p in pieces) and len(pieces) > 5
    assert pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == len(script)


def test_stream_stops_at_eos_and_holds_back_partial_stop_strings(reference):
    tok = reference[1]
    engine, script = scripted_engine(reference, "abc STOP here", [tok.eos_id, 5, 6])
    prompt = engine.encode_prompt("x")
    params = SamplingParams(max_tokens=50, temperature=0)
    done = engine.complete(prompt, params)
    assert (done.text, done.finish_reason, done.completion_tokens) == ("abc STOP here", "stop", 14)
    pieces = list(engine.stream(prompt, SamplingParams(max_tokens=50, temperature=0, stop=("STOP",))))
    assert "".join(p.text for p in pieces) == "abc " and pieces[-1].finish_reason == "stop"
    assert all("S" not in p.text for p in pieces)  # "S", "ST", "STO" were held back, never sent


def test_empty_prompt_starts_from_end_of_text(reference):
    engine, _ = scripted_engine(reference, "hi")
    assert engine.encode_prompt("") == [reference[1].eos_id]


def test_held_back():
    assert held_back("abc ST", ("STOP",)) == 2
    assert held_back("abc", ("STOP", "c")) == 0  # a whole stop string is a match, not held back
    assert held_back("xx\n", ("\n\n", "x\ny")) == 2  # the longer of "\n" and "x\n"
