"""Starts the gateway: the ESD REST API on uvicorn."""

from __future__ import annotations

import uvicorn

from services.gateway.app import create_app
from shared.logging import configure_logging
from shared.metrics import serve_metrics
from shared.settings import get_settings


def main() -> None:
    settings = get_settings()
    configure_logging("gateway", fmt=settings.log_format, level=settings.log_level)
    serve_metrics(settings, "gateway")
    uvicorn.run(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
