"""Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide a client's disconnect from the
handlers, and the server relies on seeing it to free queue slots)."""

from __future__ import annotations

import time

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indicf5.serve.metrics import Metrics


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the server answers: {"error": {"message", "type", "code"}}, as OpenAI's API does."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """Refuses a request body over the limit, on every route: at once when its Content-Length says so,
    else (a chunked body) as soon as the bytes received pass it, so nothing reads more than the limit."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    def too_large(self, size: str) -> HTTPException:
        return HTTPException(413, f"request body of {size} bytes; the limit is {self.limit} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length", b"")
        if size.isdigit() and int(size) > self.limit:
            e = self.too_large(size.decode())
            return await error_response(e.status_code, e.detail)(scope, receive, send)
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # the route's exception handlers answer it (FastAPI re-raises it as is)
                    raise self.too_large(f"more than {self.limit}")
            return message

        await self.app(scope, receive_counted, send)


class Measure:
    """Request latency and errors per route, into the server's Prometheus metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            self.metrics.latency.labels(endpoint, status).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(endpoint, status).inc()
