"""Measure `moekit serve`: request latency, streaming time to first token, and what HTTP costs
against the same greedy generation in-process (docs/techniques.md, "Serving").

    python benchmarks/serve_bench.py --ckpt runs/default/checkpoint --threads 1
    python benchmarks/serve_bench.py --ckpt DIR --variants float32 --max-tokens 32 --rounds 5
    python benchmarks/serve_bench.py --smoke --work DIR      # a tiny random model, seconds (the tests run it)

Variants: `float32` serves the checkpoint as it is; `int8` serves a copy whose experts
moekit.compress quantized to int8 (what `moekit quantize --method int8` writes), made in a temporary
folder under --work and deleted afterwards. The input checkpoint is only read.

For each variant the script starts `moekit serve --ckpt FOLDER --port 0` as a subprocess (with
OMP_NUM_THREADS = --threads), waits for /health, sends warm-up requests, then runs --rounds
rounds. Each round does, one after the other (so load from other jobs hits all four alike):
  http      POST /v1/completions, greedy (temperature 0), max_tokens N, not streamed: the latency;
  stream    the same request with "stream": true: time to the first event, and to the last;
  engine    the same completion in this process through moekit.serve.Engine (what the server runs,
            without HTTP, JSON and the worker thread), on a model loaded by the same loader;
  generate  model.generate(prompt, N, temperature=0, eos_id=...) in this process: the decoding loop.
Requests go through the standard library's http.client, one connection per request, as a simple
client would. Reported: medians over the rounds, tokens/s = completion tokens / median time, the
HTTP overhead as the ratio of the http to the engine median, and the server's resident memory
(VmRSS and its peak VmHWM from /proc/PID/status) after the rounds.

Every completion is checked, so a wrong server cannot post a good number: the non-streamed text,
the concatenated stream and the engine's text must be equal, and equal to the decoded
model.generate ids (greedy decoding is deterministic), with the same token count.

Output: WORK/serve_bench.json (settings, raw times, medians) and Markdown rows in the
techniques table format (technique, setting, size, speed, validation loss, command).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.serve.engine import Engine, SamplingParams
from moekit.serve.loading import load_for_serving
from moekit.train.checkpoint import MODEL_FILE, load_model

DEFAULT_PROMPT = 'def parse_header(line):\n    """Split a header line into its name and value."""\n'
VARIANTS = ("float32", "int8")
STARTUP_TIMEOUT_S = 300.0  # importing torch on a loaded machine at nice 19 can take a while


@dataclass(frozen=True)
class Settings:
    prompt: str
    max_tokens: int  # new tokens per request (fewer when the model ends the text with eos)
    rounds: int
    warmup: int
    threads: int


# ---------------------------------------------------------------------- the server process
class ServerProcess:
    """`moekit serve` in a subprocess on a free loopback port; a context manager that stops it.

    The startup line (printed once the port is bound) goes to a log file that is polled for the
    address, so no pipe can fill up and block the server."""

    def __init__(self, folder: Path, threads: int, log_dir: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        env["PYTHONUNBUFFERED"] = "1"
        fd, log_name = tempfile.mkstemp(prefix="serve-", suffix=".log", dir=log_dir)
        os.close(fd)
        self.log = Path(log_name)
        cmd = [sys.executable, "-m", "moekit", "serve", "--ckpt", str(folder), "--port", "0"]
        cmd += ["--host", "127.0.0.1", "--device", "cpu", "--log-level", "warning"]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.returncode: int | None = None
        try:
            self.address = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> tuple[str, int]:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        address = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moekit serve exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            if address is None:
                for line in self.log.read_text().splitlines():
                    if " at http://" in line:  # "... at http://127.0.0.1:PORT/v1/completions"
                        host_port = line.rsplit(" at http://", 1)[1].split("/", 1)[0]
                        host, port = host_port.rsplit(":", 1)
                        address = (host, int(port))
            if address is not None:
                try:
                    status, body = request_json(address, "GET", "/health", None, timeout=5)
                    if status == 200 and body.get("status") == "ok":
                        return address
                except OSError:
                    pass  # uvicorn is not answering yet
            time.sleep(0.1)
        raise TimeoutError(f"moekit serve did not answer /health within {STARTUP_TIMEOUT_S:.0f} s")

    def memory_mib(self) -> dict[str, float]:
        """VmRSS (now) and VmHWM (peak resident) of the server process, in MiB; {} where /proc is absent."""
        status = Path(f"/proc/{self.proc.pid}/status")
        if not status.is_file():
            return {}
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM") if k in fields}

    def stop(self) -> int:
        """SIGTERM (a clean shutdown, exit status 0), then SIGKILL if it does not end in 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.returncode = self.proc.returncode
        self.log.unlink(missing_ok=True)
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- HTTP (standard library)
def request_json(
    address: tuple[str, int], method: str, path: str, body: dict | None, timeout: float = 600
) -> tuple[int, dict]:
    """(status, parsed JSON body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def http_completion(address: tuple[str, int], body: dict) -> tuple[float, dict]:
    """(seconds, response) of a non-streamed completion, timed from connect to the last byte."""
    start = time.perf_counter()
    status, response = request_json(address, "POST", "/v1/completions", body)
    seconds = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"POST /v1/completions answered {status}: {response}")
    return seconds, response


def stream_completion(address: tuple[str, int], body: dict) -> dict[str, Any]:
    """A streamed completion: seconds to the first event and to [DONE], the text, the usage."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection(*address, timeout=600)
    start = time.perf_counter()
    first = None
    text, usage, finish = [], None, None
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"streamed POST /v1/completions answered {resp.status}: {resp.read()[:500]}")
        for raw in resp:  # server-sent events: "data: {...}" lines, blank lines between
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.perf_counter() - start
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(f"the stream reported an error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    finally:
        conn.close()
    total = time.perf_counter() - start
    return {"ttft_s": first, "total_s": total, "text": "".join(text), "usage": usage, "finish_reason": finish}


# ---------------------------------------------------------------------- one variant
def measure_variant(folder: Path, settings: Settings, work: Path) -> dict[str, Any]:
    """Start a server for `folder`, time the four paths over the rounds, check every completion."""
    s = settings
    loaded = load_for_serving(folder, device="cpu")
    engine = Engine(loaded.model, loaded.tokenizer, loaded.name, eos_ids=loaded.eos_ids)
    prompt_ids = engine.encode_prompt(s.prompt)
    params = SamplingParams(max_tokens=s.max_tokens, temperature=0.0)
    eos_id = min(engine.eos_ids) if engine.eos_ids else None
    prompt_1S = torch.tensor([prompt_ids])  # [1, S]
    body = {"prompt": s.prompt, "max_tokens": s.max_tokens, "temperature": 0}

    def run_generate() -> tuple[float, str, int]:
        start = time.perf_counter()
        with torch.inference_mode():
            out_1T = loaded.model.generate(prompt_1S, s.max_tokens, temperature=0.0, eos_id=eos_id)
        seconds = time.perf_counter() - start
        new_ids = out_1T[0, len(prompt_ids) :].tolist()
        n = len(new_ids)
        if eos_id is not None and eos_id in new_ids:  # the engine drops the eos from the text
            new_ids = new_ids[: new_ids.index(eos_id)]
        return seconds, loaded.tokenizer.decode(new_ids), n

    times: dict[str, list[float]] = {
        "http": [],
        "stream_ttft": [],
        "stream": [],
        "engine": [],
        "generate": [],
    }
    with ServerProcess(folder, s.threads, work) as server:
        for _ in range(s.warmup):
            http_completion(server.address, body)
            stream_completion(server.address, body)
            engine.complete(prompt_ids, params)
            run_generate()
        for _ in range(s.rounds):
            seconds, response = http_completion(server.address, body)
            times["http"].append(seconds)
            streamed = stream_completion(server.address, body)
            times["stream_ttft"].append(streamed["ttft_s"])
            times["stream"].append(streamed["total_s"])
            start = time.perf_counter()
            piece = engine.complete(prompt_ids, params)
            times["engine"].append(time.perf_counter() - start)
            seconds, generated_text, generated_tokens = run_generate()
            times["generate"].append(seconds)
            choice = response["choices"][0]
            texts = {
                "http": choice["text"],
                "stream": streamed["text"],
                "engine": piece.text,
                "generate": generated_text,
            }
            counts = {
                "http": response["usage"]["completion_tokens"],
                "stream": streamed["usage"]["completion_tokens"],
                "engine": piece.completion_tokens,
                "generate": generated_tokens,
            }
            if len(set(texts.values())) != 1 or len(set(counts.values())) != 1:
                raise AssertionError(f"the paths disagree: texts {texts}, token counts {counts}")
        memory = server.memory_mib()
    if server.returncode != 0:
        raise RuntimeError(f"moekit serve exited with {server.returncode} after SIGTERM (expected 0)")
    medians = {k: statistics.median(v) for k, v in times.items()}
    tokens = counts["http"]
    return {
        "format": loaded.format,
        "file_mib": (loaded.folder / MODEL_FILE).stat().st_size / 2**20,
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": tokens,
        "finish_reason": choice["finish_reason"],
        "completion_text": texts["http"],
        "times_s": times,
        "median_s": medians,
        "tokens_per_s": {k: tokens / medians[k] for k in ("http", "stream", "engine", "generate")},
        "http_over_engine": medians["http"] / medians["engine"],
        "stream_over_engine": medians["stream"] / medians["engine"],
        "engine_over_generate": medians["engine"] / medians["generate"],
        "server_memory_mib": memory,
        "server_exit_status": server.returncode,
    }


def quantized_copy(
    model: torch.nn.Module, config: dict, method: str, parent: Path
) -> tempfile.TemporaryDirectory:
    """A temporary folder under `parent` holding the model (from `load_model`: with its config) with
    its experts quantized, at `<.name>/q`."""
    from moekit.compress.quantize import QuantSpec, quantize_model, save_quantized

    spec = QuantSpec(method)
    if spec.needs_calibration:
        raise ValueError(f"{method!r} needs calibration data; this benchmark serves int8 / int4 copies")
    qmodel, _ = quantize_model(model, spec, None)
    tmp = tempfile.TemporaryDirectory(prefix=f"serve-bench-{method}-", dir=parent)
    save_quantized(qmodel, config, Path(tmp.name) / "q", spec)
    return tmp


# ---------------------------------------------------------------------- tiny checkpoint (--smoke)
def tiny_checkpoint(
    folder: Path, texts: list[str] | None = None, max_seq_len: int = 128, version: str = "bench"
) -> Path:
    """A random tiny MoE decoder and a byte-level BPE tokenizer trained on `texts` (default: a few
    stdlib modules), written atomically to `folder` (tests/test_serve.py uses it too)."""
    import sysconfig

    from moekit.data.tokenizer import TokenizerConfig, train_tokenizer
    from moekit.model import ModelConfig, MoETransformer
    from moekit.moe import MoEConfig
    from moekit.train import checkpoint as ckpt

    if texts is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        texts = [(stdlib / name).read_text() for name in ("glob.py", "fnmatch.py", "bisect.py")]
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=320, num_sentinels=0, min_frequency=2))
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden_dim=48,
        max_seq_len=max_seq_len,
        init_std=0.3,  # peaked logits: greedy text varies instead of repeating one token
        moe=MoEConfig(dim=32, hidden_dim=24, num_experts=4, top_k=2),
    )
    model = MoETransformer(cfg).eval()
    config = {"moekit_version": version, "arch": "decoder", "model": cfg.to_dict()}

    def write(tmp: Path) -> None:
        ckpt.save_model_files(tmp, model, config)
        tokenizer.save(tmp / ckpt.TOKENIZER_FILE)

    return ckpt.save_folder_atomically(folder, write)


# ---------------------------------------------------------------------- output
def table_rows(
    results: dict[str, dict[str, Any]], settings: Settings, ckpt_label: str, params: int
) -> list[str]:
    """Three Markdown rows per variant: in-process, HTTP not streamed, HTTP streamed.
    `params`: the float model's parameter count (a quantized copy stores the same weights as buffers)."""
    rows = []
    for variant, r in results.items():
        n, tps, med = r["completion_tokens"], r["tokens_per_s"], r["median_s"]
        what = f"{variant}, prompt {r['prompt_tokens']} tokens, {n} new tokens greedy"
        size = f"{params / 1e6:.2f}M params; file {r['file_mib']:.1f} MiB"
        mem = r["server_memory_mib"]
        server_size = size + (f"; server RSS {mem['VmRSS']:.0f} MiB (peak {mem['VmHWM']:.0f})" if mem else "")
        serve = f"moekit serve --ckpt {ckpt_label}"
        if variant != "float32":
            serve = f"moekit quantize --ckpt {ckpt_label} --method {variant} --out q && moekit serve --ckpt q"
        request = f'POST /v1/completions {{"max_tokens": {settings.max_tokens}, "temperature": 0'
        rows += [
            f"| serving | {what}: in-process `model.generate` / `Engine.complete` (no HTTP) | {size} | "
            f"generate {tps['generate']:.1f} tok/s ({med['generate'] * 1e3:,.0f} ms); "
            f"Engine {tps['engine']:.1f} tok/s ({med['engine'] * 1e3:,.0f} ms) | - | "
            f"`Engine(...).complete(ids, SamplingParams(max_tokens={settings.max_tokens}, temperature=0))` |",
            f"| serving | {what}: HTTP, not streamed | {server_size} | "
            f"{tps['http']:.1f} tok/s, {med['http'] * 1e3:,.0f} ms per request "
            f"({r['http_over_engine']:.3f}x the in-process Engine) | - | `{serve}`; `{request}}}` |",
            f"| serving | {what}: HTTP, streamed (SSE) | {server_size} | "
            f"first token {med['stream_ttft'] * 1e3:,.0f} ms; {tps['stream']:.1f} tok/s "
            f"({r['stream_over_engine']:.3f}x the in-process Engine) | - | "
            f'`{serve}`; `{request}, "stream": true}}` |',
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint folder to serve (read only)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and few tokens, seconds")
    parser.add_argument(
        "--work", default="runs/serve-bench", help="folder for results (and temporary copies)"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)} (int4 works too)"
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt of every request")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the server")
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_tokens, args.rounds, args.warmup = 8, 2, 1
    elif args.ckpt is None:
        parser.error("--ckpt is required (or --smoke)")
    if args.rounds < 1 or args.max_tokens < 1:
        parser.error("--rounds and --max-tokens must be at least 1")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.ckpt) if args.ckpt else tiny_checkpoint(work / "tiny")
    settings = Settings(args.prompt, args.max_tokens, args.rounds, args.warmup, args.threads)
    model, config = load_model(ckpt)
    params = sum(p.numel() for p in model.parameters())
    results: dict[str, dict[str, Any]] = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        print(f"serve_bench: {variant} ...", file=sys.stderr, flush=True)
        if variant == "float32":
            results[variant] = measure_variant(ckpt, settings, work)
            continue
        with quantized_copy(model, config, variant, work) as tmp:
            results[variant] = measure_variant(Path(tmp) / "q", settings, work)
    del model  # only the copies' source: each variant loads its own model through the server's loader
    rows = table_rows(results, settings, args.ckpt or "tiny", params)
    print("| technique | setting | size | speed | validation loss | command |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    out = work / "serve_bench.json"
    payload = {
        "checkpoint": str(ckpt),
        "params": params,
        "settings": settings.__dict__,
        "variants": results,
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    print(f"results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
