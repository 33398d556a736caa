"""The HTTP API of `diffprune serve` (FastAPI), over a `Service`.

    GET  /health                       {"status": "ok", "tasks": 3, "active": "rte", "batches": …, "switches": …}
    GET  /v1/tasks                     every loaded task: labels, input fields, nonzeros, bytes
    POST /v1/tasks/{task}/predict      {"inputs": [{"text": "…"} | {"text": "…", "text_pair": "…"}, …]}
         → {"task": "rte", "predictions": [{"label": "entailment", "score": 0.91,
                                            "scores": {"entailment": 0.91, "not_entailment": 0.09}}, …]}
           (regression tasks: [{"value": 3.8}, …])
         question answering: {"inputs": [{"question": "…", "context": "…"}, …]}
         → {"task": "squad", "predictions": [{"answer": "in Paris", "start": 41, "end": 49, "score": 0.62}, …]}

Besides text / text_pair, an input may name its texts by the task's own columns (RTE: sentence1 /
sentence2, QQP: question1 / question2, MNLI: premise / hypothesis, …; `GET /v1/tasks` lists them). Every
error is a JSON body {"error": {"status": 422, "message": "…"}}: 404 unknown task or path, 400 body that is not
JSON, 413 body or input count over the limits, 422 well-formed JSON that is not a valid request, 500 a
failure inside the model (logged; the server keeps serving).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .service import RequestError, Service

log = logging.getLogger("diffprune.serve")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (not read whole first)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body has {int(declared)} bytes; the limit is {limit} "
                                "(start the server with a larger --max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: Service) -> FastAPI:
    """The FastAPI app; its lifespan starts the inference worker and stops it on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        try:
            yield
        finally:
            service.batcher.stop()

    app = FastAPI(title="diffprune serve", version=__version__, lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} (see GET /v1/tasks and " \
                      "POST /v1/tasks/{task}/predict)"
        return error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(422, "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server logged it and keeps serving")

    @app.get("/health")
    async def health():
        return {"status": "ok", "tasks": len(service.tasks), "active": service.active,
                **service.counters}

    @app.get("/v1/tasks")
    async def tasks():
        return {"base": service.base, "memory": service.memory(),
                "tasks": [task.describe() for task in service.tasks.values()]}

    @app.post("/v1/tasks/{task}/predict")
    async def predict(task: str, request: Request):
        if task not in service.tasks:
            raise RequestError(404, f"no task '{task}'; loaded: {', '.join(service.tasks)}")
        body = await read_body(request, service.max_body_bytes)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the body is not valid JSON ({exc})") from None
        pairs = service.tasks[task].parse(payload, service.max_inputs)
        result = await asyncio.wrap_future(service.batcher.submit(task, pairs))
        return {"task": task, "predictions": result}

    return app
