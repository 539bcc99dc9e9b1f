"""The runtime both workers (inference and training) share: one job at a time from a durable
queue, a heartbeat, a model cache, throttled progress, and the go-ahead / run / report skeleton
of every job. What a worker does with a job is its own.

- **One job at a time**: the consumer's channel has prefetch 1, so a second job stays in the
  queue (where the autoscaler sees it, and another worker can take it) until the first is done.
- **Ack after the effect**: the handler returns once the job's outcome is stored and reported;
  only then is the message acked. A worker killed mid-job leaves its job to be redelivered; an
  exception (the service away) puts it back on the queue.
- **Drain**: on SIGTERM the worker stops taking jobs, finishes the one in hand (up to its
  grace time), says it is stopping, and exits.
- **Go-ahead**: before running a job the worker asks its service; a redelivered job that
  already finished is not run twice, and one that keeps killing workers is given up.
- **Errors**: a job that raises `shared.errors.Invalid` (the user's mistake: a bad payload, a
  checkpoint that cannot be used) fails with that message; anything else is a bug or a broken
  model, logged with its stack, and the job fails with what happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import structlog
from faststream import AckPolicy
from faststream.rabbit import Channel
from pydantic import BaseModel

from shared.contracts.workers import GoAhead, WorkerHeartbeat, WorkerState
from shared.errors import Invalid
from shared.messaging import Event, EventPublisher, Names, create_broker
from shared.metrics import MODEL_CACHE_REQUESTS, MODEL_LOAD_SECONDS, serve_metrics
from shared.rpc import Command, RpcClient
from shared.service import until_stopped
from shared.settings import Settings
from shared.storage import ObjectStore

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


class WorkerRuntime:
    def __init__(
        self,
        settings: Settings,
        *,
        pool: str,
        worker_id: str,
        heartbeats: str,
        grace_seconds: float,
        rpc_timeout: float = 60.0,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.worker_id = worker_id
        self.heartbeats = heartbeats
        self.names = Names(settings.broker_prefix)
        # on SIGTERM the job in hand may finish within this time; past it, it is redelivered
        self.broker = create_broker(settings, graceful_timeout=grace_seconds)
        self.rpc = RpcClient(settings.amqp_url, self.names.prefix, rpc_timeout)
        self.events = EventPublisher(self.broker, self.names)
        self.cache_dir = settings.var_dir.resolve() / "models"
        self.state = WorkerState.STARTING
        self.storage: ObjectStore | None = None
        self.current_job: str | None = None
        self.cancel_requested = False
        self.metrics_port: int | None = None

    # --- the process ---

    async def serve(
        self,
        queue: str,
        message: type[M],
        handle: Callable[[M], Awaitable[None]],
        *,
        warm_up: Callable[[], Any] | None = None,
        cancel_on: tuple[str, str] | None = None,
    ) -> None:
        """Warm up (the heavy imports and models, before taking any work), then take jobs from
        `queue` one at a time until SIGTERM/SIGINT, then drain. `cancel_on` is (routing key,
        field): an event that names the job in hand in that field cancels it (see
        `cancelled`)."""
        async with AsyncExitStack() as stack:
            self.storage = await ObjectStore.open(self.settings, stack)
            if self.settings.worker_threads:
                from diffusion.device import limit_threads  # torch: workers only

                limit_threads(self.settings.worker_threads)
            if warm_up is not None:
                await asyncio.to_thread(warm_up)
            work_queue = self.names.work_queue(queue)

            async def consume(job: message) -> None:  # type: ignore[valid-type]
                await handle(job)

            self.broker.subscriber(work_queue, channel=Channel(prefetch_count=1), ack_policy=AckPolicy.NACK_ON_ERROR)(
                consume
            )
            if cancel_on is not None:
                routing_key, field = cancel_on

                # every worker hears every cancellation; the one running the job acts on it
                @self.broker.subscriber(
                    self.names.replica_queue(f"worker.{self.worker_id}", routing_key), self.names.events
                )
                async def cancel(event: dict) -> None:
                    if self.current_job is not None and event.get(field) == self.current_job:
                        log.info("worker.cancel_requested", job=self.current_job)
                        self.cancel_requested = True

            await self.broker.connect()
            stack.push_async_callback(self.broker.stop)
            await self.rpc.start()
            stack.push_async_callback(self.rpc.close)
            # The subscriber declares its queue on its own channel, the one with prefetch 1;
            # declaring it elsewhere first would make the broker consume on a channel without
            # the limit. Its dead-letter queue comes after.
            await self.broker.start()
            await self._declare_dead_letters(queue)
            await self.broker.declare_queue(self.names.heartbeat_queue(self.heartbeats))
            self.metrics_port = serve_metrics(self.settings, f"worker-{self.worker_id}")
            self.state = WorkerState.READY
            beating = asyncio.create_task(self._beat_forever())
            log.info("worker.ready", pool=self.pool, worker_id=self.worker_id, metrics_port=self.metrics_port)
            try:
                await until_stopped()
            finally:
                beating.cancel()
            log.info("worker.stopping", worker_id=self.worker_id)
            await self.broker.stop()  # waits for the job in hand, then stops consuming
            self.state = WorkerState.STOPPING
            await self._beat()

    async def _declare_dead_letters(self, queue: str) -> None:
        dead_letters = await self.broker.declare_exchange(self.names.dead_letters)
        dead = await self.broker.declare_queue(self.names.dead_letter_queue(queue))
        await dead.bind(dead_letters, routing_key=f"{self.names.prefix}{queue}")

    async def _beat(self) -> None:
        beat = WorkerHeartbeat(
            pool=self.pool, worker_id=self.worker_id, state=self.state, at=time.time(), metrics_port=self.metrics_port
        )
        await self.broker.publish(
            beat.model_dump_json(), queue=self.names.heartbeat_queue(self.heartbeats), content_type="application/json"
        )

    async def _beat_forever(self) -> None:
        while True:
            try:
                await self._beat()
            except Exception:
                log.warning("worker.heartbeat_failed", exc_info=True)
            await asyncio.sleep(self.settings.worker_heartbeat_seconds)

    def device(self):
        """The torch device this worker runs on (`ESD_WORKER_DEVICE`)."""
        from diffusion.device import choose_device  # torch: only when a worker asks

        return choose_device(self.settings.worker_device)

    # --- one job ---

    def cancelled(self) -> bool:
        """Whether the job in hand was canceled (asked from the work's thread at every step)."""
        return self.cancel_requested

    async def job(
        self,
        ask: Command[Any, GoAhead],
        request: BaseModel,
        work: Callable[[], Awaitable[R]],
        *,
        job_id: str,
        succeeded: Callable[[R], Awaitable[None]],
        failed: Callable[[str], Awaitable[None]],
        canceled: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Ask for the go-ahead, run the work while busy, report its outcome. Returns once the
        outcome is reported (the message is acked then); raises, putting the job back on the
        queue, while the service cannot be reached. Work that stops because the job was
        canceled ends with `canceled()` (the service knows already, when there is none)."""
        try:
            decision = await self.rpc.call(ask, request)
        except Exception:
            await asyncio.sleep(2)  # the service is away: put the job back, a little later
            raise
        if not decision.run:
            log.info("worker.job_skipped", reason=decision.reason)
            return
        self.state = WorkerState.BUSY
        self.current_job, self.cancel_requested = job_id, False
        await self._beat()
        try:
            try:
                result = await work()
            except Exception as error:
                if self.cancel_requested:
                    log.info("worker.job_canceled")
                    if canceled is not None:
                        await canceled()
                elif isinstance(error, Invalid):
                    await failed(error.message)
                else:  # a bug or a broken model: the job fails with what happened
                    log.exception("worker.job_crashed")
                    await failed(f"{type(error).__name__}: {error}")
            else:
                await succeeded(result)
        finally:
            self.state = WorkerState.READY
            self.current_job, self.cancel_requested = None, False

    def progress(self, event: Callable[..., Event], *, every: float) -> Callable[..., None]:
        """A progress callback for work running in a thread: publishes `event(*args)` at most
        every `every` seconds, and always the last step (`final=True`)."""
        loop = asyncio.get_running_loop()
        last = [0.0]

        def report(*args: Any, final: bool = False) -> None:
            now = time.monotonic()
            if final or now - last[0] >= every:
                last[0] = now
                loop.call_soon_threadsafe(asyncio.ensure_future, self.events.publish(event(*args)))

        return report

    # --- models ---

    async def model(self, key: str, what: str) -> Path:
        """The object `key` on local disk, downloaded once into the one model cache both
        workers share (`<var>/models/<key>`); `what` names it in a failure."""
        assert self.storage is not None
        relative = PurePosixPath(key)
        if relative.is_absolute() or ".." in relative.parts:
            raise Invalid(f"{what}: {key} is not a model key")
        path = self.cache_dir / relative
        if path.exists():
            MODEL_CACHE_REQUESTS.labels(cache="disk", result="hit").inc()
            return path
        MODEL_CACHE_REQUESTS.labels(cache="disk", result="miss").inc()
        began = time.perf_counter()
        try:
            await self.storage.download_to(key, path)
        except Exception as error:
            raise Invalid(f"could not fetch {what}: {error}") from None
        MODEL_LOAD_SECONDS.labels(kind="download").observe(time.perf_counter() - began)
        log.info("worker.model_cached", key=key, bytes=path.stat().st_size)
        return path
