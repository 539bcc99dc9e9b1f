"""The runtime both workers (inference and training) share: one job at a time from a durable
queue, a heartbeat, a model cache, throttled progress, and the go-ahead / run / report skeleton
of every job. What a worker does with a job is its own.

- **One job at a time**: the consumer's channel has prefetch 1, so a second job stays in the
  queue (where the autoscaler sees it, and another worker can take it) until the first is done.
- **Ack after the effect**: the handler returns once the job's outcome is stored and reported;
  only then is the message acked. A worker killed mid-job leaves its job to be redelivered; an
  exception (the service away) puts it back on the queue.
- **Drain**: on SIGTERM the worker stops taking jobs (a job delivered after it goes straight
  back to the queue), finishes the one in hand within its grace time, says it is stopping, and
  exits. Past the grace time it gives the job back un-acked (another worker takes it; this one
  never reports it) and exits at once, as the job's thread cannot be interrupted. Scaling a pool
  down therefore neither loses a job nor runs one twice; the orchestrator's own grace period
  (swarm's `stop_grace_period`, Kubernetes' `terminationGracePeriodSeconds`) must be longer.
- **Go-ahead**: before running a job the worker asks its service; a redelivered job that
  already finished is not run twice, and one that keeps killing workers is given up.
- **Errors**: a job that raises `shared.errors.Invalid` (the user's mistake: a bad payload, a
  checkpoint that cannot be used) fails with that message; anything else is a bug or a broken
  model, logged with its stack, and the job fails with what happened.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import structlog
from aiormq.exceptions import AMQPError
from faststream import AckPolicy
from faststream.rabbit import Channel
from faststream.rabbit.annotations import RabbitMessage
from pydantic import BaseModel

from shared.contracts.workers import GoAhead, WorkerHeartbeat, WorkerState
from shared.errors import Invalid, Unavailable
from shared.messaging import Event, EventPublisher, Names, create_broker
from shared.metrics import MODEL_CACHE_REQUESTS, MODEL_LOAD_SECONDS, serve_metrics
from shared.rpc import Command, RpcClient
from shared.service import until_stopped
from shared.settings import Settings
from shared.storage import ObjectStore

log = structlog.get_logger(__name__)

# what puts a job back on its queue rather than dead-lettering it: the service did not answer
# or the connection dropped; worth another try once it is back
TRANSIENT = (Unavailable, ConnectionError, OSError, TimeoutError, AMQPError)

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
        exit_after_give_back: bool = True,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.worker_id = worker_id
        self.heartbeats = heartbeats
        self.names = Names(settings.broker_prefix)
        # on SIGTERM the job in hand may finish within this time; past it, it is given back
        self.grace_seconds = grace_seconds
        self.exit_after_give_back = exit_after_give_back  # False in tests that drain in-process
        # the runtime waits for the job in hand itself (`_drain`): the broker's own wait on
        # stopping only covers the moment between a job's end and its ack
        self.broker = create_broker(settings, graceful_timeout=2.0)
        self._stop_requested = asyncio.Event()
        self.draining = False
        self.in_hand: asyncio.Task | None = None  # the job being handled, and its message
        self.in_hand_message: Any = None
        self.given_back = False
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
        once: bool = False,
    ) -> None:
        """Warm up (the heavy imports and models, before taking any work), then take jobs from
        `queue` one at a time until SIGTERM/SIGINT (or, `once`, after the first job), then
        drain. `cancel_on` is (routing key, field): an event that names the job in hand in that
        field cancels it (see `cancelled`)."""
        async with AsyncExitStack() as stack:
            self.storage = await ObjectStore.open(self.settings, stack)
            if self.settings.worker_threads:
                from diffusion.device import limit_threads  # torch: workers only

                limit_threads(self.settings.worker_threads)
            from PIL import Image  # workers decode users' images: this bounds their size

            Image.MAX_IMAGE_PIXELS = self.settings.max_image_pixels
            if warm_up is not None:
                await asyncio.to_thread(warm_up)
            work_queue = self.names.work_queue(queue)

            async def consume(job: message, raw: RabbitMessage) -> None:  # type: ignore[valid-type]
                if self.draining:  # delivered as the worker stops: back to the queue at once
                    await raw.nack(requeue=True)
                    return
                self.in_hand, self.in_hand_message = asyncio.current_task(), raw
                try:
                    await handle(job)
                except TRANSIENT:
                    raise  # the service or the broker is away: back to the queue (nack), retried
                except Exception:
                    # a bug in the handling, not in the job's work (that fails the job): retried,
                    # it would fail again forever; the dead-letter queue keeps it for a person
                    log.exception("worker.job_dead_lettered")
                    await raw.reject(requeue=False)
                finally:
                    self.in_hand, self.in_hand_message = None, None
                    if once:  # take no second job: it could be delivered as soon as this one is acked
                        self.draining = True
                        self.request_stop()

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
            orphaned = asyncio.create_task(self._stop_when_orphaned())
            log.info("worker.ready", pool=self.pool, worker_id=self.worker_id, metrics_port=self.metrics_port)
            try:
                await self._until_stopped()
            finally:
                beating.cancel()
                orphaned.cancel()
            await self._drain()

    async def _stop_when_orphaned(self) -> None:
        """A local pool's worker drains and exits once the service that started it is gone
        (killed with SIGKILL, it could not stop its workers): its successor starts a pool of its
        own, and a worker outside any pool would go on taking jobs nobody counts."""
        parent = self.settings.worker_parent_pid
        if not parent:
            return  # swarm and Kubernetes workers: the orchestrator owns them
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                break
        log.warning("worker.parent_gone", parent_pid=parent, worker_id=self.worker_id)
        self.request_stop()

    def request_stop(self) -> None:
        """Drain and stop, as on SIGTERM."""
        self._stop_requested.set()

    async def _until_stopped(self) -> None:
        signalled = asyncio.ensure_future(until_stopped())
        requested = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({signalled, requested}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            signalled.cancel()
            requested.cancel()

    async def _drain(self) -> None:
        """Finish the job in hand within the grace time, or give it back; then stop."""
        self.draining = True
        job = self.in_hand
        log.info("worker.stopping", worker_id=self.worker_id, job_in_hand=job is not None)
        if job is not None:
            await asyncio.wait({job}, timeout=self.grace_seconds)
        if self.in_hand is not None and not self.in_hand.done():
            await self._give_back()
            return
        self.state = WorkerState.STOPPING
        try:
            await self._beat()
        except Exception:
            log.warning("worker.heartbeat_failed", exc_info=True)
        await self.broker.stop()

    async def _give_back(self) -> None:
        """The job in hand outlived the grace time: its message goes back to the queue un-acked,
        for another worker; this one will not report it. The service hears the worker is gone,
        and the process exits without waiting for the job's thread, which cannot be stopped."""
        self.given_back = True
        message = self.in_hand_message
        log.warning("worker.job_given_back", worker_id=self.worker_id, grace_seconds=self.grace_seconds)
        if message is not None:
            await message.nack(requeue=True)
        self.state = WorkerState.STOPPING
        try:
            await self._beat()
        except Exception:
            log.warning("worker.heartbeat_failed", exc_info=True)
        await self.broker.stop()  # were the nack lost, closing the channel returns the message too
        if self.exit_after_give_back:
            os._exit(0)

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
            report: Callable[[], Awaitable[None]]
            try:
                result = await work()
            except Exception as error:
                if self.cancel_requested:
                    log.info("worker.job_canceled")
                    report = canceled if canceled is not None else _nothing
                elif isinstance(error, Invalid):
                    report = partial(failed, error.message)
                else:  # a bug or a broken model: the job fails with what happened
                    log.exception("worker.job_crashed")
                    report = partial(failed, f"{type(error).__name__}: {error}")
            else:
                report = partial(succeeded, result)
            if self.given_back:  # the job went back to the queue on drain: another worker reports it
                log.info("worker.outcome_dropped")
                return
            await report()
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


async def _nothing() -> None:
    """No report to make: the service knows of the cancellation already."""
