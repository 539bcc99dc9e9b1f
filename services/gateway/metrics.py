"""HTTP metrics of the gateway: every request's latency by method, route and status."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.metrics import HTTP_REQUEST_SECONDS

UNROUTED = "unrouted"  # refused before routing (the key check) or no such route


class RequestMetrics:
    """Pure ASGI middleware, outermost: times each request to the start of its response (an
    event stream's response starts at once and then lasts; its length is not its latency).
    The route is the matched template (`/inferences/{inference_id}`), never the raw path, so
    the series stay few."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            observed = True
            route = getattr(scope.get("route"), "path", None) or UNROUTED
            HTTP_REQUEST_SECONDS.labels(method=scope["method"], route=route, status=str(status)).observe(
                time.perf_counter() - began
            )

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start" and not observed:
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        except BaseException:
            if not observed:
                observe(500)
            raise
