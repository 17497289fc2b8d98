"""Serving: `moekit serve --ckpt DIR` runs an OpenAI-compatible HTTP server for one checkpoint.

    engine.py    the model and tokenizer behind a lock: KV-cache decoding, incremental text, stop strings
    protocol.py  the /v1/completions wire format: request validation, responses, OpenAI-style errors
    loading.py   detect a checkpoint folder's format (moekit, Hugging Face, quantized) and load it
    app.py       the FastAPI app (needs the `serve` extra: pip install 'moekit[serve]')
    commands.py  the `moekit serve` command: flags, dependency check, uvicorn

Only app.py imports FastAPI, so the engine works without the extra.
"""

from moekit.serve.engine import Engine, Piece, SamplingParams
from moekit.serve.loading import LoadedModel, load_for_serving

__all__ = ["Engine", "LoadedModel", "Piece", "SamplingParams", "load_for_serving"]
