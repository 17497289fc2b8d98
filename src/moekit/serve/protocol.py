"""The OpenAI-compatible wire format of `/v1/completions`: request validation, responses, errors.

Plain functions over JSON-like dicts (no web framework here), so the rules are testable alone.

Request fields (all optional but `prompt`):
    model        must name the served model when given (else 404 model_not_found)
    prompt       a string, a list of one string, or a list of token ids
    max_tokens   integer >= 0 (default 16); also bounded by the model's max_seq_len
    temperature  number >= 0 (default 1; 0 = greedy)
    top_p        number in (0, 1] (default 1)
    top_k        integer >= -1; 0 or -1 = off (an extension, as in vLLM)
    stop         a string or a list of up to 4 non-empty strings; the text ends before the first one
    stream       bool: server-sent events, `data: {chunk}` ... `data: [DONE]`
    stream_options {"include_usage": bool}: one more chunk with `usage` and no choices
    seed         integer: reproducible sampling (an extension for completions)
    n            1 only
Fields this server cannot honour (echo, logprobs, best_of > 1, suffix, penalties, logit_bias) are
refused with a 400 when set to anything but their neutral value, rather than silently ignored;
other unknown fields (e.g. `user`) are ignored, as OpenAI does.

Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from moekit.serve.engine import Piece, SamplingParams

MAX_STOP_STRINGS = 4
# field -> the values that mean "not used", which are the only ones accepted
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "logprobs": (None,),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
}


class RequestError(Exception):
    """A request the server refuses; becomes an HTTP `status` with an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int(body: dict, name: str, default: int | None, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < minimum:
        raise RequestError(f"`{name}` must be an integer >= {minimum}, got {value!r}", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if not _is_number(value) or value < low or value > high or (low_open and value == low):
        raise RequestError(f"`{name}` must be a number in {interval}, got {value!r}", param=name)
    return float(value)


def _prompt(body: dict) -> str | list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("`prompt` is required", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return list(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        if all(isinstance(p, str) for p in prompt):
            raise RequestError(
                f"`prompt` has {len(prompt)} strings; this server takes one prompt per request",
                param="prompt",
            )
    raise RequestError(
        "`prompt` must be a string, a list of one string, or a non-empty list of token ids", param="prompt"
    )


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise RequestError(
            f"`stop` must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
            param="stop",
        )
    return tuple(stops)


def parse_completion_request(body: Any, model_name: str) -> CompletionRequest:
    """Validate a decoded JSON body; raises RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(
            f"the model {model!r} does not exist; this server serves {model_name!r}",
            param="model",
            code="model_not_found",
            status=404,
        )
    for name, neutral in UNSUPPORTED_FIELDS.items():
        if body.get(name) not in neutral:
            raise RequestError(f"`{name}` is not supported by this server (got {body[name]!r})", param=name)
    n = _int(body, "n", 1, minimum=1)
    if n != 1:
        raise RequestError(f"`n` must be 1 (one completion per request), got {n}", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"`stream` must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is not None and not (
        isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)
    ):
        raise RequestError(
            '`stream_options` must be an object like {"include_usage": true}', param="stream_options"
        )
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and -(2**63) <= seed < 2**64):  # torch's seed range
        raise RequestError(f"`seed` must be an integer in [-2**63, 2**64), got {seed!r}", param="seed")
    top_k = _int(body, "top_k", None, minimum=-1)
    params = SamplingParams(
        max_tokens=_int(body, "max_tokens", 16, minimum=0),
        temperature=_number(body, "temperature", 1.0, 0.0, math.inf),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=top_k if top_k is not None and top_k > 0 else None,
        stop=_stop(body),
        seed=seed,
    )
    return CompletionRequest(
        prompt=_prompt(body),
        params=params,
        stream=bool(stream),
        include_usage=bool((options or {}).get("include_usage", False)),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_chunk(
    completion_id: str, created: int, model: str, text: str, finish_reason: str | None
) -> dict[str, Any]:
    """One `text_completion` object with one choice: a stream chunk, or (with usage) a whole response."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
    }


def completion_response(
    completion_id: str, created: int, model: str, piece: Piece, prompt_tokens: int
) -> dict[str, Any]:
    return {
        **completion_chunk(completion_id, created, model, piece.text, piece.finish_reason),
        "usage": usage(prompt_tokens, piece.completion_tokens),
    }
