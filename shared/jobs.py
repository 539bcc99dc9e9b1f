"""What every worker does around a job: ask the service for the go-ahead (a job that already
finished is not run twice), run it, and report either its result or a readable reason. The
caller acks by returning; an exception puts the job back on the queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")


class JobError(Exception):
    """A job that cannot succeed: its message becomes the job's failure reason."""


async def go_ahead(ask: Callable[[], Awaitable[T]]) -> T:
    """The service's answer to "may I start?"; while the service is away, wait a little and let
    the exception put the job back on the queue."""
    try:
        return await ask()
    except Exception:
        await asyncio.sleep(2)
        raise


async def run_and_report(
    work: Callable[[], Awaitable[Any]],
    *,
    succeeded: Callable[[Any], Awaitable[None]],
    failed: Callable[[str], Awaitable[None]],
) -> None:
    try:
        result = await work()
    except JobError as error:
        await failed(str(error))
    except Exception as error:  # a bug or a broken model: the job fails with what happened
        log.exception("worker.job_crashed")
        await failed(f"{type(error).__name__}: {error}")
    else:
        await succeeded(result)
