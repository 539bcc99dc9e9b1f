"""RabbitMQ through FastStream: the one place that names exchanges and queues, builds the
broker, and carries request/reply (RPC) and events.

- RPC: the gateway calls `<prefix><service>.rpc.<command>` with `broker.request` (direct
  reply-to). Requests expire after the timeout, so a service that comes back late never acts on
  a command whose caller has given up. Replies are `RpcReply`: a result or an `ErrorInfo`.
- Events: past-tense models published persistently on the topic exchange `esd.events` with
  routing key `<domain>.<event>`; users bind their own queues there.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import structlog
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitMessage, RabbitQueue
from pydantic import BaseModel

from shared.errors import ErrorInfo, EsdError, Internal, Invalid, Unavailable
from shared.settings import Settings

log = structlog.get_logger(__name__)

EVENTS_EXCHANGE = "esd.events"
DEAD_LETTER_EXCHANGE = "esd.dead-letter"

T = TypeVar("T", bound=BaseModel)


class Event(BaseModel):
    """Base of every event; subclasses set `routing_key` (`<domain>.<event>`)."""

    routing_key: ClassVar[str]


class Names:
    """Exchange and queue names, under the deployment's broker prefix."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    @property
    def events(self) -> RabbitExchange:
        return RabbitExchange(
            f"{self.prefix}{EVENTS_EXCHANGE}", type=ExchangeType.TOPIC, durable=True
        )

    def rpc_queue(self, service: str, command: str) -> RabbitQueue:
        return RabbitQueue(f"{self.prefix}{service}.rpc.{command}", durable=True)

    @property
    def dead_letters(self) -> RabbitExchange:
        return RabbitExchange(
            f"{self.prefix}{DEAD_LETTER_EXCHANGE}", type=ExchangeType.DIRECT, durable=True
        )

    def work_queue(self, name: str) -> RabbitQueue:
        """A durable queue of commands that start long work. A message its consumer rejects
        (an unexpected error) goes to `<name>.dead` with its headers, never lost and never
        retried forever; a consumer that dies leaves its message to be redelivered."""
        return RabbitQueue(
            f"{self.prefix}{name}",
            durable=True,
            arguments={
                "x-dead-letter-exchange": f"{self.prefix}{DEAD_LETTER_EXCHANGE}",
                "x-dead-letter-routing-key": f"{self.prefix}{name}",
            },
        )

    def dead_letter_queue(self, name: str) -> RabbitQueue:
        return RabbitQueue(
            f"{self.prefix}{name}.dead", durable=True, routing_key=f"{self.prefix}{name}"
        )

    def event_queue(self, service: str, name: str, routing_key: str) -> RabbitQueue:
        """A durable queue owned by `service`, bound to the events exchange."""
        return RabbitQueue(
            f"{self.prefix}{service}.events.{name}", durable=True, routing_key=routing_key
        )


def create_broker(settings: Settings, *, graceful_timeout: float = 15.0) -> RabbitBroker:
    # FastStream logs every message at `log_level`: at DEBUG it is filtered out (its default
    # per-message logging costs more than a fast handler's work), while a handler's exception
    # is still logged at ERROR.
    return RabbitBroker(
        settings.amqp_url,
        logger=logging.getLogger("faststream"),
        log_level=logging.DEBUG,
        graceful_timeout=graceful_timeout,
    )


async def declare_work_queue(broker: RabbitBroker, names: Names, name: str) -> None:
    """Declare a work queue with its dead-letter queue (idempotent; the broker must be
    connected)."""
    dead_letters = await broker.declare_exchange(names.dead_letters)
    dead = await broker.declare_queue(names.dead_letter_queue(name))
    await dead.bind(dead_letters, routing_key=f"{names.prefix}{name}")
    await broker.declare_queue(names.work_queue(name))


class QueueDepths:
    """Reads how many messages wait in queues (what scales worker pools). Every read is a fresh
    passive declare: the broker's cached declarations keep the count of their first answer."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.connection: Any = None
        self.channel: Any = None

    async def depth(self, queue: str) -> int:
        import aio_pika
        from aiormq.exceptions import ChannelClosed

        if self.connection is None:
            self.connection = await aio_pika.connect_robust(self.amqp_url)
        if self.channel is None or self.channel.is_closed:
            self.channel = await self.connection.channel()
        try:
            declared = await self.channel.declare_queue(queue, passive=True, robust=False)
        except ChannelClosed:  # no such queue (yet): nothing waits in it
            self.channel = None
            return 0
        return declared.declaration_result.message_count or 0

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


class RpcReply(BaseModel):
    result: Any = None
    error: ErrorInfo | None = None


def rpc_handler(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[dict]]:
    """Wrap a subscriber so that it always replies: its result, or the domain error it raised,
    or an internal error (logged here with its stack; the caller sees no stack trace)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> dict:
        try:
            result = await fn(*args, **kwargs)
        except EsdError as error:
            return RpcReply(error=error.to_info()).model_dump(mode="json")
        except Exception:
            log.exception("rpc.failed", handler=fn.__name__)
            internal = Internal("internal error, see the service log")
            return RpcReply(error=internal.to_info()).model_dump(mode="json")
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json")
        return {"result": result}

    # FastStream reads the signature to parse the message and to validate the return value:
    # the parameters are the handler's, the return is the reply envelope.
    wrapper.__signature__ = inspect.signature(fn).replace(return_annotation=dict)  # type: ignore[attr-defined]
    return wrapper


RPC_CONCURRENCY = 64  # requests of one command a service replica works on at once


def register_rpc(
    broker: RabbitBroker,
    names: Names,
    service: str,
    handlers: dict[str, Callable[..., Awaitable[Any]]],
) -> None:
    """Subscribe each handler to `<service>.rpc.<command>`, always replying (see rpc_handler).

    FastStream runs one message of a subscriber at a time, so one slow call (a storage
    operation, a pool stopping) would hold up every other call of its kind. Each request is
    therefore handled in its own task, and the reply published to its reply-to address from
    there; up to RPC_CONCURRENCY at once, beyond which requests wait in the queue."""
    for command, handler in handlers.items():
        _subscribe_concurrently(broker, names.rpc_queue(service, command), handler)


def _subscribe_concurrently(broker: RabbitBroker, queue: RabbitQueue, handler: Callable[..., Awaitable[Any]]) -> None:
    parameter = next(iter(inspect.signature(handler).parameters.values()))
    model = parameter.annotation
    if isinstance(model, str):  # postponed annotations: resolve in the handler's module
        model = inspect.get_annotations(handler, eval_str=True)[parameter.name]
    reply = rpc_handler(handler)
    running: set[asyncio.Task] = set()
    gate: list[asyncio.Semaphore] = []  # made on first use, inside the running loop

    async def answer(body: Any, reply_to: str, correlation_id: str | None) -> None:
        try:
            try:
                request = model.model_validate(body)
            except Exception as error:  # a malformed request from a caller: say so, never crash
                result = RpcReply(error=Invalid(f"malformed request: {error}").to_info()).model_dump(mode="json")
            else:
                result = await reply(request)
            await broker.publish(
                json.dumps(result), routing_key=reply_to, correlation_id=correlation_id,
                content_type="application/json",
            )
        except Exception:
            log.exception("rpc.reply_failed", queue=queue.name)
        finally:
            gate[0].release()

    @broker.subscriber(queue, no_reply=True)
    async def receive(body: Any, message: RabbitMessage) -> None:
        if not gate:
            gate.append(asyncio.Semaphore(RPC_CONCURRENCY))
        await gate[0].acquire()  # at the limit, stop taking messages until one finishes
        if not message.reply_to:
            gate[0].release()
            return  # nobody waits for an answer
        task = asyncio.create_task(answer(body, message.reply_to, message.correlation_id))
        running.add(task)
        task.add_done_callback(running.discard)


class RpcClient:
    """Calls services and waits for their reply, turning errors back into `EsdError`s."""

    def __init__(self, broker: RabbitBroker, names: Names, timeout: float) -> None:
        self.broker = broker
        self.names = names
        self.timeout = timeout

    async def call(
        self,
        service: str,
        command: str,
        message: BaseModel,
        reply: type[T] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        timeout = timeout or self.timeout
        try:
            response = await self.broker.request(
                message.model_dump_json(),
                queue=self.names.rpc_queue(service, command),
                timeout=timeout,
                expiration=timeout,
                content_type="application/json",
            )
        except TimeoutError:
            raise Unavailable(f"the {service} service did not answer within {timeout:g} s") from None
        body = RpcReply.model_validate_json(response.body)
        if body.error is not None:
            raise body.error.to_error()
        if reply is None:
            return body.result
        return reply.model_validate(body.result)


async def send_work(broker: RabbitBroker, names: Names, queue: str, message: BaseModel) -> None:
    """Publish a command to a work queue: persistent, confirmed by the broker."""
    await broker.publish(
        message.model_dump_json(),
        queue=names.work_queue(queue),
        persist=True,
        content_type="application/json",
    )


class EventPublisher:
    def __init__(self, broker: RabbitBroker, names: Names) -> None:
        self.broker = broker
        self.names = names

    async def publish(self, event: Event) -> None:
        await self.broker.publish(
            event.model_dump_json(),
            exchange=self.names.events,
            routing_key=event.routing_key,
            persist=True,
            content_type="application/json",
            message_type=event.routing_key,
        )
