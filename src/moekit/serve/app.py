"""The HTTP app (FastAPI): OpenAI-compatible `/v1/completions`, `/v1/models`, and `/health`.

    app = create_app(engine)        # then any ASGI server: `moekit serve` runs it with uvicorn

Generation never runs on the event loop: each completion is decoded in one worker thread (a
single-thread executor, so requests queue in arrival order and the model serves one at a time),
while the loop keeps answering health checks and streaming earlier tokens. A streamed completion
hands its pieces from the worker to the loop through an asyncio queue; when the client goes away,
a cancel event stops the decoding at the next token. All state lives on `app.state`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.serve.engine import Engine, PromptError
from moekit.serve.protocol import (
    CompletionRequest,
    RequestError,
    completion_chunk,
    completion_response,
    error_body,
    parse_completion_request,
    parse_json,
    usage,
)

_END = object()  # marks the end of a streamed completion in the worker -> loop queue


def sse(payload: dict | str) -> str:
    """One server-sent event: a JSON object, or a bare string such as "[DONE]"."""
    if not isinstance(payload, str):
        payload = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


def create_app(engine: Engine) -> FastAPI:
    """A FastAPI app serving `engine`; generation runs in one worker thread owned by the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-generate")
        try:
            yield
        finally:
            app.state.executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="moekit", lifespan=lifespan)
    app.state.engine = engine
    app.state.created = int(time.time())

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)  # unknown routes (404), wrong methods (405)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_server_error(request: Request, exc: Exception) -> JSONResponse:
        message = f"internal error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.name}

    def model_card() -> dict:
        return {
            "id": engine.name,
            "object": "model",
            "created": app.state.created,
            "owned_by": "moekit",
            "max_model_len": engine.max_seq_len,
        }

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        if model_id != engine.name:
            raise RequestError(f"the model {model_id!r} does not exist", "model", "model_not_found", 404)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion_request(parse_json(await request.body()), engine.name)
        try:  # tokenizing a long prompt is real work: off the loop, but not behind generation
            prompt_ids = await run_in_threadpool(engine.encode_prompt, req.prompt)
        except PromptError as exc:
            raise RequestError(str(exc), "prompt", exc.code) from exc
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            events = stream_events(app, req, prompt_ids, completion_id, created)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        loop = asyncio.get_running_loop()
        piece = await loop.run_in_executor(app.state.executor, engine.complete, prompt_ids, req.params)
        return completion_response(completion_id, created, engine.name, piece, len(prompt_ids))

    return app


async def stream_events(
    app: FastAPI, req: CompletionRequest, prompt_ids: list[int], completion_id: str, created: int
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of new text, the last with its finish_reason,
    an optional usage chunk, then `data: [DONE]`."""
    engine: Engine = app.state.engine
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            cancel.set()

    def work() -> None:
        try:
            for piece in engine.stream(prompt_ids, req.params, cancel):
                put(piece)
        except Exception as exc:
            put(exc)
        finally:
            put(_END)

    app.state.executor.submit(work)
    completion_tokens = 0
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):  # headers are sent: report in-band, as OpenAI does
                yield sse(error_body(f"internal error: {type(item).__name__}: {item}", "server_error"))
                break
            completion_tokens = item.completion_tokens
            yield sse(completion_chunk(completion_id, created, engine.name, item.text, item.finish_reason))
        else:
            if req.include_usage:
                chunk = completion_chunk(completion_id, created, engine.name, "", None)
                yield sse({**chunk, "choices": [], "usage": usage(len(prompt_ids), completion_tokens)})
        yield sse("[DONE]")
    finally:
        cancel.set()  # the client went away or the stream ended: stop decoding at the next token
