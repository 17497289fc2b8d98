"""`moekit serve`: an OpenAI-compatible HTTP server for one checkpoint.

moekit serve --ckpt DIR [--host 127.0.0.1] [--port 8000] [--device auto] [--model-name NAME]
             [--max-prompt-tokens N] [--log-level info]

Needs the `serve` extra (FastAPI + uvicorn): `pip install 'moekit[serve]'`. Without it the command
says so and exits 2; nothing else in moekit imports them. `--port 0` picks a free port; the
startup line prints the address actually bound. Ctrl-C (SIGINT) or SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import socket
import sys

SERVE_DEPENDENCIES = ("fastapi", "uvicorn")
INSTALL_HINT = "pip install 'moekit[serve]'   (or: pip install fastapi uvicorn)"


def add_commands(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI-compatible /v1/completions)")
    serve.add_argument(
        "--ckpt", required=True, help="moekit checkpoint or run folder (or an HF / quantized one)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    serve.add_argument("--model-name", default=None, help="model id clients use (default: the folder's name)")
    serve.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="refuse longer prompts (default: max_seq_len - 1)"
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.set_defaults(func=run_serve)


def missing_dependencies() -> list[str]:
    """The serve extra's packages that cannot be imported."""
    missing = []
    for name in SERVE_DEPENDENCIES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules raises ValueError
            found = False
        if not found:
            missing.append(name)
    return missing


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 = a free port, read it with getsockname()."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)  # connections made before uvicorn starts wait in the backlog
    return sock


def make_server(app, sock: socket.socket, log_level: str = "info"):
    """A uvicorn.Server for `app` on an already bound socket: `server.run(sockets=[sock])` serves it
    (in the main thread it handles SIGINT/SIGTERM), `server.should_exit = True` stops it."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


def run_serve(args: argparse.Namespace) -> int:
    missing = missing_dependencies()
    if missing:
        print(
            f"moekit serve: error: {' and '.join(missing)} not installed; install the serve extra:\n"
            f"    {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    from moekit.serve.app import create_app
    from moekit.serve.engine import Engine
    from moekit.serve.loading import load_for_serving

    loaded = load_for_serving(args.ckpt, device=args.device, name=args.model_name)
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        loaded.name,
        eos_ids=loaded.eos_ids,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    device = next(loaded.model.parameters()).device
    print(
        f"moekit serve: {loaded.name!r} ({loaded.format} checkpoint {str(loaded.folder)!r}, {device}, "
        f"max_seq_len {engine.max_seq_len}) at {url}/v1/completions",
        flush=True,
    )
    server = make_server(create_app(engine), sock, args.log_level)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler it
    # found: make that handler end the process with status 0 instead of a traceback or -15.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    except ServerStopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return 0


class ServerStopped(Exception):
    """Raised by the SIGINT/SIGTERM handler that uvicorn calls after its graceful shutdown."""


def _stopped(signum: int, frame: object) -> None:
    raise ServerStopped(signal.Signals(signum).name)
