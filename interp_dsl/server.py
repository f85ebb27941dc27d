"""`ivx serve`: one loaded model behind an HTTP API (FastAPI on uvicorn), running IR jobs.

Routes (JSON unless said otherwise; every error is `{"error": reason[, "limit", "diagnostics"]}`):
- `GET /v1/health`: the model, jobs queued and running (no key needed).
- `POST /v1/jobs`: a job body (safetensors, see `interp_dsl/wire.py`) -> 202 `{"id", "status", "position"}`.
- `GET /v1/jobs/{id}`: `{"id", "status": QUEUED|RUNNING|COMPLETED|ERROR, "position"?, "error"?}`.
- `GET /v1/jobs/{id}/result`: the result body (safetensors), once; a failed job's error otherwise.
Keys go in `Authorization: Bearer KEY`. SIGINT/SIGTERM stop taking requests, fail queued jobs
with a reason and let the running one finish (uvicorn's graceful shutdown, then the lifespan's).
"""

import argparse
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from interp_dsl.jobs import JobQueue, Refused
from interp_dsl.keys import Key, KeyFileError, Limits, find, new_key, read_keys
from interp_dsl.models import LanguageModel

MAX_REQUEST_BYTES = 64 * 2**20
DRAIN_FACTOR = 4  # an oversized body up to this many times the limit is read to the end, then refused
ANONYMOUS = Key("anonymous", "", Limits())
INSTALL_HINT = "pip install 'interp-dsl[serve]'"


def make_app(queue: JobQueue, keys: list[Key] | None, max_request_bytes: int = MAX_REQUEST_BYTES) -> Any:
    """The ASGI app serving `queue`; `keys` None means no key is needed."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        queue.start()
        yield
        await run_in_threadpool(queue.close)

    app = FastAPI(title="interp_dsl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def key_of(request: Request) -> Key:
        if keys is None:
            return ANONYMOUS
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = find(keys, token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if found is None:
            raise Refused(401, "a valid API key is needed: send `Authorization: Bearer KEY` "
                               "(interp_dsl.remote(url, api_key) or IVX_API_KEY)")
        return found

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return queue.health()

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> dict[str, Any]:
        key = key_of(request)
        body = await _read_body(request, max_request_bytes)
        record = await run_in_threadpool(queue.submit, body, key)
        return queue.status(record.id, key)

    @app.get("/v1/jobs/{job_id}")
    async def status(job_id: str, request: Request) -> dict[str, Any]:
        return queue.status(job_id, key_of(request))

    @app.get("/v1/jobs/{job_id}/result")
    async def result(job_id: str, request: Request) -> Response:
        body = queue.result(job_id, key_of(request))
        return Response(body, media_type="application/octet-stream")

    return app


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes. The rest of a body up to
    `DRAIN_FACTOR` times the limit is read and dropped first, so that the client, still sending,
    gets the answer rather than a reset connection; a larger one is cut off."""
    declared = request.headers.get("content-length", "")
    too_big = Refused(413, f"the request is over this server's limit of {limit} bytes (max_request_bytes)",
                      "max_request_bytes")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_FACTOR * limit:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_big
    return b"".join(chunks)


# ------------------------------------------------------------------------------------ command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name, HF directory or .gguf file to serve (default: smollm2-135m)",
                   default="smollm2-135m")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--keys", help="API keys file (sha256 hashes with per-key limits); without it no key is needed")
    p.add_argument("--new-key", metavar="NAME", help="add a key named NAME to --keys, print it, and exit")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help=f"largest job body accepted (default {MAX_REQUEST_BYTES})")
    p.add_argument("--batch-rows", type=int, default=32,
                   help="waiting jobs with the same program (other prompts of the same length, other "
                        "parameter values) share one forward of up to this many rows (default 32; 1: never)")


def serve_command(args: argparse.Namespace) -> int:
    """`ivx serve`: 0 after a clean shutdown, 2 for usage errors."""
    keys_path = Path(args.keys) if args.keys else None
    try:
        if args.new_key:
            if keys_path is None:
                return _usage("--new-key needs --keys FILE to add the key to")
            print(new_key(keys_path, args.new_key))
            return 0
        keys = read_keys(keys_path) if keys_path is not None else None
    except (KeyFileError, OSError) as e:
        return _usage(str(e))
    if not 0 < args.port < 65536 or args.max_request_bytes < 1 or args.batch_rows < 1:
        return _usage("--port is 1..65535, --max-request-bytes and --batch-rows positive")
    try:
        import uvicorn
    except ImportError:
        return _usage(f"ivx serve needs FastAPI and uvicorn: {INSTALL_HINT}")
    model = LanguageModel(args.model)
    app = make_app(JobQueue(model, args.batch_rows), keys, args.max_request_bytes)
    who = f"{len(keys)} API keys" if keys is not None else "no API key needed"
    print(f"ivx serve: {args.model} on http://{args.host}:{args.port} ({who}); Ctrl-C stops", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    _run_until_signal(server)
    print("ivx serve: stopped", file=sys.stderr)
    return 0


class _Stopped(Exception):
    """SIGINT or SIGTERM, re-raised by uvicorn once its graceful shutdown is done."""


def _run_until_signal(server: Any) -> None:
    """Run uvicorn; its graceful shutdown handles SIGINT/SIGTERM, then re-raises the signal, which
    ends the run here (a requested stop exits 0, not by the signal)."""
    def stopped(signum: int, frame: Any) -> None:
        raise _Stopped()

    previous = {s: signal.signal(s, stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except _Stopped:
        pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _usage(message: str) -> int:
    print(f"ivx serve: {message}", file=sys.stderr)
    return 2
